//! Which tenant claim_jobs serves next, as the slot table sees it: each
//! competing tenant's share (its `fair_share_weight`, and whether its own
//! limit leaves room), its fair-share start tag (`fair`), and the tenants
//! whose slots ended (`freed`).
use super::counters::CounterKey;
use super::table::LockedTable;
use crate::error::{LimitsError, Result};
use crate::limits;
use crate::shmem;
use pgrx::datum::Uuid;
use pgrx::prelude::*;

/// One competing tenant: its `fair_share_weight` (default 1), and whether
/// its own limit leaves room for a job of cost 1.
pub struct Share {
    pub weight: f64,
    pub has_room: bool,
}

/// The cost each tenant runs now (all its slots of this database) and its
/// share.
pub(super) fn shares_with(
    lims: &[limits::TenantShareLimits],
    tenants: &[Uuid],
) -> Result<Vec<(i64, Share)>> {
    let ceiling = crate::gucs::tenant_slot_ceiling();
    let db = shmem::my_database();
    let mut locked = LockedTable::shared().ok_or(LimitsError::NotPreloaded)?;
    Ok(tenants
        .iter()
        .zip(lims)
        .map(|(t, lim)| {
            let in_use = i64::from(locked.table().count(&CounterKey::tenant(db, t.as_bytes())));
            let cap = lim.tenant_cap.map_or(ceiling, |c| c.min(ceiling));
            let share = Share {
                weight: lim.weight.unwrap_or(1.0),
                has_room: in_use < cap,
            };
            (in_use, share)
        })
        .collect())
}

/// The start tag of each tenant's next claim (`fair`; claim_jobs serves
/// the least first), as the claims made so far left them, and when its last
/// claim was made (0: not lately); all 0 without shared memory.
pub fn starts(tenants: &[Uuid]) -> Vec<(f64, i64)> {
    let db = shmem::my_database();
    let Some(mut locked) = LockedTable::shared() else {
        return vec![(0.0, 0); tenants.len()];
    };
    let starts = locked
        .table()
        .fair
        .starts(db, tenants.iter().map(|t| t.as_bytes()));
    starts
}

/// Where the ring of tenants whose slots ended is now (`freed`).
pub fn freed_mark() -> u64 {
    LockedTable::shared().map_or(0, |mut locked| locked.table().freed.now())
}

/// The tenants of this database whose slots ended since `mark`, and the new
/// mark; None when any tenant may have (more than the ring keeps ended).
pub fn freed_since(mark: u64) -> (Option<Vec<[u8; 16]>>, u64) {
    let db = shmem::my_database();
    match LockedTable::shared() {
        Some(mut locked) => locked.table().freed.since(mark, db),
        None => (Some(Vec::new()), mark),
    }
}

/// The shares of these tenants: from this backend's cached limits, or
/// through `_claim_shares` (`claimed`), which loads them.
pub fn shares(tenants: &[Uuid]) -> Result<Vec<Share>> {
    if let Some(lims) = limits::cached_tenant_shares(tenants) {
        return Ok(shares_with(&lims, tenants)?
            .into_iter()
            .map(|(_, s)| s)
            .collect());
    }
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT weight, has_room FROM meshhook_limits._claim_shares($1)",
            None,
            &[tenants.to_vec().into()],
        )?;
        rows.into_iter()
            .map(|r| {
                Ok(Share {
                    weight: r.get::<f64>(1)?.unwrap_or(1.0),
                    has_room: r.get::<bool>(2)?.unwrap_or(false),
                })
            })
            .collect()
    })
}
