//! A tenant in a binding's run queue (`runqueue`), and where it stands in
//! claim_jobs' pick: the least start tag on the fair-share clock first,
//! then the heavier weight, then the longer wait.
use super::Ts;
use pgrx::datum::Uuid;
use std::cmp::Ordering;

pub(super) type TenantKey = [u8; 16];

/// A tenant in the run queue.
pub(super) struct Runnable {
    pub(super) id: Uuid,
    /// The ways its jobs spell its id (what the index holds), each with
    /// since when its first job has been due as the skip scan found it, or
    /// the queue time of the last job claimed under it.
    pub(super) spellings: Vec<(String, Ts)>,
    /// Its start tag as last read (never more than the true one).
    pub(super) start: f64,
    pub(super) weight: f64,
    /// When its last claim was made (any claimer's; `slots::fair`).
    pub(super) served_at: Option<Ts>,
    /// The heap entry of this version is its live one; others are stale.
    pub(super) version: u32,
    /// In the heap (not parked, and not picked by the call in progress).
    pub(super) queued: bool,
}

impl Runnable {
    /// Since when it has waited, the last tie-break: since its next job was
    /// queued, or since it was last served, if later.
    fn waiting_since(&self) -> Option<Ts> {
        let next = self.spellings.iter().map(|s| s.1).min();
        next.max(self.served_at)
    }

    pub(super) fn key(&self, tenant: TenantKey) -> Key {
        Key {
            start: self.start,
            weight: self.weight,
            since: self.waiting_since(),
            tenant,
            version: self.version,
        }
    }
}

/// Where a tenant stands in the pick: the least first.
#[derive(Clone, Copy)]
pub(super) struct Key {
    pub(super) start: f64,
    pub(super) weight: f64,
    pub(super) since: Option<Ts>,
    pub(super) tenant: TenantKey,
    pub(super) version: u32,
}

impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.start
            .total_cmp(&other.start)
            .then_with(|| other.weight.total_cmp(&self.weight))
            .then_with(|| self.since.cmp(&other.since))
            .then_with(|| self.tenant.cmp(&other.tenant))
            .then_with(|| self.version.cmp(&other.version))
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Key {}
