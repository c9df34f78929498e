//! A held slot's heartbeat: its lease extended and its memory reported, or
//! the slot revoked there and then (deadline or lease passed, memory over
//! its limit) and announced, or found revoked already.
use super::clock::{now, ts};
use super::fallback;
use super::liveness::{emit_revoked, Liveness};
use super::slot_id::{find, slot_bytes};
use super::table::{self, LockedTable, RevokeReason, REVOKED};
use crate::error::{LimitsError, Result};
use crate::identity;
use pgrx::datum::Uuid;
use pgrx::pg_sys;

pub(super) fn heartbeat(slot_id: Option<Uuid>, memory_bytes: Option<i64>) -> Result<Liveness> {
    let id = slot_bytes(slot_id)?;
    if memory_bytes.is_some_and(|m| m < 0) {
        return Err(LimitsError::invalid(
            "memory_bytes must be >= 0",
            "report the execution's current memory in bytes",
        ));
    }
    if !table::available() {
        return fallback::heartbeat(id, memory_bytes);
    }
    let Some((idx, snap)) = find(&id)? else {
        return Ok(Liveness::gone("not_found", None));
    };
    identity::require_act_for(Uuid::from_bytes(snap.tenant))?;
    let now = now();
    let mut l = LockedTable::exclusive().ok_or(LimitsError::NotPreloaded)?;
    if l.table().lookup(&id) != Some(idx) {
        return Ok(Liveness::gone("not_found", None));
    }
    let s = l.table().slots[idx];
    if s.state == REVOKED {
        let r = RevokeReason::from_u8(s.reason);
        // Announce it here unless it is announced or a reaper is at it.
        let announce = l
            .table()
            .claim_announcement(idx, unsafe { pg_sys::MyProcPid });
        l.table().forget(idx);
        drop(l);
        if announce {
            emit_revoked(&s, r, None)?;
        }
        let reason = r.as_str();
        return Ok(Liveness::gone(reason, ts(s.deadline)));
    }
    let reason = if now >= s.deadline {
        Some(RevokeReason::DeadlineExceeded)
    } else if now >= s.lease_expires {
        Some(RevokeReason::LeaseExpired)
    } else if s.memory_limit >= 0 && memory_bytes.is_some_and(|m| m > s.memory_limit) {
        Some(RevokeReason::MemoryExceeded)
    } else {
        None
    };
    if let Some(r) = reason {
        l.table().revoke(idx, r, now);
        l.table().slots[idx].notified = true;
        l.table().forget(idx);
        drop(l);
        emit_revoked(&s, r, memory_bytes)?;
        return Ok(Liveness::gone(r.as_str(), ts(s.deadline)));
    }
    let e = &mut l.table().slots[idx];
    e.lease_expires = now.saturating_add(e.lease_micros).min(e.deadline);
    if let Some(m) = memory_bytes {
        e.memory_peak = e.memory_peak.max(m);
    }
    let expires = e.lease_expires;
    drop(l);
    Ok(Liveness {
        alive: true,
        reason: Some("alive".into()),
        deadline: ts(s.deadline),
        lease_expires_at: ts(expires),
    })
}
