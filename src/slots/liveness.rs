//! Whether a held slot still lives: heartbeat's answer (`Liveness`), and
//! the slot.revoked event that tells the tenant's listeners one does not.
use super::clock::Ts;
use super::table::{RevokeReason, Slot};
use crate::error::Result;
use pgrx::datum::Uuid;
use pgrx::prelude::*;

/// The answer of heartbeat_execution_slot.
pub struct Liveness {
    pub alive: bool,
    /// alive, not_found, or why the slot was revoked.
    pub reason: Option<String>,
    pub deadline: Option<Ts>,
    pub lease_expires_at: Option<Ts>,
}

impl Liveness {
    pub(super) fn gone(reason: &str, deadline: Option<Ts>) -> Liveness {
        Liveness {
            alive: false,
            reason: Some(reason.into()),
            deadline,
            lease_expires_at: None,
        }
    }
}

/// Announce a revocation: a slot.revoked event, in the caller's transaction.
pub(super) fn emit_revoked(s: &Slot, reason: RevokeReason, value: Option<i64>) -> Result<()> {
    let extra = serde_json::json!({
        "slot_id": Uuid::from_bytes(s.id).to_string(),
        "reason": reason.as_str(),
        "run_id": String::from_utf8_lossy(&s.run_id[..s.run_id_len as usize]),
        "project_id": s.has_project.then(|| Uuid::from_bytes(s.project).to_string()),
    });
    let (resource, limit) = match reason {
        RevokeReason::MemoryExceeded => (
            "memory_bytes",
            (s.memory_limit >= 0).then_some(s.memory_limit),
        ),
        RevokeReason::DeadlineExceeded => ("execution_seconds", None),
        _ => ("concurrent_executions", None),
    };
    Spi::run_with_args(
        "SELECT meshhook_limits._emit('slot.revoked', $1, $2, $3::numeric, $4::numeric, $5::jsonb)",
        &[
            Uuid::from_bytes(s.tenant).into(),
            resource.into(),
            value.into(),
            limit.into(),
            pgrx::JsonB(extra).into(),
        ],
    )?;
    Ok(())
}
