//! What acquire answers (`Admission`: granted, or refused with a reason),
//! how refusals are counted, and when a refused caller may try again: the
//! one place `retry_after` is computed.
//! - a limit is full: when the earliest slot in its way ends (`retry_after`);
//!   a waiter that lets an earlier one go first: the least
//!   (`retry_after(Some(now), now)`, 10 ms);
//! - the restart grace: the time left (`grace_left`);
//! - the table fallback (sql/slots_fallback.sql): `retry_after` again,
//!   through `_retry_after`.
use super::clock::{now, Ts};
use super::table;
use crate::error::Result;
use pgrx::datum::{Interval, Uuid};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;

/// When a refused acquire may try again: when the earliest of the slots in
/// its way ends (by lease or deadline), at least 10 ms from now and at most
/// `meshhook_limits.retry_after_max`; that maximum when none will end.
/// The one definition, for the table fallback too (`_retry_after`).
pub(super) fn retry_after(earliest_end: Option<i64>, now: i64) -> Interval {
    let max = crate::gucs::retry_after_max_micros();
    let wait = earliest_end.map_or(max, |end| end.saturating_sub(now).clamp(10_000, max));
    Interval::from_micros(wait)
}

/// The retry_after of a refusal in the restart grace (`grace`): the time
/// left, at least 10 ms and not capped by retry_after_max: nothing is
/// granted before it.
pub(super) fn grace_left(grace_end: i64, now: i64) -> Interval {
    Interval::from_micros(grace_end.saturating_sub(now).max(10_000))
}

/// `retry_after` for `_fallback_acquire` (sql/slots_fallback.sql). A NULL
/// `earliest_end` means no slot will end (the maximum); a NULL `now`, now.
#[pg_extern(stable, parallel_safe)]
fn _retry_after(earliest_end: Option<Ts>, now: Option<Ts>) -> Interval {
    let micros = |t: Ts| pg_sys::TimestampTz::from(t);
    retry_after(earliest_end.map(micros), now.map_or_else(self::now, micros))
}

pgrx::extension_sql!(
    "REVOKE EXECUTE ON FUNCTION meshhook_limits._retry_after(timestamptz, timestamptz) FROM PUBLIC;",
    name = "retry_after_grants",
    requires = [_retry_after]
);

/// The answer of acquire_execution_slot: its one row.
#[derive(Default)]
pub struct Admission {
    pub granted: bool,
    pub slot_id: Option<Uuid>,
    /// granted, tenant_limit, project_limit or recovering.
    pub reason: Option<String>,
    pub in_use: Option<i64>,
    pub limit_value: Option<i64>,
    pub deadline: Option<Ts>,
    pub lease_expires_at: Option<Ts>,
    pub retry_after: Option<Interval>,
}

/// The SQL row type of `Admission` (what pgrx's `TableIterator` returns).
pub type AdmissionRow = (
    bool,
    Option<Uuid>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<Ts>,
    Option<Ts>,
    Option<Interval>,
);

impl Admission {
    /// A refusal, not yet counted (`count_refusal`).
    pub(super) fn refused(
        reason: &str,
        in_use: i64,
        limit: Option<i64>,
        retry: Interval,
    ) -> Admission {
        Admission {
            granted: false,
            reason: Some(reason.to_string()),
            in_use: Some(in_use),
            limit_value: limit,
            retry_after: Some(retry),
            ..Admission::default()
        }
    }

    pub fn into_row(self) -> AdmissionRow {
        (
            self.granted,
            self.slot_id,
            self.reason,
            self.in_use,
            self.limit_value,
            self.deadline,
            self.lease_expires_at,
            self.retry_after,
        )
    }

    /// Read back from SQL (the definer twin, the fallback table).
    pub fn from_spi(r: &pgrx::spi::SpiHeapTupleData) -> Result<Admission> {
        Ok(Admission {
            granted: r.get::<bool>(1)?.unwrap_or(false),
            slot_id: r.get::<Uuid>(2)?,
            reason: r.get::<String>(3)?,
            in_use: r.get::<i64>(4)?,
            limit_value: r.get::<i64>(5)?,
            deadline: r.get::<Ts>(6)?,
            lease_expires_at: r.get::<Ts>(7)?,
            retry_after: r.get::<Interval>(8)?,
        })
    }
}

/// Count a refusal under its reason (the table's `refusals_by`).
pub(super) fn count_refusal(reason: &str) {
    if let Some(h) = table::header() {
        if let Some(i) = table::REFUSAL_REASONS.iter().position(|r| *r == reason) {
            h.refusals_by[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}
