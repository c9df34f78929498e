//! Whether a slot is granted (`acquire`), for acquire_execution_slot (one
//! slot) and claim_jobs (a job's cost and key), a step at a time: the
//! arguments; the table fallback without shared memory; the limits that
//! apply (`checks_that_apply`); then, under one exclusive lock of the table
//! so that no interleaving of callers over-admits, the restart grace
//! (`restart_grace_end`), room under every limit (`in_use`, reclaiming the
//! tenant's expired slots before refusing), an earlier waiter's turn
//! (`wait`), and the slot taken (`take_slot`); last, the answer
//! (`granted`). A refusal's retry_after comes from `admission`.
use super::admission::{count_refusal, grace_left, retry_after, Admission};
use super::clock::{now, ts};
use super::counters::{self, CounterKey};
use super::entries::NewSlot;
use super::slot_id::{random_slot_id, with_index};
use super::table::{self, LockedTable, Slot, Table, MAX_SLOTS, RUN_ID_MAX};
use super::xact::{self, Op};
use super::{fallback, grace, wait};
use crate::error::{LimitsError, Result};
use crate::identity;
use crate::limits::{self, Mode, SlotLimits};
use crate::shmem;
use pgrx::datum::{Interval, Uuid};
use pgrx::pg_sys;
use std::sync::atomic::Ordering;

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
/// no limit), and the refusal reason when it is full.
struct Check {
    key: CounterKey,
    cap: Option<i64>,
    reason: &'static str,
}

impl Check {
    /// Whether live slot `s` counts under this limit (for retry_after).
    fn counts(&self, s: &Slot) -> bool {
        let k = &self.key;
        let of_tenant = s.database == k.database && s.tenant == k.tenant;
        match k.kind {
            counters::KIND_TENANT => of_tenant,
            counters::KIND_PROJECT => of_tenant && s.has_project && s.project == k.project,
            counters::KIND_KEY => of_tenant && s.has_key && s.key == k.project,
            // KIND_TOTAL: every slot of the database.
            _ => s.database == k.database,
        }
    }
}

/// See `limits::Mode`: on the fast path, None whenever an answer would need
/// SQL (limits not cached in this backend, no shared memory).
pub(super) fn acquire(
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
    let run_id = checked_run_id(run_id)?;
    let lease_micros = lease_micros(lease)?;
    identity::require_act_for(tenant)?;
    crate::error::refuse_on_standby("acquire_execution_slot")?;
    if !table::available() {
        return acquire_without_table(tenant, project, run_id, lease_micros, demand, mode);
    }
    let Some(lim) = limits_that_apply(tenant, project, demand.key, mode)? else {
        return Ok(None);
    };
    let now = now();
    let db = shmem::my_database();
    let t = *tenant.as_bytes();
    let p = project.map(|p| *p.as_bytes());
    let k = demand.key.map(counters::key_digest);
    let checks = checks_that_apply(&lim, db, &t, p.as_ref(), k.as_ref());
    let cost = i64::from(demand.cost);
    let new = NewSlot {
        // Its index goes in when the entry is taken (`take_slot`).
        id: random_slot_id()?,
        database: db,
        tenant: t,
        project: p,
        key: k,
        cost: demand.cost,
        claim: demand.claim,
        xid: unsafe { u32::from(pg_sys::GetTopTransactionIdIfAny()) },
        now,
        lease_micros,
        deadline: lim.exec_micros.map_or(i64::MAX, |m| now.saturating_add(m)),
        memory_limit: lim.memory_bytes.unwrap_or(-1),
        run_id,
    };

    let mut locked = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
    if let Some(grace_end) = restart_grace_end(locked.table(), db, demand, now) {
        drop(locked);
        return Ok(Some(refuse_in_grace(
            grace_end,
            now,
            demand,
            lim.tenant_cap,
        )));
    }
    let used = in_use(locked.table(), &checks, cost, (db, &t), now);
    if let Some((i, end)) = full_check(locked.table(), &checks, &used, cost) {
        drop(locked);
        let c = &checks[i];
        return Ok(Some(refuse(
            c.reason,
            used[i],
            c.cap,
            retry_after(end, now),
        )));
    }
    // Room: unless an earlier waiter goes first (see `wait`).
    let total_capped = lim.total_cap.is_some();
    if let Some(reason) = wait::current().and_then(|w| wait::defer(locked.table(), w, total_capped))
    {
        drop(locked);
        let tenant_cap = checks[0].cap;
        return Ok(Some(refuse(
            reason,
            used[0],
            tenant_cap,
            retry_after(Some(now), now),
        )));
    }
    let (idx, slot) = take_slot(locked.table(), new, demand.picked_at, lim.weight)?;
    drop(locked);
    xact::push(idx, slot.id, Op::Acquire);
    Ok(Some(granted(&checks, &used, cost, &slot)))
}

/// The run id asked for ("" for none), at most `RUN_ID_MAX` bytes.
fn checked_run_id(run_id: Option<&str>) -> Result<&str> {
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
    Ok(run_id)
}

fn interval_micros(i: &Interval, what: &str) -> Result<i64> {
    let total = i.as_micros();
    // Months are taken as 30 days, as PostgreSQL's own interval comparison does.
    i64::try_from(total).map_err(|_| LimitsError::invalid(format!("{what} is out of range"), ""))
}

/// The lease in microseconds: `lease` (1 second to max_lease), or the
/// session's default_lease, never past max_lease.
fn lease_micros(lease: Option<Interval>) -> Result<i64> {
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
    Ok(lease_micros.min(crate::gucs::max_lease_micros()))
}

/// Without shared memory: the fast path hands over to the definer, which
/// keeps one-unit slots without a concurrency key in the fallback table.
fn acquire_without_table(
    tenant: Uuid,
    project: Option<Uuid>,
    run_id: &str,
    lease_micros: i64,
    demand: &Demand,
    mode: Mode,
) -> Result<Option<Admission>> {
    if mode == Mode::FastPath {
        return Ok(None);
    }
    if demand.key.is_some() || demand.cost != 1 {
        return Err(LimitsError::NotPreloaded);
    }
    fallback::acquire(tenant, project, run_id, lease_micros).map(Some)
}

/// The caller's limits: loaded by the definer; on the fast path, from this
/// backend's cache (None when they are not there).
fn limits_that_apply(
    tenant: Uuid,
    project: Option<Uuid>,
    key: Option<&str>,
    mode: Mode,
) -> Result<Option<SlotLimits>> {
    if mode == Mode::Definer {
        return limits::slot_limits(tenant, project, key).map(Some);
    }
    Ok(limits::cached_slot_limits(tenant, project, key))
}

/// The limits a slot is admitted under, in the order a refusal names them
/// (the most specific holder first): the tenant, its project and its
/// concurrency key when it has them, the database's total. No tenant holds
/// more than the server's share, whatever its own limit (or none): the
/// table stays open to the others.
fn checks_that_apply(
    lim: &SlotLimits,
    db: u32,
    t: &[u8; 16],
    p: Option<&[u8; 16]>,
    k: Option<&[u8; 16]>,
) -> Vec<Check> {
    let ceiling = crate::gucs::tenant_slot_ceiling();
    let mut checks = vec![Check {
        key: CounterKey::tenant(db, t),
        cap: Some(lim.tenant_cap.map_or(ceiling, |c| c.min(ceiling))),
        reason: "tenant_limit",
    }];
    if let Some(p) = p {
        checks.push(Check {
            key: CounterKey::project(db, t, p),
            cap: lim.project_cap,
            reason: "project_limit",
        });
    }
    if let Some(k) = k {
        checks.push(Check {
            key: CounterKey::key(db, t, k),
            cap: lim.key_cap,
            reason: "key_limit",
        });
    }
    checks.push(Check {
        key: CounterKey::total(db),
        cap: lim.total_cap,
        reason: "total_limit",
    });
    checks
}

/// Under the lock: when the restart grace (`grace`) refuses this demand,
/// the grace's end. A claim waits only until its database's claimed slots
/// are rebuilt from the queues (`restore`); other slots wait for the whole
/// grace. A database whose extension is newer than the start has no
/// holders from before it.
fn restart_grace_end(t: &mut Table, db: u32, demand: &Demand, now: i64) -> Option<i64> {
    let grace_end = grace::grace_end(t, now);
    let claims_restored = demand.claim.is_some() && t.restored(db);
    (now < grace_end && !claims_restored && !t.created(db)).then_some(grace_end)
}

/// The refusal in the restart grace (reason `recovering`, retry_after the
/// time left), with a NOTICE that says why unless it is a waiter's or a
/// claim's.
fn refuse_in_grace(grace_end: i64, now: i64, demand: &Demand, cap: Option<i64>) -> Admission {
    if wait::current().is_none() && demand.claim.is_none() {
        grace::notice_refused(grace_end, now);
    }
    refuse("recovering", 0, cap, grace_left(grace_end, now))
}

/// Under the lock: what each check counts now. When `cost` more would
/// overfill one, this tenant's abandoned slots (lease or deadline passed)
/// are reclaimed before refusing, and counted again.
fn in_use(
    t: &mut Table,
    checks: &[Check],
    cost: i64,
    (db, tenant): (u32, &[u8; 16]),
    now: i64,
) -> Vec<i64> {
    let count =
        |t: &Table| -> Vec<i64> { checks.iter().map(|c| i64::from(t.count(&c.key))).collect() };
    let used = count(t);
    if first_full(checks, &used, cost).is_some() && t.reap(now, Some((db, tenant))) > 0 {
        return count(t);
    }
    used
}

/// The first check (the most specific) that `cost` more would overfill.
fn first_full(checks: &[Check], used: &[i64], cost: i64) -> Option<usize> {
    checks
        .iter()
        .zip(used)
        .position(|(c, u)| c.cap.is_some_and(|cap| u + cost > cap))
}

/// Under the lock: the first full check and when the earliest slot counting
/// under it ends (for retry_after); a waiter notes why it was refused
/// (`wait`).
fn full_check(
    t: &mut Table,
    checks: &[Check],
    used: &[i64],
    cost: i64,
) -> Option<(usize, Option<i64>)> {
    let i = first_full(checks, used, cost)?;
    let c = &checks[i];
    if let Some(w) = wait::current() {
        wait::note_refusal(t, w, c.reason);
    }
    Some((i, t.earliest_end(|s| c.counts(s))))
}

/// A refusal, counted now unless it is a waiter's: a waiter's tries are
/// counted once, when it stops waiting (`wait`).
fn refuse(reason: &str, in_use: i64, limit: Option<i64>, retry: Interval) -> Admission {
    if wait::current().is_none() {
        count_refusal(reason);
    }
    Admission::refused(reason, in_use, limit, retry)
}

/// Under the lock, with room: a free entry (`Table::allocate`) made this
/// backend's live slot under its id and index; a claim's cost charged to
/// its tenant's fair share (`fair`); the grant counted.
fn take_slot(
    t: &mut Table,
    mut new: NewSlot,
    picked_at: Option<f64>,
    weight: Option<f64>,
) -> Result<(usize, Slot)> {
    let idx = t
        .allocate(new.now)
        .ok_or(LimitsError::SlotTableFull(MAX_SLOTS))?;
    new.id = with_index(new.id, idx);
    let slot = t.put_live(idx, &new);
    if new.claim.is_some() {
        // Claimed cost is what fair share divides (`fair`).
        let weight = weight.unwrap_or(1.0);
        t.fair.charge(
            new.database,
            &new.tenant,
            new.cost,
            weight,
            picked_at,
            new.now,
        );
    }
    t.header.grants.fetch_add(1, Ordering::Relaxed);
    Ok((idx, slot))
}

/// The answer to a grant: the limit with the least room left (the tenant's
/// on a tie), and the slot's deadline and lease.
fn granted(checks: &[Check], used: &[i64], cost: i64, slot: &Slot) -> Admission {
    let (in_use, limit) = checks
        .iter()
        .zip(used)
        .filter_map(|(c, u)| c.cap.map(|cap| (u + cost, cap)))
        .min_by_key(|(u, cap)| cap - u)
        .map_or((used[0] + cost, None), |(u, cap)| (u, Some(cap)));
    Admission {
        granted: true,
        slot_id: Some(Uuid::from_bytes(slot.id)),
        reason: Some("granted".into()),
        in_use: Some(in_use),
        limit_value: limit,
        deadline: ts(slot.deadline),
        lease_expires_at: ts(slot.lease_expires),
        retry_after: None,
    }
}
