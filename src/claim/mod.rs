//! claim_jobs: hand a worker the jobs whose every limit has room, with their
//! slots, weighted-fair across tenants (docs/claiming.md).
//!
//! The queue side is SQL (sql/claim*.sql): the binding, and the statements
//! built for it by `_claim_queries` (a skip scan over the claim index for
//! the tenants with waiting jobs, a read of the jobs due for the same when
//! few are, a tenant's next job, and what the queue's own fetch does to the
//! jobs it takes). They are prepared once per backend
//! and binding and kept, so a claim plans nothing. The slot side is
//! `slots::claimed`. This module is the loop between them.
//!
//! claim_jobs runs as its caller (SECURITY INVOKER), an admin worker, but
//! the queue's statements run as the queue table's owner in a
//! security-restricted operation (`owner::as_owner`): the triggers, rules,
//! policies, defaults and index expressions the owner attached run with the
//! owner's rights, never the caller's, and have no meshhook_limits identity.
//! And `binding` refuses (`trust`) the queues whose owners (of the table,
//! its schema, its partitions, the functions in the schema) lack the
//! claimer's privileges: the worker runs their
//! code anyway, with its own rights, when it ends a job with the queue's
//! calls (and a deferred trigger the owner attached fires at commit, as
//! the worker). So the owner's code never gains from a claim: the
//! restricted operation keeps it from the claimer's meshhook_limits
//! identity, and the trust check from rights the owner has not got.
use crate::error::{LimitsError, OrRaise, Result};
use crate::owner::as_owner;
use crate::row::RawJsonb;
use crate::slots::claimed::{self as slot_claim, BLOCKED_REASONS};
use key::{parse_cost, parse_uuid};
use pgrx::datum::{Interval, TimestampWithTimeZone, Uuid};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use queue::{
    binding, prepare, refresh, scan_on, take, Binding, ClaimIndexOnly, Finders, Plans, PLANS,
};
use runqueue::TenantKey;
use std::collections::HashMap;

mod key;
pub(crate) mod pacing;
mod pass;
mod queue;
pub mod restore;
mod runnable;
mod runqueue;
mod trust;

type Ts = TimestampWithTimeZone;

/// Jobs of one tenant one call passes over (its project or key is full, it
/// costs more than the room left, or it is not valid) before the tenant is
/// done for the call.
const PASSED_PER_TENANT: usize = 16;
/// Chunks of the tenant scan a call adds when its run queue runs empty
/// mid-pass (every tenant it holds at its limit, or without a runnable
/// job), before it answers with what it has.
const MORE_CHUNKS_PER_CALL: usize = 3;
/// pgmq's visibility timeout when claim_jobs is given no lease.
const PGMQ_DEFAULT_VT_MICROS: i64 = 30_000_000;
/// What one call did with a tenant it picked.
#[derive(Default)]
struct Visit {
    /// Jobs this call passed over (still waiting) or claimed (taken when
    /// the call ends): the head statement skips them.
    seen: Vec<String>,
    passed: usize,
}

impl Visit {
    /// Leave a job waiting; true when the tenant is done for this call
    /// (past enough of them).
    fn pass(&mut self, job: String) -> bool {
        self.seen.push(job);
        self.passed += 1;
        self.passed >= PASSED_PER_TENANT
    }
}

/// A job as the head statement returns it.
struct Job {
    id: String,
    data: Option<RawJsonb>,
    project: Option<String>,
    key: Option<String>,
    cost: Option<String>,
    /// pgmq: the read_ct the take gives it.
    generation: Option<String>,
    /// Its queue allows one active job per singleton key (pg-boss
    /// policies singleton, stately, exclusive): taken at once, so the next
    /// head statement sees it active.
    one_active: bool,
    /// Its queue time.
    at: Option<Ts>,
    /// pg-boss: its retry_count once taken (pg-boss 12's complete and
    /// touch fence on it); pgmq: the reads before this one.
    retry_count: Option<i32>,
}

impl Job {
    /// The first row of the head statement's answer; its data copied into
    /// `cx` (the memory claim_jobs answers from).
    fn read(r: &pgrx::spi::SpiTupleTable, cx: pg_sys::MemoryContext) -> Result<Job> {
        Ok(Job {
            id: r.get::<String>(1)?.unwrap_or_default(),
            data: RawJsonb::copy(r, 2, cx)?,
            project: r.get::<String>(3)?,
            key: r.get::<String>(4)?,
            cost: r.get::<String>(5)?,
            generation: r.get::<String>(6)?,
            at: r.get::<Ts>(7)?,
            one_active: r.get::<bool>(8)?.unwrap_or(false),
            retry_count: r.get::<i32>(9)?,
        })
    }
}

/// One claimed job: a row of claim_jobs.
type Claimed = (
    String,
    Uuid,
    Option<Uuid>,
    Option<String>,
    Uuid,
    Option<Ts>,
    Option<RawJsonb>,
    Option<i32>,
);

fn invalid_job() {
    slot_claim::count_blocked(BLOCKED_REASONS[5]);
}

fn claim(source: &str, queue: &str, batch: i32, lease: Option<Interval>) -> Result<Vec<Claimed>> {
    if !(1..=1000).contains(&batch) {
        return Err(LimitsError::invalid(
            format!("batch must be between 1 and 1000, got {batch}"),
            "claim up to batch jobs at once; 1 to 1000",
        ));
    }
    if !crate::slots::table::available() {
        return Err(LimitsError::NotPreloaded);
    }
    // The memory claim_jobs answers from (a set-returning function's, for
    // all its calls): the claimed jobs' data is copied there.
    let data_cx = unsafe { pg_sys::CurrentMemoryContext };
    Spi::connect_mut(|c| {
        let b = binding(c, source, queue)?;
        restore::ensure(c)?;
        let fresh = PLANS.with(|p| {
            p.borrow()
                .get(&b.id)
                .is_none_or(|plans| plans.shape != b.shape)
        });
        if fresh {
            let plans = prepare(c, &b, format!("{source} {queue}"))?;
            PLANS.with(|p| {
                let mut p = p.borrow_mut();
                // An older binding of the same queue is gone: its run queue
                // is not kept for the life of the backend.
                p.retain(|id, old| *id == b.id || old.queue != plans.queue);
                p.insert(b.id, plans)
            });
        }
        PLANS.with(|p| {
            let mut plans = p.borrow_mut();
            let plans = plans.get_mut(&b.id).ok_or(LimitsError::NotPreloaded)?;
            claim_with(c, &b, plans, batch as usize, lease, data_cx)
        })
    })
}

fn claim_with(
    c: &mut SpiClient,
    b: &Binding,
    plans: &mut Plans,
    batch: usize,
    lease: Option<Interval>,
    data_cx: pg_sys::MemoryContext,
) -> Result<Vec<Claimed>> {
    // The limits generation the call's refusals were made under (at the
    // latest): a tenant parked under it comes back once it moves.
    let generation = crate::limits::caching_generation();
    let finders = Finders {
        owner: b.owner,
        tenants: &plans.tenants,
        due: plans.due.as_ref(),
    };
    refresh(c, &finders, &mut plans.run)?;
    plans.run.unpark();
    // pgmq: the visibility timeout, which is also the slot's lease.
    let vt = b
        .pgmq
        .then(|| lease.unwrap_or_else(|| Interval::from_micros(PGMQ_DEFAULT_VT_MICROS)));
    let mut claimed = Vec::new();
    // The claimed jobs not taken yet (indexes into claimed).
    let mut pending = Vec::new();
    let mut visits: HashMap<TenantKey, Visit> = HashMap::new();
    // Tenants done for this call, back in the run queue when it ends.
    let mut done = Vec::new();
    let run = &mut plans.run;
    let mut chunks = 0;
    while claimed.len() < batch {
        // The tenant furthest below its share: the least start tag; on a
        // tie, the heavier (its share is the larger), then the one that has
        // waited longest (`runqueue`).
        let Some(tenant) = run.pick()? else {
            // Empty mid-pass: the next chunks, a few at most.
            if chunks < MORE_CHUNKS_PER_CALL && scan_on(c, &finders, run)? {
                chunks += 1;
                continue;
            }
            break;
        };
        let t = run.get_mut(&tenant).ok_or(LimitsError::NotPreloaded)?;
        let visit = visits.entry(tenant).or_default();
        // Its next job, under the spelling whose next job is oldest.
        t.spellings.sort_by_key(|s| s.1);
        let mut found = None;
        while let Some((spelling, _)) = t.spellings.first() {
            let head = {
                let _pinned = ClaimIndexOnly::new();
                let seen: Vec<&str> = visit.seen.iter().map(String::as_str).collect();
                as_owner(b.owner, || {
                    c.update(
                        &plans.head,
                        Some(1),
                        &[spelling.as_str().into(), seen.into()],
                    )
                })?
            };
            let head = head.first();
            if head.is_empty() {
                // Nothing runnable left under it: deferred, or taken by others.
                t.spellings.remove(0);
            } else {
                found = Some(Job::read(&head, data_cx)?);
                break;
            }
        }
        let Some(job) = found else {
            // Out of the run queue until a scan finds it again.
            run.remove(&tenant);
            continue;
        };
        let (id, start) = (t.id, t.start);
        // A project that is not a uuid, a cost that is not a whole number in
        // 1..1000000, or an empty or over-long key: never claimed.
        let project = match job.project.as_deref().map(parse_uuid) {
            None => Some(None),
            Some(parsed) => parsed.map(Some),
        };
        let cost = parse_cost(job.cost.as_deref());
        let key_ok = job
            .key
            .as_ref()
            .is_none_or(|k| !k.is_empty() && k.len() <= slot_claim::KEY_MAX);
        // (The claim index leaves such jobs out of their tenant's range:
        // this is the guard, not the filter.)
        let (Some(project), Some(cost), true) = (project, cost, key_ok) else {
            invalid_job();
            if visit.pass(job.id) {
                done.push(tenant);
            } else {
                run.requeue(tenant);
            }
            continue;
        };
        let mut run_id = format!("{}{}/{}", slot_claim::RUN_ID_PREFIX, b.id, job.id);
        if let Some(g) = &job.generation {
            run_id.push('/');
            run_id.push_str(g);
        }
        let answer = slot_claim::take_slot(
            id,
            project,
            job.key.as_deref(),
            cost,
            vt.or(lease),
            &run_id,
            start,
        )?;
        let Some(slot_id) = answer.slot_id.filter(|_| answer.granted) else {
            let over = visit.pass(job.id);
            match answer.reason.as_deref() {
                // Nobody can be admitted now.
                Some("recovering") => {
                    done.push(tenant);
                    break;
                }
                Some("total_limit") if cost == 1 => {
                    done.push(tenant);
                    break;
                }
                // At its limit: parked until one of its slots ends.
                Some("tenant_limit") if cost == 1 => run.park(tenant, generation),
                // A job of another project or key, or a cheaper one, may
                // still fit: the tenant's next job is tried.
                _ if over => done.push(tenant),
                _ => run.requeue(tenant),
            }
            continue;
        };
        // Taken with the others when the call ends (locked until then).
        if job.one_active {
            take(c, b, &plans.take, vec![job.id.as_str()], vt)?;
        } else {
            pending.push(claimed.len());
        }
        visit.seen.push(job.id.clone());
        // Served: on a tie, it goes after the tenants that waited longer.
        if let Some(at) = job.at {
            if let Some(s) = t.spellings.first_mut() {
                s.1 = at;
            }
        }
        run.requeue(tenant);
        claimed.push((
            job.id,
            id,
            project,
            job.key,
            slot_id,
            answer.lease_expires_at,
            job.data,
            job.retry_count,
        ));
    }
    for tenant in done {
        plans.run.requeue(tenant);
    }
    if !pending.is_empty() {
        let ids: Vec<&str> = pending.iter().map(|&i| claimed[i].0.as_str()).collect();
        take(c, b, &plans.take, ids, vt)?;
    }
    Ok(claimed)
}

/// `claim_jobs(source, queue, batch, lease)`: up to `batch` jobs of a bound
/// queue whose every limit has room, each with its slot, taken as the
/// queue's own fetch takes them (see the module docs and docs/claiming.md).
#[allow(clippy::type_complexity)] // the SQL row type, spelt out
#[pg_extern(volatile, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn claim_jobs(
    source: Option<&str>,
    queue: Option<&str>,
    batch: default!(Option<i32>, 1),
    lease: default!(Option<Interval>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(job_id, String),
        name!(tenant_id, Uuid),
        name!(project_id, Option<Uuid>),
        name!(concurrency_key, Option<String>),
        name!(slot_id, Uuid),
        name!(lease_expires_at, Option<Ts>),
        name!(data, Option<RawJsonb>),
        name!(retry_count, Option<i32>),
    ),
> {
    let rows = match (source, queue, batch) {
        // Between a new library and ALTER EXTENSION UPDATE, the SQL this
        // library calls may be missing: 55000, with what to do.
        (Some(source), Some(queue), Some(batch)) => {
            crate::error::passthrough(|| claim(source, queue, batch, lease))
        }
        (_, _, None) => Err(LimitsError::invalid(
            "batch must be between 1 and 1000, got NULL",
            "claim up to batch jobs at once; 1 to 1000",
        )),
        _ => Err(LimitsError::invalid(
            "source and queue must not be NULL",
            "pass the source ('pgboss' or 'pgmq') and the name of a bound queue",
        )),
    }
    .or_raise();
    TableIterator::new(rows)
}

pgrx::extension_sql!(
    r#"
COMMENT ON FUNCTION meshhook_limits.claim_jobs(text, text, integer, interval) IS
  'Claim up to batch jobs whose every limit has room, fairly across tenants, with their slots; the job is taken as the queue''s own fetch takes it. Runs as the caller (an admin worker). See docs/claiming.md.';
"#,
    name = "claim_jobs_comment",
    requires = [claim_jobs]
);
