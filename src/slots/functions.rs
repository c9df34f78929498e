//! acquire_execution_slot, heartbeat_execution_slot and
//! release_execution_slot as SQL sees them: their arguments, their answers
//! and the SQL that declares them. Acquire and release are C functions,
//! SECURITY INVOKER, that answer from shared memory and this backend's
//! cached limits (`acquire`, `release`) and hand over to their SECURITY
//! DEFINER twins (`definer`) whenever SQL is needed.
use super::acquire::{acquire, Demand};
use super::clock::Ts;
use super::heartbeat::heartbeat;
use super::release::release;
use super::{definer, wait};
use crate::error::{LimitsError, OrRaise};
use crate::limits::{self, Mode};
use crate::row::datum;
use pgrx::datum::{Interval, Uuid};
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    static ACQUIRE_DESC: Cell<pg_sys::TupleDesc> = const { Cell::new(std::ptr::null_mut()) };
}

crate::finfo_v1!(pg_finfo_meshhook_limits_acquire_execution_slot);

/// `acquire_execution_slot(tenant_id, project_id, run_id, lease, wait)`:
/// take an execution slot for a tenant (and project). Never raises for a
/// refusal: returns granted = false with a reason and retry_after; with
/// `wait`, first waits up to that long for room (`wait`). SECURITY INVOKER:
/// with the limits cached in this backend it needs nothing but shared
/// memory; otherwise it asks `_acquire_execution_slot` (SECURITY DEFINER).
/// Identity is checked on both paths. Answers its one row directly.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_acquire_execution_slot(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with the declared arguments (five; four
    // under 0.1.0's SQL).
    let (tenant, project, run_id, lease, wait) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 0),
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 1),
            crate::row::text_arg(fcinfo, 2, "run_id").or_raise(),
            pgrx::fcinfo::pg_getarg::<Interval>(fcinfo, 3),
            // 0.1.0 declared four arguments: until ALTER EXTENSION UPDATE,
            // a call has no `wait`.
            ((*fcinfo).nargs > 4)
                .then(|| pgrx::fcinfo::pg_getarg::<Interval>(fcinfo, 4))
                .flatten(),
        )
    };
    let attempt = || {
        limits::fast_path_or_definer(
            acquire(tenant, project, run_id, lease, &Demand::ONE, Mode::FastPath),
            || definer::acquire_as_owner(tenant, project, run_id, lease),
        )
    };
    let row = match (wait, tenant) {
        (Some(wait), Some(t)) => {
            wait::acquire_waiting(&t, wait::wait_micros(&wait).or_raise(), attempt)
        }
        _ => attempt(),
    };
    let cols = [
        (c"granted", pg_sys::BOOLOID),
        (c"slot_id", pg_sys::UUIDOID),
        (c"reason", pg_sys::TEXTOID),
        (c"in_use", pg_sys::INT8OID),
        (c"limit_value", pg_sys::INT8OID),
        (c"deadline", pg_sys::TIMESTAMPTZOID),
        (c"lease_expires_at", pg_sys::TIMESTAMPTZOID),
        (c"retry_after", pg_sys::INTERVALOID),
    ];
    let row = [
        datum(row.granted),
        datum(row.slot_id),
        datum(row.reason),
        datum(row.in_use),
        datum(row.limit_value),
        datum(row.deadline),
        datum(row.lease_expires_at),
        datum(row.retry_after),
    ];
    // SAFETY: the declared columns, and datums of their types.
    unsafe { crate::row::answer(fcinfo, &ACQUIRE_DESC, &cols, row, "acquire_execution_slot") }
}

/// Extend a slot's lease and report memory. alive = false means the slot is
/// gone (reason says why) and the execution must stop.
#[allow(clippy::type_complexity)] // the SQL row type, spelt out
#[pg_extern(volatile, parallel_unsafe, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn heartbeat_execution_slot(
    slot_id: Option<Uuid>,
    memory_bytes: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(alive, bool),
        name!(reason, Option<String>),
        name!(deadline, Option<Ts>),
        name!(lease_expires_at, Option<Ts>),
    ),
> {
    let answer = heartbeat(slot_id, memory_bytes).or_raise();
    TableIterator::once((
        answer.alive,
        answer.reason,
        answer.deadline,
        answer.lease_expires_at,
    ))
}

crate::finfo_v1!(pg_finfo_meshhook_limits_release_execution_slot);

/// `release_execution_slot(slot_id, outcome, memory_peak_bytes)`: give a
/// slot back; takes effect when the calling transaction commits. False when
/// the slot was not held (unknown, already released or revoked).
/// SECURITY INVOKER like acquire: `_release_execution_slot` does what needs SQL.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn meshhook_limits_release_execution_slot(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor with the three declared arguments.
    let (slot_id, outcome, memory_peak) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<Uuid>(fcinfo, 0),
            crate::row::text_arg(fcinfo, 1, "outcome").or_raise(),
            pgrx::fcinfo::pg_getarg::<i64>(fcinfo, 2),
        )
    };
    let released = limits::fast_path_or_definer(
        release(slot_id, outcome, memory_peak, Mode::FastPath),
        || {
            Spi::get_one_with_args::<bool>(
                "SELECT meshhook_limits._release_execution_slot($1, $2, $3)",
                &[slot_id.into(), outcome.into(), memory_peak.into()],
            )
            .map(|released| released.unwrap_or(false))
            .map_err(LimitsError::from)
        },
    );
    pg_sys::Datum::from(released)
}

extension_sql!(
    r#"
CREATE FUNCTION meshhook_limits.acquire_execution_slot(tenant_id uuid, project_id uuid DEFAULT NULL,
    run_id text DEFAULT NULL, lease interval DEFAULT NULL, wait interval DEFAULT NULL)
RETURNS TABLE(granted boolean, slot_id uuid, reason text, in_use bigint, limit_value bigint,
              deadline timestamptz, lease_expires_at timestamptz, retry_after interval)
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_acquire_execution_slot';
COMMENT ON FUNCTION meshhook_limits.acquire_execution_slot(uuid, uuid, text, interval, interval) IS
  'Take an execution slot for a tenant (and project), waiting up to wait for room; never raises for a refusal. SECURITY INVOKER: the caller must be the tenant or an admin.';
CREATE FUNCTION meshhook_limits.release_execution_slot(slot_id uuid, outcome text DEFAULT 'completed',
    memory_peak_bytes bigint DEFAULT NULL)
RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_release_execution_slot';
COMMENT ON FUNCTION meshhook_limits.release_execution_slot(uuid, text, bigint) IS
  'Give a slot back at commit; false when it was not held. SECURITY INVOKER: the caller must be the tenant or an admin.';
"#,
    name = "slot_functions",
    requires = [
        definer::_acquire_execution_slot,
        definer::_release_execution_slot
    ]
);
