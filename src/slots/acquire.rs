//! Whether a slot is granted (`acquire`), for acquire_execution_slot (one
//! slot) and claim_jobs (a job's cost and key).
use super::admission::{count_refusal, retry_after, Admission};
use super::clock::{now, ts};
use super::counters::{self, CounterKey};
use super::entries;
use super::slot_id::{random_slot_id, with_index};
use super::table::{self, LockedTable, Slot, MAX_SLOTS, RUN_ID_MAX};
use super::xact::{self, Op};
use super::{fallback, grace, wait};
use crate::error::{LimitsError, Result};
use crate::identity;
use crate::limits::{self, Mode};
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
/// no limit), the refusal reason when it is full, and which live slots count
/// under it (for retry_after).
struct Check<'a> {
    key: CounterKey,
    cap: Option<i64>,
    reason: &'static str,
    counts: &'a dyn Fn(&Slot) -> bool,
}

fn interval_micros(i: &Interval, what: &str) -> Result<i64> {
    let total = i.as_micros();
    // Months are taken as 30 days, as PostgreSQL's own interval comparison does.
    i64::try_from(total).map_err(|_| LimitsError::invalid(format!("{what} is out of range"), ""))
}

/// A refusal, counted now unless it is a waiter's.
fn refuse(reason: &str, in_use: i64, limit: Option<i64>, retry: Interval) -> Admission {
    // A waiter's tries are counted once, when it stops waiting.
    if wait::current().is_none() {
        count_refusal(reason);
    }
    Admission::refused(reason, in_use, limit, retry)
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
        let left = super::admission::grace_left(grace_end, now);
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
