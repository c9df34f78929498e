//! Every setting of the extension, named `meshhook_limits.*`, with its doc text.
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// JSON path (dot separated) of the tenant id inside `request.jwt.claims`.
pub static TENANT_CLAIM: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"app_metadata.tenant_id"));
/// The tenant of a plain SQL session (workers that do not carry a JWT).
pub static TENANT_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Lease of an execution slot when the caller gives none, in seconds.
pub static DEFAULT_LEASE: GucSetting<i32> = GucSetting::<i32>::new(60);
/// After the shared slot table starts (server start or crash restart), refuse
/// new slots for this many seconds; -1 means "the default lease".
pub static RESTART_GRACE: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// Upper bound of the `retry_after` hint of a refused slot, in milliseconds.
pub static RETRY_AFTER_MAX: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// NOTIFY channel for events.
pub static NOTIFY_CHANNEL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"meshhook_limits"));

/// Replaces the real clock of the rate limiter (epoch seconds; 0 = off). Tests only.
pub static TEST_CLOCK: GucSetting<f64> = GucSetting::<f64>::new(0.0);

pub fn init() {
    GucRegistry::define_string_guc(
        c"meshhook_limits.tenant_claim",
        c"Dot-separated path of the tenant id inside request.jwt.claims.",
        c"Falls back to the top-level claim tenant_id, then to meshhook_limits.tenant_id.",
        &TENANT_CLAIM,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"meshhook_limits.tenant_id",
        c"Tenant of a session that carries no JWT claims.",
        c"Used by worker processes that call the SQL API directly.",
        &TENANT_ID,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.default_lease",
        c"Lease of an execution slot when acquire_execution_slot is given none.",
        c"A holder that does not heartbeat within its lease loses the slot.",
        &DEFAULT_LEASE,
        1,
        7 * 24 * 3600,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.restart_grace",
        c"Seconds after a server start or crash during which no new slot is granted.",
        c"Slots live in shared memory and are lost on restart; holders learn it from their next heartbeat. -1 means the default lease.",
        &RESTART_GRACE,
        -1,
        7 * 24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.retry_after_max",
        c"Upper bound of retry_after for a refused execution slot.",
        c"",
        &RETRY_AFTER_MAX,
        1,
        3600 * 1000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_string_guc(
        c"meshhook_limits.notify_channel",
        c"NOTIFY channel on which events are sent.",
        c"",
        &NOTIFY_CHANNEL,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"meshhook_limits.test_clock",
        c"For tests: the rate limiter's clock in Unix epoch seconds (0 = the real clock).",
        c"Superuser only. Lets tests replay exact allow/deny sequences.",
        &TEST_CLOCK,
        0.0,
        1e11,
        GucContext::Suset,
        GucFlags::default(),
    );
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"meshhook_limits".as_ptr()) };
}

/// Restart grace in microseconds.
pub fn restart_grace_micros() -> i64 {
    let g = RESTART_GRACE.get();
    let secs = if g < 0 { DEFAULT_LEASE.get() } else { g };
    i64::from(secs) * 1_000_000
}
