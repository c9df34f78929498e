//! Reaping: slots whose lease or deadline has passed are revoked, and every
//! revocation of this database is announced once (slot.revoked).
use super::clock::now;
use super::liveness::emit_revoked;
use super::table::{LockedTable, RevokeReason, Slot, MAX_SLOTS};
use super::xact::{self, Op};
use super::{fallback, table};
use crate::error::{LimitsError, OrRaise, Result};
use crate::{identity, shmem};
use pgrx::prelude::*;

fn reap() -> Result<i64> {
    identity::require_admin("reap execution slots")?;
    if !table::available() {
        return fallback::reap();
    }
    let now = now();
    let mut to_announce: Vec<(usize, Slot)> = Vec::new();
    let n = {
        let mut l = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
        let n = l.table().reap(now, None);
        // Revocations are announced in their own database (its events
        // table, its listeners), by a reaper running there.
        let db = shmem::my_database();
        let pid = unsafe { pg_sys::MyProcPid };
        for idx in 0..MAX_SLOTS {
            let s = l.table().slots[idx];
            if s.database == db && l.table().claim_announcement(idx, pid) {
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
