//! What the slot table holds, for callers and monitors: live counts,
//! the slots themselves, and the table's counters. Without shared memory the
//! slots are the rows of `meshhook_limits.fallback_slots` (see `fallback`).
// The row types of the SQL functions are spelt out in their signatures.
#![allow(clippy::type_complexity)]
use super::clock::{ts, Ts};
use super::counters::CounterKey;
use super::fallback;
use super::table::{self, LockedTable, RevokeReason, Slot, LIVE, MAX_SLOTS, REVOKED};
use crate::error::{LimitsError, OrRaise, Result};
use crate::{identity, shmem};
use pgrx::datum::Uuid;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

/// Live slots of a tenant (0 when the library is not preloaded).
#[pg_extern(stable, parallel_safe, strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
pub fn live_slots(tenant_id: Uuid) -> i64 {
    identity::require_read_for(tenant_id).or_raise();
    match LockedTable::shared() {
        Some(mut l) => i64::from(l.table().count(&CounterKey::tenant(
            shmem::my_database(),
            tenant_id.as_bytes(),
        ))),
        None => fallback::live(tenant_id).or_raise(),
    }
}

/// One row of slots().
pub struct SlotListing {
    pub slot_id: Uuid,
    pub tenant_id: Uuid,
    pub project_id: Option<Uuid>,
    pub run_id: Option<String>,
    /// live or revoked.
    pub state: &'static str,
    pub revoke_reason: Option<&'static str>,
    pub acquired_at: Ts,
    pub lease_expires_at: Option<Ts>,
    pub deadline: Option<Ts>,
    pub memory_peak_bytes: i64,
    pub backend_pid: i32,
}

impl SlotListing {
    fn into_row(
        self,
    ) -> (
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
    ) {
        (
            self.slot_id,
            self.tenant_id,
            self.project_id,
            self.run_id,
            self.state.to_string(),
            self.revoke_reason.map(str::to_string),
            self.acquired_at,
            self.lease_expires_at,
            self.deadline,
            self.memory_peak_bytes,
            self.backend_pid,
        )
    }
}

fn list() -> Result<Vec<SlotListing>> {
    let admin = identity::caller_can_monitor();
    let me = identity::caller_tenant()?;
    if !admin && me.is_none() {
        return Ok(Vec::new());
    }
    let snapshot: Vec<Slot> = match LockedTable::shared() {
        Some(mut l) => l
            .table()
            .slots
            .iter()
            .filter(|s| s.state != table::FREE && s.database == shmem::my_database())
            .copied()
            .collect(),
        None => return list_fallback(admin, me),
    };
    Ok(snapshot
        .into_iter()
        .filter(|s| admin || me.is_some_and(|m| *m.as_bytes() == s.tenant))
        .filter_map(|s| {
            Some(SlotListing {
                slot_id: Uuid::from_bytes(s.id),
                tenant_id: Uuid::from_bytes(s.tenant),
                project_id: s.has_project.then(|| Uuid::from_bytes(s.project)),
                run_id: (s.run_id_len > 0).then(|| {
                    String::from_utf8_lossy(&s.run_id[..s.run_id_len as usize]).into_owned()
                }),
                state: if s.state == LIVE { "live" } else { "revoked" },
                revoke_reason: (s.state == REVOKED)
                    .then(|| RevokeReason::from_u8(s.reason).as_str()),
                acquired_at: ts(s.acquired_at)?,
                lease_expires_at: ts(s.lease_expires),
                deadline: ts(s.deadline),
                memory_peak_bytes: s.memory_peak,
                backend_pid: s.pid,
            })
        })
        .collect())
}

/// The rows of `meshhook_limits.fallback_slots` (all live) the caller may see.
fn list_fallback(admin: bool, me: Option<Uuid>) -> Result<Vec<SlotListing>> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT slot_id, tenant_id, project_id, run_id, acquired_at, lease_expires_at, deadline, memory_peak
               FROM meshhook_limits.fallback_slots WHERE $1 OR tenant_id = $2 ORDER BY acquired_at",
            None,
            &[admin.into(), me.into()],
        )?;
        let mut out = Vec::new();
        for r in rows {
            let (Some(id), Some(t), Some(at)) =
                (r.get::<Uuid>(1)?, r.get::<Uuid>(2)?, r.get::<Ts>(5)?)
            else {
                continue;
            };
            out.push(SlotListing {
                slot_id: id,
                tenant_id: t,
                project_id: r.get::<Uuid>(3)?,
                run_id: r.get::<String>(4)?,
                state: "live",
                revoke_reason: None,
                acquired_at: at,
                lease_expires_at: r.get::<Ts>(6)?,
                deadline: r.get::<Ts>(7)?,
                memory_peak_bytes: r.get::<i64>(8)?.unwrap_or(0),
                backend_pid: 0,
            });
        }
        Ok(out)
    })
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
    TableIterator::new(list().or_raise().into_iter().map(SlotListing::into_row))
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
    let row = match LockedTable::shared() {
        Some(mut l) => {
            let h = &l.table().header;
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
