//! Execution slots: acquire, heartbeat and release, the caller's fast path.
//!
//! Slots live in the shared table (`table`), so admission costs a lock and a
//! few comparisons and writes no WAL. The C entry points answer from shared
//! memory and cached limits; whatever needs SQL goes to the SECURITY DEFINER
//! twins (`definer`; see `limits::Mode`). `xact` ties slots to the caller's
//! transaction, `reap` revokes expired ones, `listing` shows them,
//! `fallback` keeps them in a table when the library is not preloaded, and
//! `table` says what a restart does to them. `claim`, `fair`, `ended` and
//! `wait` are the slot side of claim_jobs and of waiting for room.
use crate::error::{LimitsError, OrRaise, Result};
use crate::identity;
use crate::limits::{self, Mode};
use crate::row::datum;
use crate::shmem;
use counters::CounterKey;
use table::{LockedTable, RevokeReason, Slot, MAX_SLOTS, REVOKED, RUN_ID_MAX};
use xact::Op;

pub mod claimed;
mod counters;
mod definer;
mod ended;
pub mod entries;
mod fair;
mod fallback;
pub mod freed;
pub mod grace;
pub mod listing;
pub mod reap;
pub mod restore;
pub mod table;
mod wait;
mod xact;

/// What one slot takes: `cost` units of each limit that applies, and a
/// concurrency key (`concurrent_executions.<key>`) when it has one.
/// acquire_execution_slot asks for `Demand::ONE`; claim_jobs for a job's.
pub struct Demand<'a> {
    pub key: Option<&'a str>,
    pub cost: u32,
    /// A claimed job's digest (`counters::claim_digest`).
    pub claim: Option<[u8; 16]>,
    /// The start tag the claimer saw when it picked the tenant (`fair`).
    pub picked_at: Option<f64>,
}

impl Demand<'_> {
    pub const ONE: Demand<'static> = Demand {
        key: None,
        cost: 1,
        claim: None,
        picked_at: None,
    };
}

/// One limit a slot is admitted under: the count it adds to, its cap (None:
/// no limit), the refusal reason when it is full, and which live slots count
/// under it (for retry_after).
struct Check<'a> {
    key: CounterKey,
    cap: Option<i64>,
    reason: &'static str,
    counts: &'a dyn Fn(&Slot) -> bool,
}

/// Registers the transaction callbacks of pending slot changes. From `_PG_init`.
pub fn init() {
    xact::init();
}
use pgrx::datum::{Interval, Uuid};
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::Ordering;

type Ts = TimestampWithTimeZone;

fn now() -> i64 {
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn ts(micros: i64) -> Option<Ts> {
    if micros == i64::MAX {
        None
    } else {
        Ts::try_from(micros).ok()
    }
}

fn interval_micros(i: &Interval, what: &str) -> Result<i64> {
    let total = i.as_micros();
    // Months are taken as 30 days, as PostgreSQL's own interval comparison does.
    i64::try_from(total).map_err(|_| LimitsError::invalid(format!("{what} is out of range"), ""))
}

thread_local! {
    static SLOT_ID_RNG: std::cell::RefCell<Option<rand_chacha::ChaCha20Rng>> =
        const { std::cell::RefCell::new(None) };
}

/// A version-4-shaped uuid whose first twelve bytes come from PostgreSQL's
/// cryptographically strong random source, through a per-backend ChaCha20
/// stream seeded from it (knowing any number of slot ids tells nothing of
/// the next); its last four become the table index
/// (`with_index`). Drawn before the table's lock is taken, so the lock is
/// never held while the random source works.
fn random_slot_id() -> Result<[u8; 16]> {
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    let mut id = [0u8; 16];
    SLOT_ID_RNG.with(|cell| {
        let mut rng = cell.borrow_mut();
        if rng.is_none() {
            // pg_strong_random costs microseconds a call; a ChaCha20 stream
            // keyed from it once per backend costs nanoseconds, and is just
            // as unpredictable from outside.
            let mut seed = [0u8; 32];
            if !unsafe { pg_sys::pg_strong_random(seed.as_mut_ptr().cast(), seed.len()) } {
                return Err(LimitsError::invalid(
                    "could not generate a random slot id",
                    "PostgreSQL's strong random source failed; see the server log",
                ));
            }
            *rng = Some(rand_chacha::ChaCha20Rng::from_seed(seed));
        }
        if let Some(rng) = rng.as_mut() {
            rng.fill_bytes(&mut id[..12]);
        }
        Ok(())
    })?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

fn with_index(mut id: [u8; 16], idx: usize) -> [u8; 16] {
    id[12..16].copy_from_slice(&(idx as u32).to_be_bytes());
    id
}

/// When a refused acquire may try again: when the earliest of the slots in
/// its way ends (by lease or deadline), at least 10 ms from now and at most
/// `meshhook_limits.retry_after_max`; that maximum when none will end.
/// The one definition, for the table fallback too (`_retry_after`).
fn retry_after(earliest_end: Option<i64>, now: i64) -> Interval {
    let max = crate::gucs::retry_after_max_micros();
    let wait = earliest_end.map_or(max, |end| end.saturating_sub(now).clamp(10_000, max));
    Interval::from_micros(wait)
}

/// `retry_after` for `_fallback_acquire` (sql/slots_fallback.sql). A NULL
/// `earliest_end` means no slot will end (the maximum); a NULL `now`, now.
#[pg_extern(stable, parallel_safe)]
fn _retry_after(earliest_end: Option<Ts>, now: Option<Ts>) -> Interval {
    let micros = |t: Ts| pg_sys::TimestampTz::from(t);
    retry_after(earliest_end.map(micros), now.map_or_else(self::now, micros))
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._retry_after(timestamptz, timestamptz) FROM PUBLIC;",
    name = "retry_after_grants",
    requires = [_retry_after]
);

/// The answer of acquire_execution_slot: its one row.
#[derive(Default)]
pub struct Admission {
    pub granted: bool,
    pub slot_id: Option<Uuid>,
    /// granted, tenant_limit, project_limit or recovering.
    pub reason: Option<String>,
    pub in_use: Option<i64>,
    pub limit_value: Option<i64>,
    pub deadline: Option<Ts>,
    pub lease_expires_at: Option<Ts>,
    pub retry_after: Option<Interval>,
}

/// The SQL row type of `Admission` (what pgrx's `TableIterator` returns).
pub type AdmissionRow = (
    bool,
    Option<Uuid>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<Ts>,
    Option<Ts>,
    Option<Interval>,
);

impl Admission {
    pub fn into_row(self) -> AdmissionRow {
        (
            self.granted,
            self.slot_id,
            self.reason,
            self.in_use,
            self.limit_value,
            self.deadline,
            self.lease_expires_at,
            self.retry_after,
        )
    }

    /// Read back from SQL (the definer twin, the fallback table).
    pub fn from_spi(r: &pgrx::spi::SpiHeapTupleData) -> Result<Admission> {
        Ok(Admission {
            granted: r.get::<bool>(1)?.unwrap_or(false),
            slot_id: r.get::<Uuid>(2)?,
            reason: r.get::<String>(3)?,
            in_use: r.get::<i64>(4)?,
            limit_value: r.get::<i64>(5)?,
            deadline: r.get::<Ts>(6)?,
            lease_expires_at: r.get::<Ts>(7)?,
            retry_after: r.get::<Interval>(8)?,
        })
    }
}

fn count_refusal(reason: &str) {
    if let Some(h) = table::header() {
        if let Some(i) = table::REFUSAL_REASONS.iter().position(|r| *r == reason) {
            h.refusals_by[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn refuse(reason: &str, in_use: i64, limit: Option<i64>, retry: Interval) -> Admission {
    // A waiter's tries are counted once, when it stops waiting.
    if wait::current().is_none() {
        count_refusal(reason);
    }
    Admission {
        granted: false,
        reason: Some(reason.to_string()),
        in_use: Some(in_use),
        limit_value: limit,
        retry_after: Some(retry),
        ..Admission::default()
    }
}

/// See `limits::Mode`: on the fast path, None whenever an answer would need
/// SQL (limits not cached in this backend, no shared memory).
fn acquire(
    tenant: Option<Uuid>,
    project: Option<Uuid>,
    run_id: Option<&str>,
    lease: Option<Interval>,
    demand: &Demand,
    mode: Mode,
) -> Result<Option<Admission>> {
    let tenant = tenant.ok_or_else(|| {
        LimitsError::invalid(
            "tenant_id must not be NULL",
            "pass the uuid of the tenant that runs the execution",
        )
    })?;
    let run_id = run_id.unwrap_or("");
    if run_id.len() > RUN_ID_MAX {
        return Err(LimitsError::invalid(
            format!(
                "run_id is {} bytes long; at most {RUN_ID_MAX} are allowed",
                run_id.len()
            ),
            "pass a shorter run identifier, such as the run's uuid",
        ));
    }
    let lease_micros = match lease {
        None => crate::gucs::default_lease_micros(),
        Some(i) => {
            let m = interval_micros(&i, "lease")?;
            let max = crate::gucs::max_lease_micros();
            if !(1_000_000..=max).contains(&m) {
                return Err(LimitsError::invalid(
                    format!(
                        "lease must be between 1 second and meshhook_limits.max_lease ({} s)",
                        max / 1_000_000
                    ),
                    "heartbeat_execution_slot extends a lease; pass e.g. '30 seconds'",
                ));
            }
            m
        }
    };
    // A session's default_lease is the caller's; the ceiling is the server's.
    let lease_micros = lease_micros.min(crate::gucs::max_lease_micros());
    identity::require_act_for(tenant)?;
    crate::error::refuse_on_standby("acquire_execution_slot")?;
    if !table::available() {
        if mode == Mode::FastPath {
            return Ok(None);
        }
        if demand.key.is_some() || demand.cost != 1 {
            return Err(LimitsError::NotPreloaded);
        }
        return fallback::acquire(tenant, project, run_id, lease_micros).map(Some);
    }
    let lim = if mode == Mode::Definer {
        limits::slot_limits(tenant, project, demand.key)?
    } else {
        match limits::cached_slot_limits(tenant, project, demand.key) {
            Some(lim) => lim,
            None => return Ok(None),
        }
    };
    let now = now();
    let db = shmem::my_database();
    let t = *tenant.as_bytes();
    let p = project.map(|p| *p.as_bytes());
    let k = demand.key.map(counters::key_digest);
    // No tenant holds more than the server's share, whatever its own limit
    // (or none): the table stays open to the others.
    let ceiling = crate::gucs::tenant_slot_ceiling();
    let tenant_cap = Some(lim.tenant_cap.map_or(ceiling, |c| c.min(ceiling)));
    let of_tenant = |s: &Slot| s.database == db && s.tenant == t;
    let of_project = |s: &Slot| of_tenant(s) && s.has_project && Some(s.project) == p;
    let of_key = |s: &Slot| of_tenant(s) && s.has_key && Some(s.key) == k;
    let of_database = |s: &Slot| s.database == db;
    // In the order a refusal names them: the most specific holder first.
    let mut checks = vec![Check {
        key: CounterKey::tenant(db, &t),
        cap: tenant_cap,
        reason: "tenant_limit",
        counts: &of_tenant,
    }];
    if let Some(p) = &p {
        checks.push(Check {
            key: CounterKey::project(db, &t, p),
            cap: lim.project_cap,
            reason: "project_limit",
            counts: &of_project,
        });
    }
    if let Some(k) = &k {
        checks.push(Check {
            key: CounterKey::key(db, &t, k),
            cap: lim.key_cap,
            reason: "key_limit",
            counts: &of_key,
        });
    }
    checks.push(Check {
        key: CounterKey::total(db),
        cap: lim.total_cap,
        reason: "total_limit",
        counts: &of_database,
    });
    let cost = i64::from(demand.cost);
    let random_id = random_slot_id()?;

    let mut locked = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
    let grace_end = locked.table().header.grace_end;
    // A claim waits only until its database's claimed slots are rebuilt from
    // the queues (`restore`); other slots wait for the whole grace.
    // A database whose extension is newer than the start has no holders
    // from before it.
    let claims_restored = demand.claim.is_some() && locked.table().restored(db);
    if now < grace_end && !claims_restored && !locked.table().created(db) {
        drop(locked);
        if wait::current().is_none() && demand.claim.is_none() {
            grace::notice_refused(grace_end, now);
        }
        // The time left, not capped by retry_after_max: nothing is
        // granted before it.
        let left = Interval::from_micros(grace_end.saturating_sub(now).max(10_000));
        return Ok(Some(refuse("recovering", 0, lim.tenant_cap, left)));
    }
    let in_use = |locked: &mut LockedTable| -> Vec<i64> {
        checks
            .iter()
            .map(|c| i64::from(locked.table().count(&c.key)))
            .collect()
    };
    let full = |used: &[i64]| {
        checks
            .iter()
            .zip(used)
            .position(|(c, u)| c.cap.is_some_and(|cap| u + cost > cap))
    };
    let mut used = in_use(&mut locked);
    if full(&used).is_some() {
        // Reclaim this tenant's abandoned slots before refusing.
        if locked.table().reap(now, Some((db, &t))) > 0 {
            used = in_use(&mut locked);
        }
    }
    if let Some(i) = full(&used) {
        let c = &checks[i];
        if let Some(w) = wait::current() {
            wait::note_refusal(locked.table(), w, c.reason);
        }
        let end = locked.table().earliest_end(c.counts);
        drop(locked);
        return Ok(Some(refuse(
            c.reason,
            used[i],
            c.cap,
            retry_after(end, now),
        )));
    }
    // Room: unless an earlier waiter goes first (see `wait`).
    if let Some(w) = wait::current() {
        if let Some(reason) = wait::defer(locked.table(), w, lim.total_cap.is_some()) {
            drop(locked);
            return Ok(Some(refuse(
                reason,
                used[0],
                tenant_cap,
                retry_after(Some(now), now),
            )));
        }
    }
    let Some(idx) = locked.table().allocate(now) else {
        drop(locked);
        return Err(LimitsError::SlotTableFull(MAX_SLOTS));
    };
    let id = with_index(random_id, idx);
    let deadline = lim.exec_micros.map_or(i64::MAX, |m| now.saturating_add(m));
    let slot = locked.table().put_live(
        idx,
        &entries::NewSlot {
            id,
            database: db,
            tenant: t,
            project: p,
            key: k,
            cost: demand.cost,
            claim: demand.claim,
            xid: unsafe { u32::from(pg_sys::GetTopTransactionIdIfAny()) },
            now,
            lease_micros,
            deadline,
            memory_limit: lim.memory_bytes.unwrap_or(-1),
            run_id,
        },
    );
    if demand.claim.is_some() {
        // Claimed cost is what fair share divides (`fair`).
        let weight = lim.weight.unwrap_or(1.0);
        locked
            .table()
            .fair
            .charge(db, &t, demand.cost, weight, demand.picked_at, now);
    }
    locked.table().header.grants.fetch_add(1, Ordering::Relaxed);
    drop(locked);
    xact::push(idx, id, Op::Acquire);

    // Report the limit with the least room left (the tenant's on a tie).
    let (in_use, limit) = checks
        .iter()
        .zip(&used)
        .filter_map(|(c, u)| c.cap.map(|cap| (u + cost, cap)))
        .min_by_key(|(u, cap)| cap - u)
        .map_or((used[0] + cost, None), |(u, cap)| (u, Some(cap)));
    Ok(Some(Admission {
        granted: true,
        slot_id: Some(Uuid::from_bytes(id)),
        reason: Some("granted".into()),
        in_use: Some(in_use),
        limit_value: limit,
        deadline: ts(deadline),
        lease_expires_at: ts(slot.lease_expires),
        retry_after: None,
    }))
}

thread_local! {
    static ACQUIRE_DESC: Cell<pg_sys::TupleDesc> = const { Cell::new(std::ptr::null_mut()) };
}

crate::finfo_v1!(pg_finfo_meshhook_limits_acquire_execution_slot);

/// `acquire_execution_slot(tenant_id, project_id, run_id, lease, wait)`:
/// take an execution slot for a tenant (and project). Never raises for a
/// refusal: returns granted = false with a reason and retry_after; with
/// `wait`, first waits up to that long for room (`wait`). SECURITY INVOKER:
/// with the limits cached in this backend it needs nothing but shared
/// memory; otherwise it asks `_acquire_execution_slot` (SECURITY DEFINER).
/// Identity is checked on both paths. Answers its one row directly.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_acquire_execution_slot(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with the declared arguments (five; four
    // under 0.1.0's SQL).
    let (tenant, project, run_id, lease, wait) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 0),
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 1),
            crate::row::text_arg(fcinfo, 2, "run_id").or_raise(),
            pgrx::fcinfo::pg_getarg::<Interval>(fcinfo, 3),
            // 0.1.0 declared four arguments: until ALTER EXTENSION UPDATE,
            // a call has no `wait`.
            ((*fcinfo).nargs > 4)
                .then(|| pgrx::fcinfo::pg_getarg::<Interval>(fcinfo, 4))
                .flatten(),
        )
    };
    let attempt = || {
        limits::fast_path_or_definer(
            acquire(tenant, project, run_id, lease, &Demand::ONE, Mode::FastPath),
            || definer::acquire_as_owner(tenant, project, run_id, lease),
        )
    };
    let row = match (wait, tenant) {
        (Some(wait), Some(t)) => {
            wait::acquire_waiting(&t, wait::wait_micros(&wait).or_raise(), attempt)
        }
        _ => attempt(),
    };
    let cols = [
        (c"granted", pg_sys::BOOLOID),
        (c"slot_id", pg_sys::UUIDOID),
        (c"reason", pg_sys::TEXTOID),
        (c"in_use", pg_sys::INT8OID),
        (c"limit_value", pg_sys::INT8OID),
        (c"deadline", pg_sys::TIMESTAMPTZOID),
        (c"lease_expires_at", pg_sys::TIMESTAMPTZOID),
        (c"retry_after", pg_sys::INTERVALOID),
    ];
    let row = [
        datum(row.granted),
        datum(row.slot_id),
        datum(row.reason),
        datum(row.in_use),
        datum(row.limit_value),
        datum(row.deadline),
        datum(row.lease_expires_at),
        datum(row.retry_after),
    ];
    // SAFETY: the declared columns, and datums of their types.
    unsafe { crate::row::answer(fcinfo, &ACQUIRE_DESC, &cols, row, "acquire_execution_slot") }
}

fn slot_bytes(slot_id: Option<Uuid>) -> Result<[u8; 16]> {
    slot_id.map(|s| *s.as_bytes()).ok_or_else(|| {
        LimitsError::invalid(
            "slot_id must not be NULL",
            "pass the slot_id that acquire_execution_slot returned",
        )
    })
}

/// Snapshot of a slot of this database by id, if any entry holds it.
fn find(id: &[u8; 16]) -> Result<Option<(usize, Slot)>> {
    let mut l = LockedTable::shared().ok_or(LimitsError::NotPreloaded)?;
    Ok(l.table()
        .lookup(id)
        .map(|idx| (idx, l.table().slots[idx]))
        .filter(|(_, s)| s.database == shmem::my_database()))
}

fn emit_revoked(s: &Slot, reason: RevokeReason, value: Option<i64>) -> Result<()> {
    let extra = serde_json::json!({
        "slot_id": Uuid::from_bytes(s.id).to_string(),
        "reason": reason.as_str(),
        "run_id": String::from_utf8_lossy(&s.run_id[..s.run_id_len as usize]),
        "project_id": s.has_project.then(|| Uuid::from_bytes(s.project).to_string()),
    });
    let (resource, limit) = match reason {
        RevokeReason::MemoryExceeded => (
            "memory_bytes",
            (s.memory_limit >= 0).then_some(s.memory_limit),
        ),
        RevokeReason::DeadlineExceeded => ("execution_seconds", None),
        _ => ("concurrent_executions", None),
    };
    Spi::run_with_args(
        "SELECT meshhook_limits._emit('slot.revoked', $1, $2, $3::numeric, $4::numeric, $5::jsonb)",
        &[
            Uuid::from_bytes(s.tenant).into(),
            resource.into(),
            value.into(),
            limit.into(),
            pgrx::JsonB(extra).into(),
        ],
    )?;
    Ok(())
}

/// The answer of heartbeat_execution_slot.
pub struct Liveness {
    pub alive: bool,
    /// alive, not_found, or why the slot was revoked.
    pub reason: Option<String>,
    pub deadline: Option<Ts>,
    pub lease_expires_at: Option<Ts>,
}

impl Liveness {
    fn gone(reason: &str, deadline: Option<Ts>) -> Liveness {
        Liveness {
            alive: false,
            reason: Some(reason.into()),
            deadline,
            lease_expires_at: None,
        }
    }
}

fn heartbeat(slot_id: Option<Uuid>, memory_bytes: Option<i64>) -> Result<Liveness> {
    let id = slot_bytes(slot_id)?;
    if memory_bytes.is_some_and(|m| m < 0) {
        return Err(LimitsError::invalid(
            "memory_bytes must be >= 0",
            "report the execution's current memory in bytes",
        ));
    }
    if !table::available() {
        return fallback::heartbeat(id, memory_bytes);
    }
    let Some((idx, snap)) = find(&id)? else {
        return Ok(Liveness::gone("not_found", None));
    };
    identity::require_act_for(Uuid::from_bytes(snap.tenant))?;
    let now = now();
    let mut l = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
    if l.table().lookup(&id) != Some(idx) {
        return Ok(Liveness::gone("not_found", None));
    }
    let s = l.table().slots[idx];
    if s.state == REVOKED {
        let r = RevokeReason::from_u8(s.reason);
        // Announce it here unless it is announced or a reaper is at it.
        let announce = l
            .table()
            .claim_announcement(idx, unsafe { pg_sys::MyProcPid });
        l.table().forget(idx);
        drop(l);
        if announce {
            emit_revoked(&s, r, None)?;
        }
        let reason = r.as_str();
        return Ok(Liveness::gone(reason, ts(s.deadline)));
    }
    let reason = if now >= s.deadline {
        Some(RevokeReason::DeadlineExceeded)
    } else if now >= s.lease_expires {
        Some(RevokeReason::LeaseExpired)
    } else if s.memory_limit >= 0 && memory_bytes.is_some_and(|m| m > s.memory_limit) {
        Some(RevokeReason::MemoryExceeded)
    } else {
        None
    };
    if let Some(r) = reason {
        l.table().revoke(idx, r, now);
        l.table().slots[idx].notified = true;
        l.table().forget(idx);
        drop(l);
        emit_revoked(&s, r, memory_bytes)?;
        return Ok(Liveness::gone(r.as_str(), ts(s.deadline)));
    }
    let e = &mut l.table().slots[idx];
    e.lease_expires = now.saturating_add(e.lease_micros).min(e.deadline);
    if let Some(m) = memory_bytes {
        e.memory_peak = e.memory_peak.max(m);
    }
    let expires = e.lease_expires;
    drop(l);
    Ok(Liveness {
        alive: true,
        reason: Some("alive".into()),
        deadline: ts(s.deadline),
        lease_expires_at: ts(expires),
    })
}

/// Extend a slot's lease and report memory. alive = false means the slot is
/// gone (reason says why) and the execution must stop.
#[allow(clippy::type_complexity)] // the SQL row type, spelt out
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn heartbeat_execution_slot(
    slot_id: Option<Uuid>,
    memory_bytes: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(alive, bool),
        name!(reason, Option<String>),
        name!(deadline, Option<Ts>),
        name!(lease_expires_at, Option<Ts>),
    ),
> {
    let answer = heartbeat(slot_id, memory_bytes).or_raise();
    TableIterator::once((
        answer.alive,
        answer.reason,
        answer.deadline,
        answer.lease_expires_at,
    ))
}

const OUTCOMES: [&str; 5] = ["completed", "failed", "cancelled", "timed_out", "crashed"];

/// See `limits::Mode`: on the fast path, None whenever SQL would be needed
/// (no shared memory, or a slot.revoked event to write).
fn release(
    slot_id: Option<Uuid>,
    outcome: Option<&str>,
    memory_peak: Option<i64>,
    mode: Mode,
) -> Result<Option<bool>> {
    let id = slot_bytes(slot_id)?;
    let outcome = outcome.unwrap_or("completed");
    if !OUTCOMES.contains(&outcome) {
        return Err(LimitsError::invalid(
            format!("unknown outcome \"{}\"", identity::truncate(outcome, 64)),
            format!("use one of: {}", OUTCOMES.join(", ")),
        ));
    }
    if memory_peak.is_some_and(|m| m < 0) {
        return Err(LimitsError::invalid(
            "memory_peak_bytes must be >= 0",
            "report the execution's peak memory in bytes",
        ));
    }
    if !table::available() {
        if mode == Mode::FastPath {
            return Ok(None);
        }
        return fallback::release(id, memory_peak).map(Some);
    }
    let Some((idx, snap)) = find(&id)? else {
        return Ok(Some(false));
    };
    identity::require_act_for(Uuid::from_bytes(snap.tenant))?;
    if snap.state == REVOKED {
        if let Some(mut l) = LockedTable::exclusive() {
            if l.table().lookup(&id) == Some(idx) {
                l.table().forget(idx);
            }
        }
        return Ok(Some(false));
    }
    if xact::pending(&id, Op::Release) {
        return Ok(Some(false));
    }
    if snap.memory_limit >= 0 && memory_peak.is_some_and(|m| m > snap.memory_limit) {
        if mode == Mode::FastPath {
            return Ok(None);
        }
        emit_revoked(&snap, RevokeReason::MemoryExceeded, memory_peak)?;
    }
    xact::push(idx, id, Op::Release);
    Ok(Some(true))
}

crate::finfo_v1!(pg_finfo_meshhook_limits_release_execution_slot);

/// `release_execution_slot(slot_id, outcome, memory_peak_bytes)`: give a
/// slot back; takes effect when the calling transaction commits. False when
/// the slot was not held (unknown, already released or revoked).
/// SECURITY INVOKER like acquire: `_release_execution_slot` does what needs SQL.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_release_execution_slot(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with the three declared arguments.
    let (slot_id, outcome, memory_peak) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 0),
            crate::row::text_arg(fcinfo, 1, "outcome").or_raise(),
            pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 2),
        )
    };
    let released = limits::fast_path_or_definer(
        release(slot_id, outcome, memory_peak, Mode::FastPath),
        || {
            Spi::get_one_with_args::<bool>(
                "SELECT meshhook_limits._release_execution_slot($1, $2, $3)",
                &[slot_id.into(), outcome.into(), memory_peak.into()],
            )
            .map(|released| released.unwrap_or(false))
            .map_err(LimitsError::from)
        },
    );
    pg_sys::Datum::from(released)
}

extension_sql!(
    r#"
CREATE FUNCTION meshhook_limits.acquire_execution_slot(tenant_id uuid, project_id uuid DEFAULT NULL,
    run_id text DEFAULT NULL, lease interval DEFAULT NULL, wait interval DEFAULT NULL)
RETURNS TABLE(granted boolean, slot_id uuid, reason text, in_use bigint, limit_value bigint,
              deadline timestamptz, lease_expires_at timestamptz, retry_after interval)
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_acquire_execution_slot';
COMMENT ON FUNCTION meshhook_limits.acquire_execution_slot(uuid, uuid, text, interval, interval) IS
  'Take an execution slot for a tenant (and project), waiting up to wait for room; never raises for a refusal. SECURITY INVOKER: the caller must be the tenant or an admin.';
CREATE FUNCTION meshhook_limits.release_execution_slot(slot_id uuid, outcome text DEFAULT 'completed',
    memory_peak_bytes bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_release_execution_slot';
COMMENT ON FUNCTION meshhook_limits.release_execution_slot(uuid, text, bigint) IS
  'Give a slot back at commit; false when it was not held. SECURITY INVOKER: the caller must be the tenant or an admin.';
"#,
    name = "slot_functions",
    requires = [
        definer::_acquire_execution_slot,
        definer::_release_execution_slot
    ]
);
