//! Execution slots: acquire, heartbeat, release, reap.
//!
//! Slots live in the shared table (`shmem`), so admission costs a lock and a
//! few comparisons and writes no WAL. See `xact` for how they follow the
//! caller's transaction and `shmem` for what a restart does to them.
// The row types of the SQL functions are spelt out in their signatures.
#![allow(clippy::type_complexity)]
use crate::error::{LimitsError, OrRaise, Result};
use crate::identity;
use crate::limits;
use crate::row::datum;
use crate::shmem::{
    self, CounterKey, Locked, RevokeReason, Slot, LIVE, MAX_SLOTS, REVOKED, RUN_ID_MAX,
};
use crate::xact::{self, Op};

mod fallback;
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

fn retry_after(earliest_end: Option<i64>, now: i64) -> Interval {
    let max = i64::from(crate::gucs::RETRY_AFTER_MAX.get()) * 1000;
    let wait = earliest_end.map_or(max, |end| (end - now).clamp(10_000, max));
    Interval::from_micros(wait)
}

pub type AcquireRow = (
    bool,
    Option<Uuid>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<Ts>,
    Option<Ts>,
    Option<Interval>,
);

fn refuse(reason: &str, in_use: i64, limit: Option<i64>, retry: Interval) -> AcquireRow {
    if let Some(h) = shmem::header() {
        if let Some(i) = shmem::REFUSAL_REASONS.iter().position(|r| *r == reason) {
            h.refusals_by[i].fetch_add(1, Ordering::Relaxed);
        }
    }
    (
        false,
        None,
        Some(reason.to_string()),
        Some(in_use),
        limit,
        None,
        None,
        Some(retry),
    )
}

/// `full`: as the owner (the definer function), free to run SQL. Otherwise
/// the caller's own fast path: None whenever an answer would need SQL (limits
/// not cached in this backend, no shared memory), before changing anything.
fn acquire(
    tenant: Option<Uuid>,
    project: Option<Uuid>,
    run_id: Option<&str>,
    lease: Option<Interval>,
    full: bool,
) -> Result<Option<AcquireRow>> {
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
        None => i64::from(crate::gucs::DEFAULT_LEASE.get()) * 1_000_000,
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
    if !shmem::available() {
        if !full {
            return Ok(None);
        }
        return fallback::acquire(tenant, project, run_id, lease_micros).map(Some);
    }
    let lim = if full {
        limits::slot_limits(tenant, project)?
    } else {
        match limits::cached_slot_limits(tenant, project) {
            Some(lim) => lim,
            None => return Ok(None),
        }
    };
    let now = now();
    let db = shmem::my_database();
    let t = *tenant.as_bytes();
    let p = project.map(|p| *p.as_bytes());
    let tenant_key = CounterKey::tenant(db, &t);
    let project_key = p.map(|p| CounterKey::project(db, &t, &p));
    // No tenant holds more than the server's share, whatever its own limit
    // (or none): the table stays open to the others.
    let ceiling = i64::from(crate::gucs::TENANT_SLOT_CEILING.get());
    let tenant_cap = Some(lim.tenant_cap.map_or(ceiling, |c| c.min(ceiling)));
    let random_id = random_slot_id()?;

    let mut l = Locked::exclusive().ok_or(LimitsError::NotPreloaded)?;
    let grace_end = l.t().header.grace_end;
    if now < grace_end {
        drop(l);
        return Ok(Some(refuse(
            "recovering",
            0,
            lim.tenant_cap,
            retry_after(Some(grace_end), now),
        )));
    }
    let over = |l: &mut Locked| {
        let tc = i64::from(l.t().count(&tenant_key));
        let pc = project_key.map_or(0, |k| i64::from(l.t().count(&k)));
        let tenant_full = tenant_cap.is_some_and(|c| tc >= c);
        let project_full = lim.project_cap.is_some_and(|c| pc >= c) && p.is_some();
        (tc, pc, tenant_full, project_full)
    };
    let (mut tc, mut pc, mut tf, mut pf) = over(&mut l);
    if tf || pf {
        // Reclaim this tenant's abandoned slots before refusing.
        if l.t().reap(now, Some((db, &t))) > 0 {
            (tc, pc, tf, pf) = over(&mut l);
        }
    }
    if tf {
        let end = l.t().earliest_end(|s| s.database == db && s.tenant == t);
        drop(l);
        return Ok(Some(refuse(
            "tenant_limit",
            tc,
            tenant_cap,
            retry_after(end, now),
        )));
    }
    if pf {
        let end = l.t().earliest_end(|s| {
            s.database == db && s.tenant == t && s.has_project && Some(s.project) == p
        });
        drop(l);
        return Ok(Some(refuse(
            "project_limit",
            pc,
            lim.project_cap,
            retry_after(end, now),
        )));
    }
    let Some(idx) = l.t().allocate(now) else {
        drop(l);
        return Err(LimitsError::SlotTableFull(MAX_SLOTS));
    };
    let id = with_index(random_id, idx);
    let deadline = lim.exec_micros.map_or(i64::MAX, |m| now.saturating_add(m));
    let mut run = [0u8; RUN_ID_MAX];
    run[..run_id.len()].copy_from_slice(run_id.as_bytes());
    let slot = Slot {
        id,
        database: db,
        tenant: t,
        project: p.unwrap_or([0; 16]),
        has_project: p.is_some(),
        state: LIVE,
        reason: 0,
        notified: false,
        announcer: 0,
        pid: unsafe { pg_sys::MyProcPid },
        acquired_at: now,
        lease_micros,
        lease_expires: now.saturating_add(lease_micros).min(deadline),
        deadline,
        memory_limit: lim.memory_bytes.unwrap_or(-1),
        memory_peak: 0,
        revoked_at: 0,
        run_id_len: run_id.len() as u8,
        run_id: run,
    };
    l.t().slots[idx] = slot;
    l.t().count_in(&slot);
    l.t().header.grants.fetch_add(1, Ordering::Relaxed);
    drop(l);
    xact::push(idx, id, Op::Acquire);

    // Report the tighter of the two limits.
    let (in_use, limit) = match (tenant_cap, lim.project_cap.filter(|_| p.is_some())) {
        (Some(tcap), Some(pcap)) if pcap - (pc + 1) < tcap - (tc + 1) => (pc + 1, Some(pcap)),
        (None, Some(pcap)) => (pc + 1, Some(pcap)),
        (tcap, _) => (tc + 1, tcap),
    };
    Ok(Some((
        true,
        Some(Uuid::from_bytes(id)),
        Some("granted".into()),
        Some(in_use),
        limit,
        ts(deadline),
        ts(slot.lease_expires),
        None,
    )))
}

/// The complete acquire, as the extension's owner: loads the limits into
/// this backend's cache, or uses the fallback table without shared memory.
/// `acquire_execution_slot` calls it whenever its own fast path cannot answer.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _acquire_execution_slot(
    tenant_id: Option<Uuid>,
    project_id: Option<Uuid>,
    run_id: Option<crate::row::Utf8>,
    lease: Option<Interval>,
) -> TableIterator<
    'static,
    (
        name!(granted, bool),
        name!(slot_id, Option<Uuid>),
        name!(reason, Option<String>),
        name!(in_use, Option<i64>),
        name!(limit_value, Option<i64>),
        name!(deadline, Option<Ts>),
        name!(lease_expires_at, Option<Ts>),
        name!(retry_after, Option<Interval>),
    ),
> {
    let row = crate::row::utf8(&run_id, "run_id")
        .and_then(|run_id| acquire(tenant_id, project_id, run_id, lease, true))
        .and_then(|r| r.ok_or(LimitsError::NotPreloaded))
        .or_raise();
    TableIterator::once(row)
}

thread_local! {
    static ACQUIRE_DESC: Cell<pg_sys::TupleDesc> = const { Cell::new(std::ptr::null_mut()) };
}

crate::finfo_v1!(pg_finfo_meshhook_limits_acquire_execution_slot);

/// `acquire_execution_slot(tenant_id, project_id, run_id, lease)`: take an
/// execution slot for a tenant (and project). Never raises for a refusal:
/// returns granted = false with a reason and retry_after. SECURITY INVOKER:
/// with the limits cached in this backend it needs nothing but shared
/// memory; otherwise it asks `_acquire_execution_slot` (SECURITY DEFINER).
/// Identity is checked on both paths. Answers its one row directly.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_acquire_execution_slot(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with the four declared arguments.
    let (tenant, project, run_id, lease) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 0),
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 1),
            crate::row::text_arg(fcinfo, 2, "run_id").or_raise(),
            pgrx::fcinfo::pg_getarg::<Interval>(fcinfo, 3),
        )
    };
    let row = match acquire(tenant, project, run_id, lease, false).or_raise() {
        Some(row) => row,
        None => crate::error::passthrough(|| acquire_as_owner(tenant, project, run_id, lease))
            .or_raise(),
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
        datum(row.0),
        datum(row.1),
        datum(row.2),
        datum(row.3),
        datum(row.4),
        datum(row.5),
        datum(row.6),
        datum(row.7),
    ];
    // SAFETY: the declared columns, and datums of their types.
    unsafe { crate::row::answer(fcinfo, &ACQUIRE_DESC, &cols, row, "acquire_execution_slot") }
}

fn acquire_as_owner(
    tenant: Option<Uuid>,
    project: Option<Uuid>,
    run_id: Option<&str>,
    lease: Option<Interval>,
) -> Result<AcquireRow> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT * FROM meshhook_limits._acquire_execution_slot($1, $2, $3, $4)",
            Some(1),
            &[tenant.into(), project.into(), run_id.into(), lease.into()],
        )?;
        let r = rows.into_iter().next().ok_or(LimitsError::NotPreloaded)?;
        acquire_row(&r)
    })
}

/// An acquire result read back from SQL (the definer path, the fallback).
fn acquire_row(r: &pgrx::spi::SpiHeapTupleData) -> Result<AcquireRow> {
    Ok((
        r.get::<bool>(1)?.unwrap_or(false),
        r.get::<Uuid>(2)?,
        r.get::<String>(3)?,
        r.get::<i64>(4)?,
        r.get::<i64>(5)?,
        r.get::<Ts>(6)?,
        r.get::<Ts>(7)?,
        r.get::<Interval>(8)?,
    ))
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
    let mut l = Locked::shared().ok_or(LimitsError::NotPreloaded)?;
    Ok(l.t()
        .lookup(id)
        .map(|idx| (idx, l.t().slots[idx]))
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

pub type HeartbeatRow = (bool, Option<String>, Option<Ts>, Option<Ts>);

fn heartbeat(slot_id: Option<Uuid>, memory_bytes: Option<i64>) -> Result<HeartbeatRow> {
    let id = slot_bytes(slot_id)?;
    if memory_bytes.is_some_and(|m| m < 0) {
        return Err(LimitsError::invalid(
            "memory_bytes must be >= 0",
            "report the execution's current memory in bytes",
        ));
    }
    if !shmem::available() {
        return fallback::heartbeat(id, memory_bytes);
    }
    let Some((idx, snap)) = find(&id)? else {
        return Ok((false, Some("not_found".into()), None, None));
    };
    identity::require_act_for(Uuid::from_bytes(snap.tenant))?;
    let now = now();
    let mut l = Locked::exclusive().ok_or(LimitsError::NotPreloaded)?;
    if l.t().lookup(&id) != Some(idx) {
        return Ok((false, Some("not_found".into()), None, None));
    }
    let s = l.t().slots[idx];
    if s.state == REVOKED {
        let r = RevokeReason::from_u8(s.reason);
        // Announce it here unless it is announced or a reaper is at it.
        let announce = l.t().claim_announcement(idx, unsafe { pg_sys::MyProcPid });
        l.t().forget(idx);
        drop(l);
        if announce {
            emit_revoked(&s, r, None)?;
        }
        let reason = r.as_str();
        return Ok((false, Some(reason.into()), ts(s.deadline), None));
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
        l.t().revoke(idx, r, now);
        l.t().slots[idx].notified = true;
        l.t().forget(idx);
        drop(l);
        emit_revoked(&s, r, memory_bytes)?;
        return Ok((false, Some(r.as_str().into()), ts(s.deadline), None));
    }
    let e = &mut l.t().slots[idx];
    e.lease_expires = now.saturating_add(e.lease_micros).min(e.deadline);
    if let Some(m) = memory_bytes {
        e.memory_peak = e.memory_peak.max(m);
    }
    let expires = e.lease_expires;
    drop(l);
    Ok((true, Some("alive".into()), ts(s.deadline), ts(expires)))
}

/// Extend a slot's lease and report memory. alive = false means the slot is
/// gone (reason says why) and the execution must stop.
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
    TableIterator::once(heartbeat(slot_id, memory_bytes).or_raise())
}

const OUTCOMES: [&str; 5] = ["completed", "failed", "cancelled", "timed_out", "crashed"];

/// `full` as for `acquire`: without it, None whenever SQL would be needed
/// (no shared memory, or a slot.revoked event to write), before any change.
fn release(
    slot_id: Option<Uuid>,
    outcome: Option<&str>,
    memory_peak: Option<i64>,
    full: bool,
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
    if !shmem::available() {
        if !full {
            return Ok(None);
        }
        return fallback::release(id, memory_peak).map(Some);
    }
    let Some((idx, snap)) = find(&id)? else {
        return Ok(Some(false));
    };
    identity::require_act_for(Uuid::from_bytes(snap.tenant))?;
    if snap.state == REVOKED {
        if let Some(mut l) = Locked::exclusive() {
            if l.t().lookup(&id) == Some(idx) {
                l.t().forget(idx);
            }
        }
        return Ok(Some(false));
    }
    if xact::pending(&id, Op::Release) {
        return Ok(Some(false));
    }
    if snap.memory_limit >= 0 && memory_peak.is_some_and(|m| m > snap.memory_limit) {
        if !full {
            return Ok(None);
        }
        emit_revoked(&snap, RevokeReason::MemoryExceeded, memory_peak)?;
    }
    xact::push(idx, id, Op::Release);
    Ok(Some(true))
}

/// The complete release, as the extension's owner (fallback table, events).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _release_execution_slot(
    slot_id: Option<Uuid>,
    outcome: Option<crate::row::Utf8>,
    memory_peak_bytes: Option<i64>,
) -> bool {
    crate::row::utf8(&outcome, "outcome")
        .and_then(|outcome| release(slot_id, outcome, memory_peak_bytes, true))
        .and_then(|r| r.ok_or(LimitsError::NotPreloaded))
        .or_raise()
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
    let released = match release(slot_id, outcome, memory_peak, false).or_raise() {
        Some(b) => b,
        None => crate::error::passthrough(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT meshhook_limits._release_execution_slot($1, $2, $3)",
                &[slot_id.into(), outcome.into(), memory_peak.into()],
            )
        })
        .map_err(LimitsError::from)
        .or_raise()
        .unwrap_or(false),
    };
    pg_sys::Datum::from(released)
}

extension_sql!(
    r#"
CREATE FUNCTION meshhook_limits.acquire_execution_slot(tenant_id uuid, project_id uuid DEFAULT NULL,
    run_id text DEFAULT NULL, lease interval DEFAULT NULL)
RETURNS TABLE(granted boolean, slot_id uuid, reason text, in_use bigint, limit_value bigint,
              deadline timestamptz, lease_expires_at timestamptz, retry_after interval)
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_acquire_execution_slot';
COMMENT ON FUNCTION meshhook_limits.acquire_execution_slot(uuid, uuid, text, interval) IS
  'Take an execution slot for a tenant (and project); never raises for a refusal. SECURITY INVOKER: the caller must be the tenant or an admin.';
CREATE FUNCTION meshhook_limits.release_execution_slot(slot_id uuid, outcome text DEFAULT 'completed',
    memory_peak_bytes bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_release_execution_slot';
COMMENT ON FUNCTION meshhook_limits.release_execution_slot(uuid, text, bigint) IS
  'Give a slot back at commit; false when it was not held. SECURITY INVOKER: the caller must be the tenant or an admin.';
"#,
    name = "slot_functions",
    requires = [_acquire_execution_slot, _release_execution_slot]
);

fn reap() -> Result<i64> {
    identity::require_admin("reap execution slots")?;
    if !shmem::available() {
        return fallback::reap();
    }
    let now = now();
    let mut to_announce: Vec<(usize, Slot)> = Vec::new();
    let n = {
        let mut l = Locked::exclusive().ok_or(LimitsError::NotPreloaded)?;
        let n = l.t().reap(now, None);
        // Revocations are announced in their own database (its events
        // table, its listeners), by a reaper running there.
        let db = shmem::my_database();
        let pid = unsafe { pg_sys::MyProcPid };
        for idx in 0..MAX_SLOTS {
            let s = l.t().slots[idx];
            if s.database == db && l.t().claim_announcement(idx, pid) {
                to_announce.push((idx, s));
            }
        }
        n
    };
    // The events are part of this transaction; the slots count as announced
    // only once it commits (xact::Op::Announce), so a rollback loses nothing.
    // Each is claimed by this backend until then: announced exactly once.
    for (idx, s) in &to_announce {
        xact::push(*idx, s.id, Op::Announce); // first: a failed emit must release every claim
    }
    for (_, s) in &to_announce {
        emit_revoked(s, RevokeReason::from_u8(s.reason), None)?;
    }
    Ok(i64::try_from(n.max(to_announce.len())).unwrap_or(i64::MAX))
}

/// Revoke slots whose lease or deadline has passed and announce every
/// revocation (slot.revoked). The background worker and pg_cron call this.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub fn reap_execution_slots() -> i64 {
    reap().or_raise()
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits.reap_execution_slots() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.reap_execution_slots() TO meshhook_limits_admin;",
    name = "reap_execution_slots_grants",
    requires = [reap_execution_slots, "limits"]
);

/// Live slots of a tenant (0 when the library is not preloaded).
#[pg_extern(stable, parallel_safe, strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub fn live_slots(tenant_id: Uuid) -> i64 {
    identity::require_read_for(tenant_id).or_raise();
    match Locked::shared() {
        Some(mut l) => i64::from(l.t().count(&CounterKey::tenant(
            shmem::my_database(),
            tenant_id.as_bytes(),
        ))),
        None => fallback::live(tenant_id).or_raise(),
    }
}

pub type SlotRow = (
    Uuid,
    Uuid,
    Option<Uuid>,
    Option<String>,
    String,
    Option<String>,
    Ts,
    Option<Ts>,
    Option<Ts>,
    i64,
    i32,
);

fn list() -> Result<Vec<SlotRow>> {
    let admin = identity::caller_can_monitor();
    let me = identity::caller_tenant()?;
    if !admin && me.is_none() {
        return Ok(Vec::new());
    }
    let snapshot: Vec<Slot> = match Locked::shared() {
        Some(mut l) => l
            .t()
            .slots
            .iter()
            .filter(|s| s.state != shmem::FREE && s.database == shmem::my_database())
            .copied()
            .collect(),
        None => return fallback::list(admin, me),
    };
    Ok(snapshot
        .into_iter()
        .filter(|s| admin || me.is_some_and(|m| *m.as_bytes() == s.tenant))
        .filter_map(|s| {
            Some((
                Uuid::from_bytes(s.id),
                Uuid::from_bytes(s.tenant),
                s.has_project.then(|| Uuid::from_bytes(s.project)),
                (s.run_id_len > 0).then(|| {
                    String::from_utf8_lossy(&s.run_id[..s.run_id_len as usize]).into_owned()
                }),
                if s.state == LIVE {
                    "live".to_string()
                } else {
                    "revoked".to_string()
                },
                (s.state == REVOKED).then(|| RevokeReason::from_u8(s.reason).as_str().to_string()),
                ts(s.acquired_at)?,
                ts(s.lease_expires),
                ts(s.deadline),
                s.memory_peak,
                s.pid,
            ))
        })
        .collect())
}

/// Slots the caller may see: all for admins, its own for a tenant.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub fn slots() -> TableIterator<
    'static,
    (
        name!(slot_id, Uuid),
        name!(tenant_id, Uuid),
        name!(project_id, Option<Uuid>),
        name!(run_id, Option<String>),
        name!(state, String),
        name!(revoke_reason, Option<String>),
        name!(acquired_at, Ts),
        name!(lease_expires_at, Option<Ts>),
        name!(deadline, Option<Ts>),
        name!(memory_peak_bytes, i64),
        name!(backend_pid, i32),
    ),
> {
    TableIterator::new(list().or_raise())
}

/// Counters of the slot table since the server started.
#[pg_extern(stable, parallel_safe)]
fn slot_stats() -> TableIterator<
    'static,
    (
        name!(preloaded, bool),
        name!(capacity, i64),
        name!(live, i64),
        name!(grants, i64),
        name!(refusals, i64),
        name!(revocations, i64),
        name!(started_at, Option<Ts>),
    ),
> {
    if !identity::caller_can_monitor() {
        LimitsError::forbidden(
            "only monitors and administrators may read slot_stats()",
            "grant meshhook_limits_monitor (or pg_monitor) to the caller",
        )
        .raise();
    }
    let row = match Locked::shared() {
        Some(mut l) => {
            let h = &l.t().header;
            (
                true,
                MAX_SLOTS as i64,
                i64::from(h.live),
                h.grants.load(Ordering::Relaxed) as i64,
                h.refusals() as i64,
                h.revocations() as i64,
                ts(h.started_at),
            )
        }
        None => (false, 0, 0, 0, 0, 0, None),
    };
    TableIterator::once(row)
}
