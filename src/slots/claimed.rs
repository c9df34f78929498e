//! The slot side of claim_jobs (sql/claim.sql): a slot for a claimed job,
//! with its concurrency key and cost, and the claimed slots the worker's
//! tick ends with their jobs; and `_claim_shares`, the definer's half of
//! `shares` (which tenant is served next).
//!
//! A claimed job's slot has the run id `claim/<binding id>/<job id>`: that is
//! how the tick finds the job it belongs to (`_claimed_slots`).
// The row types of the SQL functions are spelt out in their signatures.
#![allow(clippy::type_complexity)]
use super::acquire::{acquire, Demand};
use super::admission::Admission;
use super::clock::{now, ts, Ts};
use super::counters::{self, CounterKey};
use super::shares::shares_with;
use super::table::{self, LockedTable, LIVE};
use crate::error::{LimitsError, OrRaise, Result};
use crate::limits::{self, Mode};
use crate::{identity, shmem};
use pgrx::datum::{Interval, Uuid};
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::Ordering;

/// Why claim_jobs passed over a job (metrics label `reason`): the refusal
/// reasons of a slot, then a job whose tenant, project or cost is missing
/// or not valid.
pub const BLOCKED_REASONS: [&str; 6] = [
    "tenant_limit",
    "project_limit",
    "key_limit",
    "total_limit",
    "recovering",
    "invalid_job",
];

/// The largest cost one job may take.
pub const MAX_COST: i32 = 1_000_000;
/// The longest concurrency key, in bytes.
pub const KEY_MAX: usize = 200;

pub const RUN_ID_PREFIX: &str = "claim/";

pub fn count_blocked(reason: &str) {
    count_blocked_jobs(reason, 1);
}

/// `jobs` jobs passed over for `reason`.
pub fn count_blocked_jobs(reason: &str, jobs: u64) {
    if let (Some(h), Some(i)) = (
        table::header(),
        BLOCKED_REASONS.iter().position(|r| *r == reason),
    ) {
        h.claim_blocked_by[i].fetch_add(jobs, Ordering::Relaxed);
    }
}

fn validate(cost: i32, concurrency_key: Option<&str>) -> Result<()> {
    if !(1..=MAX_COST).contains(&cost) {
        return Err(LimitsError::invalid(
            format!("cost must be between 1 and {MAX_COST}, got {cost}"),
            "a job's cost is a whole number of units of each limit",
        ));
    }
    if concurrency_key.is_some_and(|k| k.is_empty() || k.len() > KEY_MAX) {
        return Err(LimitsError::invalid(
            format!("a concurrency key must be 1 to {KEY_MAX} bytes long"),
            "use a short name, such as the upstream API the job calls",
        ));
    }
    Ok(())
}

/// Counts a claim (granted) or a blocked job (refused), once per answer.
fn count(answer: &Admission, cost: i32) {
    if answer.granted {
        if let Some(h) = table::header() {
            h.claims.fetch_add(1, Ordering::Relaxed);
            h.claimed_cost.fetch_add(cost as u64, Ordering::Relaxed);
        }
    } else if let Some(reason) = &answer.reason {
        count_blocked(reason);
    }
}

/// The claim digest of a claim's run id (`claim/<binding>/<job>`).
fn digest_of(run_id: &str) -> Option<[u8; 16]> {
    let (binding, job) = run_id.strip_prefix(RUN_ID_PREFIX)?.split_once('/')?;
    Some(counters::claim_digest(binding.parse().ok()?, job))
}

thread_local! {
    /// The start tag claim_jobs saw when it picked the tenant of the slot
    /// being taken (`take_slot`), for `_claim_slot` too: it runs in this
    /// backend.
    static PICKED_AT: Cell<Option<f64>> = const { Cell::new(None) };
}

fn demand_of<'a>(cost: i32, concurrency_key: Option<&'a str>, run_id: &str) -> Demand<'a> {
    // The slot records its transaction, so the tick can tell a claim still
    // being made from a job that ended (`_claimed_slots`).
    unsafe { pg_sys::GetTopTransactionId() };
    Demand {
        key: concurrency_key,
        cost: cost as u32,
        claim: digest_of(run_id),
        picked_at: PICKED_AT.get(),
    }
}

/// A slot for one claimed job (claim_jobs): `cost` units of the tenant's,
/// the project's, the key's and the total limit, all checked at once. From
/// shared memory and this backend's cached limits when it can; otherwise
/// through `_claim_slot`, which loads them. Counts the claim or the blocked
/// job. `picked_at`: the tenant's start tag when claim_jobs picked it.
pub fn take_slot(
    tenant: Uuid,
    project: Option<Uuid>,
    concurrency_key: Option<&str>,
    cost: i32,
    lease: Option<Interval>,
    run_id: &str,
    picked_at: f64,
) -> Result<Admission> {
    /// Forgets the pick however take_slot ends (an error unwinds past it).
    struct Picked;
    impl Drop for Picked {
        fn drop(&mut self) {
            PICKED_AT.set(None);
        }
    }
    PICKED_AT.set(Some(picked_at));
    let _picked = Picked;
    validate(cost, concurrency_key)?;
    let demand = demand_of(cost, concurrency_key, run_id);
    if let Some(answer) = acquire(
        Some(tenant),
        project,
        Some(run_id),
        lease,
        &demand,
        Mode::FastPath,
    )? {
        count(&answer, cost);
        return Ok(answer);
    }
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT slot_id, reason, lease_expires_at FROM meshhook_limits._claim_slot($1, $2, $3, $4, $5, $6)",
            Some(1),
            &[
                tenant.into(),
                project.into(),
                concurrency_key.into(),
                cost.into(),
                lease.into(),
                run_id.into(),
            ],
        )?;
        let r = rows.into_iter().next().ok_or(LimitsError::NotPreloaded)?;
        let slot_id = r.get::<Uuid>(1)?;
        Ok(Admission {
            granted: slot_id.is_some(),
            slot_id,
            reason: r.get::<String>(2)?,
            lease_expires_at: r.get::<Ts>(3)?,
            ..Admission::default()
        })
    })
}

/// `take_slot` as the extension's owner, loading the limits it needs.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _claim_slot(
    tenant_id: Option<Uuid>,
    project_id: Option<Uuid>,
    concurrency_key: Option<&str>,
    cost: Option<i32>,
    lease: Option<Interval>,
    run_id: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(slot_id, Option<Uuid>),
        name!(reason, Option<String>),
        name!(lease_expires_at, Option<Ts>),
    ),
> {
    identity::require_admin("claim jobs").or_raise();
    let cost = cost.unwrap_or(1);
    validate(cost, concurrency_key).or_raise();
    let demand = demand_of(cost, concurrency_key, run_id.unwrap_or(""));
    let answer = acquire(tenant_id, project_id, run_id, lease, &demand, Mode::Definer)
        .and_then(|a| a.ok_or(LimitsError::NotPreloaded))
        .or_raise();
    count(&answer, cost);
    TableIterator::once((answer.slot_id, answer.reason, answer.lease_expires_at))
}

/// `shares` as the extension's owner, loading the limits it needs; in the
/// order given.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _claim_shares(
    tenants: Option<Vec<Option<Uuid>>>,
) -> TableIterator<
    'static,
    (
        name!(tenant_id, Uuid),
        name!(in_use, i64),
        name!(weight, f64),
        name!(has_room, bool),
    ),
> {
    identity::require_admin("claim jobs").or_raise();
    let tenants: Vec<Uuid> = tenants.unwrap_or_default().into_iter().flatten().collect();
    let lims = limits::tenant_shares(&tenants).or_raise();
    let shares = shares_with(&lims, &tenants).or_raise();
    TableIterator::new(
        tenants
            .into_iter()
            .zip(shares)
            .map(|(t, (in_use, s))| (t, in_use, s.weight, s.has_room)),
    )
}

/// The live claimed slots of this database whose claiming transaction has
/// ended: (slot, binding id, job id, acquired at, tenant, cost), for the
/// tick to end those whose job has ended, and for explain_queues. The job id is the rest of the run id after
/// the binding: `<job id>` for pg-boss, `<msg_id>/<read_ct>` for pgmq.
#[pg_extern(volatile, parallel_unsafe)]
fn _claimed_slots() -> TableIterator<
    'static,
    (
        name!(slot_id, Uuid),
        name!(binding_id, i64),
        name!(job_id, String),
        name!(acquired_at, Ts),
        name!(tenant_id, Uuid),
        name!(cost, i64),
    ),
> {
    let db = shmem::my_database();
    let Some(mut locked) = LockedTable::shared() else {
        return TableIterator::new(Vec::new());
    };
    let live: Vec<_> = locked
        .table()
        .slots
        .iter()
        // Slots claim_jobs took (only they have a claim digest), not any
        // slot whose run id merely looks like a claim's.
        .filter(|s| s.state == LIVE && s.database == db && s.has_claim)
        .filter_map(|s| {
            let run = std::str::from_utf8(&s.run_id[..s.run_id_len as usize]).ok()?;
            let (binding, job) = run.strip_prefix(RUN_ID_PREFIX)?.split_once('/')?;
            Some((
                (
                    Uuid::from_bytes(s.id),
                    binding.parse::<i64>().ok()?,
                    job.to_string(),
                    ts(s.acquired_at)?,
                    Uuid::from_bytes(s.tenant),
                    i64::from(s.cost),
                ),
                s.xid,
            ))
        })
        .collect();
    drop(locked);
    // Outside our lock: this takes the proc array's.
    let ended = live
        .into_iter()
        .filter(|(_, xid)| {
            *xid == 0
                || !unsafe { pg_sys::TransactionIdIsInProgress(pg_sys::TransactionId::from(*xid)) }
        })
        .map(|(row, _)| row)
        .collect::<Vec<_>>();
    TableIterator::new(ended)
}

/// Extend the leases of these live slots of this database by their own
/// lease length, as a heartbeat does: the tick keeps a claimed job's slot
/// while the job runs. Returns how many were extended.
#[pg_extern(volatile, parallel_unsafe)]
fn _renew_slots(slot_ids: Option<Vec<Option<Uuid>>>) -> i64 {
    let ids: Vec<[u8; 16]> = slot_ids
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .map(|u| *u.as_bytes())
        .collect();
    let (now, db) = (now(), shmem::my_database());
    let Some(mut locked) = LockedTable::exclusive() else {
        return 0;
    };
    let mut n = 0;
    for id in &ids {
        let Some(idx) = locked.table().lookup(id) else {
            continue;
        };
        let s = &mut locked.table().slots[idx];
        if s.state == LIVE && s.database == db && now < s.lease_expires {
            s.lease_expires = now.saturating_add(s.lease_micros).min(s.deadline);
            n += 1;
        }
    }
    n
}

pgrx::extension_sql!(
    r#"
REVOKE EXECUTE ON FUNCTION meshhook_limits._claimed_slots() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._renew_slots(uuid[]) FROM PUBLIC;
"#,
    name = "claim_slot_grants",
    requires = [_claimed_slots, _renew_slots]
);

/// The claim counters for metrics(): claims, claimed cost, blocked by reason.
pub fn counters() -> Option<(u64, u64, Vec<(&'static str, u64)>)> {
    let h = table::header()?;
    Some((
        h.claims.load(Ordering::Relaxed),
        h.claimed_cost.load(Ordering::Relaxed),
        BLOCKED_REASONS
            .iter()
            .zip(&h.claim_blocked_by)
            .map(|(r, c)| (*r, c.load(Ordering::Relaxed)))
            .collect(),
    ))
}

/// What a tenant's slot would be counted against now, in cost units: the
/// tenant, the project, the concurrency key and the database's total.
/// For explain_admission (which checks who may read the tenant).
#[pg_extern(volatile, parallel_unsafe)]
fn _slot_counts(
    tenant_id: Option<Uuid>,
    project_id: Option<Uuid>,
    concurrency_key: Option<crate::row::Utf8>,
) -> TableIterator<
    'static,
    (
        name!(tenant_in_use, i64),
        name!(project_in_use, i64),
        name!(key_in_use, i64),
        name!(total_in_use, i64),
    ),
> {
    // A key that is not UTF-8 (a SQL_ASCII database takes any bytes): 22023.
    let concurrency_key = crate::row::utf8(&concurrency_key, "concurrency_key").or_raise();
    let db = shmem::my_database();
    let (Some(tenant_id), Some(mut locked)) = (tenant_id, LockedTable::shared()) else {
        return TableIterator::once((0, 0, 0, 0));
    };
    let t = tenant_id.as_bytes();
    let tb = locked.table();
    let count = |k: CounterKey| i64::from(tb.count(&k));
    let row = (
        count(CounterKey::tenant(db, t)),
        project_id.map_or(0, |p| count(CounterKey::project(db, t, p.as_bytes()))),
        concurrency_key.map_or(0, |k| {
            count(CounterKey::key(db, t, &counters::key_digest(k)))
        }),
        count(CounterKey::total(db)),
    );
    drop(locked);
    TableIterator::once(row)
}

pgrx::extension_sql!(
    r#"
REVOKE EXECUTE ON FUNCTION meshhook_limits._slot_counts(uuid, uuid, text) FROM PUBLIC;
"#,
    name = "claim_count_grants",
    requires = [_slot_counts]
);
