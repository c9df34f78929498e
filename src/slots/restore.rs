//! Claimed slots rebuilt after a restart.
//!
//! Shared memory starts empty after a crash or a restart, but the workers,
//! processes outside PostgreSQL, still run the jobs they claimed: pg-boss
//! keeps them `active`, pgmq keeps them invisible. The queue is the durable
//! record. `crate::claim::restore` reads every bound queue's running jobs
//! and gives each one its claimed slot here, unchecked (the job holds its
//! room already), and marks the database restored (`Table::restored`): from
//! then on its claims are admitted, restart grace or not.
use super::clock::now;
use super::counters;
use super::entries::NewSlot;
use super::slot_id::{random_slot_id, with_index};
use super::table::{LockedTable, MAX_SLOTS, RUN_ID_MAX};
use crate::error::{LimitsError, Result};
use crate::shmem;
use pgrx::datum::Uuid;
use pgrx::pg_sys;
use std::cell::Cell;

/// A job a worker still runs, as its queue shows it.
pub struct Running {
    pub binding: i64,
    /// As a claim's run id spells it after the binding: the pg-boss job id,
    /// or the pgmq `msg_id/read_ct`.
    pub job: String,
    pub tenant: Uuid,
    pub project: Option<Uuid>,
    pub key: Option<String>,
    pub cost: u32,
    /// None: `meshhook_limits.default_lease` (the tick renews it while the
    /// job runs); pgmq: what is left of the visibility timeout.
    pub lease_micros: Option<i64>,
}

thread_local! {
    /// This backend saw its database restored: it stays so for the life of
    /// the process (a backend does not outlive the shared memory it saw).
    static SEEN: Cell<bool> = const { Cell::new(false) };
}

/// The claimed slots of this database have been rebuilt since the server
/// started. A lock-free answer once it is known to be true.
pub fn restored() -> bool {
    if SEEN.get() {
        return true;
    }
    let db = shmem::my_database();
    let done = LockedTable::shared().is_some_and(|mut l| l.table().restored(db));
    SEEN.set(done);
    done
}

/// Take the rebuild of this database: true when this backend is to do it
/// (then `insert` or `abandon` ends it), false when it is done. While another
/// live backend does it, waits for it (a shared-memory mark, not a lock any
/// role could take: an advisory lock would let any session hold claiming up).
pub fn begin() -> Result<bool> {
    let (db, me) = (shmem::my_database(), unsafe { pg_sys::MyProcPid });
    loop {
        let holder = {
            let mut locked = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
            let t = locked.table();
            if t.restored(db) {
                SEEN.set(true);
                return Ok(false);
            }
            match t.restoring(db) {
                None => {
                    t.set_restoring(db, Some(me));
                    return Ok(true);
                }
                Some(pid) if pid == me => return Ok(true),
                Some(pid) => pid,
            }
        };
        // Outside our lock: this takes the proc array's.
        if unsafe { pg_sys::BackendPidGetProc(holder) }.is_null() {
            // It died mid-rebuild: take over.
            let mut locked = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
            if locked.table().restoring(db) == Some(holder) {
                locked.table().set_restoring(db, Some(me));
                return Ok(true);
            }
            continue;
        }
        unsafe { pg_sys::pg_usleep(10_000) };
        pgrx::check_for_interrupts!();
    }
}

/// This backend gives the rebuild up (it failed): another may take it.
pub fn abandon() {
    let (db, me) = (shmem::my_database(), unsafe { pg_sys::MyProcPid });
    if let Some(mut locked) = LockedTable::exclusive() {
        if locked.table().restoring(db) == Some(me) {
            locked.table().set_restoring(db, None);
        }
    }
}

/// Give each running job its claimed slot (those that have one already
/// are left alone) and mark this database restored. Returns how many slots
/// were made, and how many jobs found no free entry in the table.
pub fn insert(jobs: &[Running]) -> Result<(usize, usize)> {
    let db = shmem::my_database();
    let now = now();
    let default_lease = crate::gucs::default_lease_micros();
    // Drawn before the lock, as acquire does.
    let ids = jobs
        .iter()
        .map(|_| random_slot_id())
        .collect::<Result<Vec<_>>>()?;
    // The caps claiming itself has: a tenant's ceiling, and half the table
    // for one database (what an enqueuer writes into a queue could
    // otherwise fill the table for every database); a lease of max_lease.
    let ceiling = u32::try_from(crate::gucs::tenant_slot_ceiling()).unwrap_or(u32::MAX);
    let max_lease = crate::gucs::max_lease_micros();
    let mut per_tenant: std::collections::HashMap<[u8; 16], u32> = Default::default();
    let mut locked = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
    if locked.table().restored(db) {
        return Ok((0, 0));
    }
    let (mut made, mut no_room) = (0, 0);
    for (job, random_id) in jobs.iter().zip(ids) {
        let digest = counters::claim_digest(job.binding, &job.job);
        if locked.table().claimed(db, &digest).is_some() {
            continue;
        }
        let held = per_tenant.entry(*job.tenant.as_bytes()).or_default();
        if *held + job.cost > ceiling || made >= MAX_SLOTS / 2 {
            no_room += 1;
            continue;
        }
        *held += job.cost;
        let run_id = format!(
            "{}{}/{}",
            super::claimed::RUN_ID_PREFIX,
            job.binding,
            job.job
        );
        if run_id.len() > RUN_ID_MAX {
            continue;
        }
        let Some(idx) = locked.table().allocate(now) else {
            no_room += 1;
            continue;
        };
        let lease_micros = job
            .lease_micros
            .unwrap_or(default_lease)
            .clamp(1_000_000, max_lease.max(1_000_000));
        locked.table().put_live(
            idx,
            &NewSlot {
                id: with_index(random_id, idx),
                database: db,
                tenant: *job.tenant.as_bytes(),
                project: job.project.map(|p| *p.as_bytes()),
                key: job.key.as_deref().map(counters::key_digest),
                cost: job.cost,
                claim: Some(digest),
                // No transaction of ours: the tick may end it as soon as the
                // job ends.
                xid: 0,
                now,
                lease_micros,
                // When the job started is the queue's to know; the reaper
                // revokes by lease, which the tick renews only while it runs.
                deadline: i64::MAX,
                memory_limit: -1,
                run_id: &run_id,
            },
        );
        made += 1;
    }
    locked.table().mark_restored(db);
    drop(locked);
    SEEN.set(true);
    Ok((made, no_room))
}
