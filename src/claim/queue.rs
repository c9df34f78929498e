//! claim_jobs' side of the queue: the binding it claims through and the
//! statements built for it (sql/claim.sql's `_claim_queries`: the skip scan
//! over the tenants with a job due, a tenant's next job, and what the
//! queue's own fetch does to the jobs it takes), prepared once per backend
//! and binding and run as the queue table's owner in a security-restricted
//! operation (`owner::as_owner`).
use super::key::parse_uuid;
use super::runqueue::RunQueue;
use super::{invalid_job, trust, Ts};
use crate::error::{LimitsError, Result};
use crate::owner::as_owner;
use pgrx::datum::{Interval, Uuid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;

/// While it lives, the planner walks the claim index whatever statistics
/// it has when one of the binding's statements is planned (a queue that
/// just filled up looks empty to it, and a plan through pg-boss's
/// (name, start_after) index and a sort reads every waiting job of the
/// queue on every claim): sorts, sequential and bitmap scans (and JIT) are
/// off, and the plan is the generic one (a custom plan per execution was
/// an eighth of a claim's time, for the same plan). Only around the
/// binding's own statements: the SQL of the limits must keep the planner's
/// usual choices.
pub(super) struct ClaimIndexOnly {
    nest: i32,
}

impl ClaimIndexOnly {
    pub(super) fn new() -> Self {
        let nest = unsafe { pg_sys::NewGUCNestLevel() };
        // And no JIT: the disabled paths' costs would pass jit_above_cost
        // and compile each claim's statements (~10 ms) for a few rows.
        for (name, value) in [
            (c"enable_sort", c"off"),
            // (An incremental sort would read a tenant's every job to order
            // them by when they are due.)
            (c"enable_incremental_sort", c"off"),
            (c"enable_seqscan", c"off"),
            (c"enable_bitmapscan", c"off"),
            (c"jit", c"off"),
            (c"plan_cache_mode", c"force_generic_plan"),
        ] {
            unsafe {
                pg_sys::set_config_option(
                    name.as_ptr(),
                    value.as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
        }
        ClaimIndexOnly { nest }
    }
}

impl Drop for ClaimIndexOnly {
    fn drop(&mut self) {
        unsafe { pg_sys::AtEOXact_GUC(true, self.nest) };
    }
}

/// A binding as claim_jobs needs it; `shape` is everything its statements
/// are built from, so a re-bound queue gets new statements.
pub(super) struct Binding {
    pub(super) id: i64,
    pub(super) pgmq: bool,
    pub(super) shape: String,
    /// The queue table's owner, whom its statements run as.
    pub(super) owner: pg_sys::Oid,
}

/// A tenant the skip scan found: its id, as the JSON spells it, and since
/// when its first job has been due.
pub(super) struct Found {
    pub(super) id: Uuid,
    pub(super) spelling: String,
    pub(super) at: Ts,
}

pub(super) struct Plans {
    pub(super) shape: String,
    /// The queue ("source queue") the binding is of: a binding of it made
    /// since (unbound and bound again, or a queue dropped and made again)
    /// replaces this one's plans and run queue.
    pub(super) queue: String,
    pub(super) tenants: OwnedPreparedStatement,
    pub(super) head: OwnedPreparedStatement,
    pub(super) take: OwnedPreparedStatement,
    /// The tenants with a job due, from an index on when jobs are due
    /// (pg-boss: the binding's `_at`; pgmq: the queue's on `vt`; None: the
    /// queue has no such index).
    pub(super) due: Option<OwnedPreparedStatement>,
    /// The tenants with a job due, in the order claim_jobs serves them.
    pub(super) run: RunQueue,
}

thread_local! {
    pub(super) static PLANS: RefCell<HashMap<i64, Plans>> = RefCell::new(HashMap::new());
    static BINDING: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

// The shape has pg-boss's schema too (12 has columns 11 has not, and a
// queue migrated from 11 to 12 needs 12's statements) and the table's name
// (the statements name it: a renamed table gets statements that do).
const BINDING_Q: &str =
    "SELECT b.id, b.source, pg_catalog.concat_ws('|', b.source, b.queue, b.tenant_path,
        b.project_path, b.key_path, b.cost_path, b.relation::oid, b.relation::text,
        (SELECT count(*) FROM pg_catalog.pg_attribute a
          WHERE a.attrelid = b.relation AND a.attname = 'blocked' AND NOT a.attisdropped)),
        (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = b.relation),
        b.relation::oid
   FROM meshhook_limits._queue_binding($1, $2) b";

pub(super) fn binding(c: &SpiClient, source: &str, queue: &str) -> Result<Binding> {
    // Prepared once per backend (parsing it cost a fifth of a claim of 10);
    // _queue_binding still runs, and checks the caller, on every call.
    let fresh = BINDING.with(|q| q.borrow().is_none());
    if fresh {
        let text = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
        let prepared = c.prepare(BINDING_Q, &[text, text])?.keep();
        BINDING.with(|q| *q.borrow_mut() = Some(prepared));
    }
    let rows = BINDING.with(|q| -> Result<_> {
        let q = q.borrow();
        let q = q.as_ref().ok_or(LimitsError::NotPreloaded)?;
        Ok(c.select(q, Some(1), &[source.into(), queue.into()])?)
    })?;
    let r = rows.into_iter().next().ok_or(LimitsError::NotPreloaded)?;
    // May this role claim from it, and trust its owners? (`trust`)
    let relation = r.get::<pg_sys::Oid>(5)?.ok_or(LimitsError::NotPreloaded)?;
    trust::check(c, relation, source, queue)?;
    Ok(Binding {
        id: r.get::<i64>(1)?.unwrap_or(0),
        pgmq: r.get::<String>(2)?.as_deref() == Some("pgmq"),
        shape: r.get::<String>(3)?.unwrap_or_default(),
        owner: r.get::<pg_sys::Oid>(4)?.ok_or(LimitsError::NotPreloaded)?,
    })
}

pub(super) fn prepare(c: &SpiClient, b: &Binding, queue: String) -> Result<Plans> {
    let rows = c.select(
        "SELECT tenants_q, head_q, take_q, due_q FROM meshhook_limits._claim_queries($1)",
        Some(1),
        &[b.id.into()],
    )?;
    let r = rows.into_iter().next().ok_or(LimitsError::NotPreloaded)?;
    let text = |i| -> Result<String> { Ok(r.get::<String>(i)?.unwrap_or_default()) };
    let (tenants_q, head_q, take_q) = (text(1)?, text(2)?, text(3)?);
    let due_q = r.get::<String>(4)?;
    let int4_oid = PgOid::BuiltIn(pg_sys::BuiltinOid::INT4OID);
    let text_oid = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTOID);
    let texts_oid = PgOid::BuiltIn(pg_sys::BuiltinOid::TEXTARRAYOID);
    let take_args: &[PgOid] = if b.pgmq {
        &[texts_oid, PgOid::BuiltIn(pg_sys::BuiltinOid::INTERVALOID)]
    } else {
        &[texts_oid]
    };
    Ok(Plans {
        shape: b.shape.clone(),
        queue,
        tenants: c.prepare(tenants_q.as_str(), &[text_oid, int4_oid])?.keep(),
        head: c
            .prepare_mut(head_q.as_str(), &[text_oid, texts_oid])?
            .keep(),
        take: c.prepare_mut(take_q.as_str(), take_args)?.keep(),
        due: match due_q {
            Some(q) => Some(c.prepare(q.as_str(), &[int4_oid])?.keep()),
            None => None,
        },
        run: RunQueue::new(b.id),
    })
}

/// The statements that find the tenants with a job due, and whom they run as.
pub(super) struct Finders<'a> {
    pub(super) owner: pg_sys::Oid,
    pub(super) tenants: &'a OwnedPreparedStatement,
    pub(super) due: Option<&'a OwnedPreparedStatement>,
}

/// The run queue, given the next chunk of the skip scan over the binding's
/// `_due` index (one probe per tenant with waiting jobs) when one is due,
/// or else its tenants' limits (`runqueue`). A new pass first reads the
/// jobs due from an index on when they are due (`due_tenants`), bounded
/// by what the last pass cost (`pass::Pass::due_read_limit`).
pub(super) fn refresh(c: &SpiClient, f: &Finders, run: &mut RunQueue) -> Result<()> {
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let Some(after) = run.chunk_due(now) else {
        return run.load_limits();
    };
    // (A new pass only: the read stands for a whole pass, and its backoff
    // counts passes.)
    let most = match (after.is_empty(), f.due) {
        (true, Some(due)) => run.pass.due_read_limit().map(|most| (due, most)),
        _ => None,
    };
    if let Some((due, most)) = most {
        match due_tenants(c, f.owner, due, most)? {
            Some(found) => {
                run.merge_due(found, now);
                return Ok(());
            }
            None => run.pass.due_read_missed(),
        }
    }
    scan_chunk(c, f, run, &after, now)
}

/// The next chunk of the current pass, now: a call whose run queue ran
/// empty mid-pass looks further.
pub(super) fn scan_on(c: &SpiClient, f: &Finders, run: &mut RunQueue) -> Result<bool> {
    let Some(after) = run.pass.mid_pass() else {
        return Ok(false);
    };
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    scan_chunk(c, f, run, &after, now)?;
    Ok(true)
}

fn scan_chunk(c: &SpiClient, f: &Finders, run: &mut RunQueue, after: &str, now: i64) -> Result<()> {
    let chunk = waiting_tenants(c, f.owner, f.tenants, after)?;
    run.merge(chunk, now);
    Ok(())
}

/// The tenants with a job due, from one read of at most `most` due jobs in
/// the order they became due (an index on it); None when
/// there were as many (more may be due: the skip scan is needed).
fn due_tenants(
    c: &SpiClient,
    owner: pg_sys::Oid,
    due: &OwnedPreparedStatement,
    most: i32,
) -> Result<Option<Vec<Found>>> {
    let read = {
        let _pinned = ClaimIndexOnly::new();
        as_owner(owner, || c.select(due, None, &[most.into()]))?
    };
    let (mut found, mut jobs) = (Vec::new(), 0i64);
    for r in read {
        jobs += r.get::<i64>(3)?.unwrap_or(0);
        push_found(&mut found, r.get::<String>(1)?, r.get::<Ts>(2)?)?;
    }
    Ok((jobs < i64::from(most)).then_some(found))
}

/// A tenant found with a job due since `at`, as its jobs spell it; no
/// tenant, or not a tenant id: those jobs are never claimed (counted once a
/// pass).
fn push_found(found: &mut Vec<Found>, key: Option<String>, at: Option<Ts>) -> Result<()> {
    match key.as_deref().map(parse_uuid) {
        Some(Some(id)) => found.push(Found {
            id,
            spelling: key.unwrap_or_default(),
            at: at.ok_or(LimitsError::NotPreloaded)?,
        }),
        _ => invalid_job(),
    }
    Ok(())
}

/// One chunk of the skip scan: the tenants with a job due among the next
/// `SCAN_CHUNK` tenants with waiting jobs after `after`.
pub(super) struct Chunk {
    pub(super) after: String,
    pub(super) found: Vec<Found>,
    /// The last tenant the chunk probed (due or not), unless the chunk
    /// reached the end of the index.
    pub(super) last: Option<String>,
    /// The tenants it probed.
    pub(super) probed: usize,
}

/// Tenants one chunk of the skip scan probes at most (about 3 µs each).
pub(super) const SCAN_CHUNK: usize = 4096;

/// A chunk of the tenants with a job due (and, in the first chunk, the
/// jobs without a tenant counted).
fn waiting_tenants(
    c: &SpiClient,
    owner: pg_sys::Oid,
    tenants: &OwnedPreparedStatement,
    after: &str,
) -> Result<Chunk> {
    let mut found = Vec::new();
    let scanned = {
        let _pinned = ClaimIndexOnly::new();
        let most = SCAN_CHUNK as i32;
        as_owner(owner, || {
            c.select(tenants, None, &[after.into(), most.into()])
        })?
    };
    let (mut probed, mut last) = (0, None);
    for r in scanned {
        let key = r.get::<String>(1)?;
        if let Some(k) = &key {
            probed += 1;
            last = Some(k.clone());
        }
        // A tenant none of whose jobs is due yet (deferred, or held by a
        // flow): not a contender, and its jobs are not walked.
        if key.is_some() && r.get::<bool>(3)? != Some(true) {
            continue;
        }
        push_found(&mut found, key, r.get::<Ts>(2)?)?;
    }
    Ok(Chunk {
        after: after.to_owned(),
        found,
        last: last.filter(|_| probed >= SCAN_CHUNK),
        probed,
    })
}

/// What the queue's own fetch does to the jobs it takes.
pub(super) fn take(
    c: &mut SpiClient,
    b: &Binding,
    statement: &OwnedPreparedStatement,
    ids: Vec<&str>,
    vt: Option<Interval>,
) -> Result<()> {
    let args: Vec<pgrx::datum::DatumWithOid> = match vt {
        Some(vt) => vec![ids.into(), vt.into()],
        None => vec![ids.into()],
    };
    let _pinned = ClaimIndexOnly::new();
    as_owner(b.owner, || c.update(statement, None, &args))?;
    Ok(())
}
