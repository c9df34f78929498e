//! After a crash or a restart, the claimed slots of a database are rebuilt
//! from its bound queues before anything is claimed there again
//! (`slots::restore` has the why). The first claim_jobs of a database, or
//! the worker's first tick there, does it: every job a bound queue shows
//! running (pg-boss `active`; pgmq read and still invisible) gets its slot
//! with its tenant, project, key and cost, as claim_jobs would have given
//! it, and ends like any claimed slot when its job ends. One backend of the
//! database rebuilds while the others wait for it (`slots::restore::begin`);
//! a rebuild that fails (a queue that cannot be read) marks nothing, and
//! claiming stays refused until one succeeds.
use super::{parse_cost, parse_uuid};
use crate::error::{OrRaise, Result};
use crate::identity;
use crate::slots::claimed::KEY_MAX;
use crate::slots::restore::{self, Running};
use pgrx::prelude::*;

/// Make sure this database's claimed slots were rebuilt since the server
/// started; rebuild them now if not. Cheap once done.
pub fn ensure(c: &pgrx::spi::SpiClient) -> Result<()> {
    if restore::restored() {
        return Ok(());
    }
    c.select("SELECT meshhook_limits._restore_claims()", Some(1), &[])?;
    Ok(())
}

fn rebuild() -> Result<i64> {
    if restore::restored() || !restore::begin()? {
        return Ok(0);
    }
    // However the rebuild ends, this backend no longer holds it (after a
    // success `insert` has marked the database restored).
    pgrx::PgTryBuilder::new(rebuild_now)
        .finally(restore::abandon)
        .execute()
}

fn rebuild_now() -> Result<i64> {
    let jobs = Spi::connect(|c| -> Result<Option<Vec<Running>>> {
        let rows = c.select(
            "SELECT binding_id, job_id, tenant, project, key, cost, lease_micros
               FROM meshhook_limits._claims_to_restore()",
            None,
            &[],
        )?;
        let mut jobs = Vec::new();
        for r in rows {
            let (Some(binding), Some(job)) = (r.get::<i64>(1)?, r.get::<String>(2)?) else {
                continue;
            };
            // As claim_jobs reads a job; one it could not have claimed
            // (no tenant, a bad project or cost) holds no slot.
            let Some(tenant) = r.get::<String>(3)?.as_deref().and_then(parse_uuid) else {
                continue;
            };
            let project = match r.get::<String>(4)?.as_deref().map(parse_uuid) {
                None => None,
                Some(Some(p)) => Some(p),
                Some(None) => continue,
            };
            let key = r.get::<String>(5)?;
            if key
                .as_ref()
                .is_some_and(|k| k.is_empty() || k.len() > KEY_MAX)
            {
                continue;
            }
            let Some(cost) = parse_cost(r.get::<String>(6)?.as_deref()) else {
                continue;
            };
            jobs.push(Running {
                binding,
                job,
                tenant,
                project,
                key,
                cost: cost as u32,
                lease_micros: r.get::<i64>(7)?,
            });
        }
        Ok(Some(jobs))
    })?;
    let Some(jobs) = jobs else {
        return Ok(0);
    };
    let (made, no_room) = restore::insert(&jobs)?;
    if no_room > 0 {
        pgrx::warning!(
            "meshhook_limits: {no_room} running claimed jobs got no slot after the restart (past their \
             tenant's meshhook_limits.tenant_slot_ceiling, half the slot table of {} for one database, \
             or a full table); they are not counted against their limits",
            crate::slots::table::MAX_SLOTS
        );
    }
    if made > 0 {
        pgrx::log!("meshhook_limits: rebuilt {made} claimed slots from the bound queues");
    }
    Ok(made as i64)
}

/// `_restore_claims()`: rebuild this database's claimed slots from its bound
/// queues if that was not done since the server started; how many slots it
/// made. claim_jobs and tick() call it; admins only (it reads the queue
/// tables as their owners, through `_claims_to_restore`).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _restore_claims() -> i64 {
    identity::require_admin("claim jobs").or_raise();
    if !crate::slots::table::available() {
        return 0;
    }
    rebuild().or_raise()
}
