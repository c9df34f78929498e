//! A slot given back: checked now, freed when the caller's transaction
//! commits (`xact`). A memory peak over the slot's limit also writes a
//! slot.revoked event (memory_exceeded), which needs the definer.
use super::fallback;
use super::liveness::emit_revoked;
use super::slot_id::{find, slot_bytes};
use super::table::{self, LockedTable, RevokeReason, REVOKED};
use super::xact::{self, Op};
use crate::error::{LimitsError, Result};
use crate::identity;
use crate::limits::Mode;
use pgrx::datum::Uuid;

const OUTCOMES: [&str; 5] = ["completed", "failed", "cancelled", "timed_out", "crashed"];

/// See `limits::Mode`: on the fast path, None whenever SQL would be needed
/// (no shared memory, or a slot.revoked event to write).
pub(super) fn release(
    slot_id: Option<Uuid>,
    outcome: Option<&str>,
    memory_peak: Option<i64>,
    mode: Mode,
) -> Result<Option<bool>> {
    let id = slot_bytes(slot_id)?;
    let outcome = outcome.unwrap_or("completed");
    if !OUTCOMES.contains(&outcome) {
        return Err(LimitsError::invalid(
            format!("unknown outcome \"{}\"", identity::truncate(outcome, 64)),
            format!("use one of: {}", OUTCOMES.join(", ")),
        ));
    }
    if memory_peak.is_some_and(|m| m < 0) {
        return Err(LimitsError::invalid(
            "memory_peak_bytes must be >= 0",
            "report the execution's peak memory in bytes",
        ));
    }
    if !table::available() {
        if mode == Mode::FastPath {
            return Ok(None);
        }
        return fallback::release(id, memory_peak).map(Some);
    }
    let Some((idx, snap)) = find(&id)? else {
        return Ok(Some(false));
    };
    identity::require_act_for(Uuid::from_bytes(snap.tenant))?;
    if snap.state == REVOKED {
        if let Some(mut l) = LockedTable::exclusive() {
            if l.table().lookup(&id) == Some(idx) {
                l.table().forget(idx);
            }
        }
        return Ok(Some(false));
    }
    if xact::pending(&id, Op::Release) {
        return Ok(Some(false));
    }
    if snap.memory_limit >= 0 && memory_peak.is_some_and(|m| m > snap.memory_limit) {
        if mode == Mode::FastPath {
            return Ok(None);
        }
        emit_revoked(&snap, RevokeReason::MemoryExceeded, memory_peak)?;
    }
    xact::push(idx, id, Op::Release);
    Ok(Some(true))
}
