//! The SECURITY DEFINER twins of acquire and release: what the caller's own
//! fast path (`limits::Mode::FastPath`) hands over to whenever an answer
//! needs SQL, running as the extension's owner after the same identity check.
// The row types of the SQL functions are spelt out in their signatures.
#![allow(clippy::type_complexity)]
use super::acquire::{acquire, Demand};
use super::admission::Admission;
use super::clock::Ts;
use super::release::release;
use crate::error::{LimitsError, OrRaise, Result};
use crate::limits::Mode;
use pgrx::datum::{Interval, Uuid};
use pgrx::prelude::*;

/// The complete acquire, as the extension's owner: loads the limits into
/// this backend's cache, or uses the fallback table without shared memory.
/// `acquire_execution_slot` calls it whenever its own fast path cannot answer.
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _acquire_execution_slot(
    tenant_id: Option<Uuid>,
    project_id: Option<Uuid>,
    run_id: Option<crate::row::Utf8>,
    lease: Option<Interval>,
) -> TableIterator<
    'static,
    (
        name!(granted, bool),
        name!(slot_id, Option<Uuid>),
        name!(reason, Option<String>),
        name!(in_use, Option<i64>),
        name!(limit_value, Option<i64>),
        name!(deadline, Option<Ts>),
        name!(lease_expires_at, Option<Ts>),
        name!(retry_after, Option<Interval>),
    ),
> {
    let row = crate::row::utf8(&run_id, "run_id")
        .and_then(|run_id| {
            acquire(
                tenant_id,
                project_id,
                run_id,
                lease,
                &Demand::ONE,
                Mode::Definer,
            )
        })
        .and_then(|r| r.ok_or(LimitsError::NotPreloaded))
        .or_raise();
    TableIterator::once(row.into_row())
}

/// The complete release, as the extension's owner (fallback table, events).
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn _release_execution_slot(
    slot_id: Option<Uuid>,
    outcome: Option<crate::row::Utf8>,
    memory_peak_bytes: Option<i64>,
) -> bool {
    crate::row::utf8(&outcome, "outcome")
        .and_then(|outcome| release(slot_id, outcome, memory_peak_bytes, Mode::Definer))
        .and_then(|r| r.ok_or(LimitsError::NotPreloaded))
        .or_raise()
}

/// The definer twin's answer, read back through SPI by the fast path.
pub(super) fn acquire_as_owner(
    tenant: Option<Uuid>,
    project: Option<Uuid>,
    run_id: Option<&str>,
    lease: Option<Interval>,
) -> Result<Admission> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT * FROM meshhook_limits._acquire_execution_slot($1, $2, $3, $4)",
            Some(1),
            &[tenant.into(), project.into(), run_id.into(), lease.into()],
        )?;
        let r = rows.into_iter().next().ok_or(LimitsError::NotPreloaded)?;
        Admission::from_spi(&r)
    })
}
