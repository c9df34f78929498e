//! Every setting of the extension, named `meshhook_limits.*`: private
//! statics, read through the getters below, each with why it exists. The
//! context of each (superuser, sighup, postmaster) is in `init`: the worker
//! sees only sighup and postmaster settings, never a session's SET.
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting.get().map(|c| c.to_string_lossy().into_owned())
}

/// JSON path (dot separated) of the tenant id inside `request.jwt.claims`.
static TENANT_CLAIM: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"app_metadata.tenant_id"));
/// The tenant of a plain SQL session (workers that do not carry a JWT).
/// Superuser-only: set per login role (`ALTER ROLE w SET ...` by a
/// superuser) or by roles granted `SET ON PARAMETER`, never by the tenant.
static TENANT_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Roles whose `request.jwt.claims` are believed: the roles PostgREST
/// switches to for a request. Any other role could write the claims itself.
static JWT_ROLES: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"anon,authenticated"));
/// Lease of an execution slot when the caller gives none, in seconds.
static DEFAULT_LEASE: GucSetting<i32> = GucSetting::<i32>::new(60);
/// After the shared slot table starts (server start or crash restart), refuse
/// new slots for this many seconds; -1 means "the default lease".
static RESTART_GRACE: GucSetting<i32> = GucSetting::<i32>::new(-1);
/// Upper bound of the `retry_after` hint of a refused slot, in milliseconds.
static RETRY_AFTER_MAX: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// NOTIFY channel for events.
static NOTIFY_CHANNEL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"meshhook_limits"));

/// The one database the launcher serves (empty: every database with the extension).
static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Role the background worker connects as (empty: the bootstrap superuser).
static WORKER_ROLE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
/// Milliseconds between two ticks of the background worker.
static SAMPLE_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(1000);
/// Whether the background worker runs.
static WORKER_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
static RETENTION: GucSetting<i32> = GucSetting::<i32>::new(86_400);
static EVENT_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
static QUEUE_WINDOW: GucSetting<i32> = GucSetting::<i32>::new(300);
static QUEUE_SCAN_BUDGET: GucSetting<f64> = GucSetting::<f64>::new(0.005);
static POOL_WARNING: GucSetting<f64> = GucSetting::<f64>::new(0.85);
static POOL_CRITICAL: GucSetting<f64> = GucSetting::<f64>::new(0.9);
static POOL_CRITICAL_FOR: GucSetting<i32> = GucSetting::<i32>::new(300);
// PgBouncer sampling (sql/pooler.sql): how long a pooler's sample (connect,
// commands, sizing) may take before the tick gives up on it, how long its samples are kept, and the
// client wait at which pooler_health() says warning and critical.
static POOLER_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(1000);
static POOLER_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(86_400);
static POOLER_WAIT_WARNING: GucSetting<i32> = GucSetting::<i32>::new(500);
static POOLER_WAIT_CRITICAL: GucSetting<i32> = GucSetting::<i32>::new(5000);

/// Whether metrics() carries per-tenant series.
static METRICS_TENANT_LABELS: GucSetting<bool> = GucSetting::<bool>::new(true);
/// At most this many tenants get their own series in metrics().
static METRICS_MAX_TENANTS: GucSetting<i32> = GucSetting::<i32>::new(500);

/// Entries of the shared slot table: fixed, since shared memory is sized
/// when the server starts (`slots::table::MAX_SLOTS`).
pub const SLOT_TABLE_SIZE: usize = 8192;

/// The most live slots one tenant may hold, whatever its own limit.
static TENANT_SLOT_CEILING: GucSetting<i32> = GucSetting::<i32>::new((SLOT_TABLE_SIZE / 8) as i32);
/// Waiters entries one tenant may hold at once (of the table's 1,024).
static TENANT_WAITERS: GucSetting<i32> = GucSetting::<i32>::new(64);
static QUEUE_READ_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5000);
/// Tenants a claiming backend keeps in a binding's run queue at most
/// (`claim::runqueue`): about 150 bytes each.
static CLAIM_MAX_TENANTS: GucSetting<i32> = GucSetting::<i32>::new(200_000);
/// The longest lease a slot may have (seconds).
static MAX_LEASE: GucSetting<i32> = GucSetting::<i32>::new(86_400);

/// Replaces the real clock of the rate limiter (epoch seconds; 0 = off). Tests only.
static TEST_CLOCK: GucSetting<f64> = GucSetting::<f64>::new(0.0);

pub fn init(preloading: bool) {
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
        c"Used by worker processes that call the SQL API directly. Superuser-only: bind it to a worker's login role with ALTER ROLE ... SET, or GRANT SET ON PARAMETER to a trusted gateway role.",
        &TENANT_ID,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"meshhook_limits.jwt_roles",
        c"Comma-separated roles whose request.jwt.claims name the tenant.",
        c"The roles PostgREST switches to per request. Claims set by any other role are ignored, since any role can set them.",
        &JWT_ROLES,
        GucContext::Suset,
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
    define_runtime_gucs();
    // Postmaster settings can only be defined while preloading.
    if preloading {
        define_postmaster_gucs();
    }
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"meshhook_limits".as_ptr()) };
}

fn define_postmaster_gucs() {
    GucRegistry::define_string_guc(
        c"meshhook_limits.database",
        c"Only this database gets a background worker; empty (the default): every database where the extension is installed.",
        c"The launcher starts a worker in each database that has the extension, within seconds of CREATE EXTENSION.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"meshhook_limits.worker_role",
        c"Role the background worker connects as; empty: the bootstrap superuser.",
        c"A login-less member of meshhook_limits_admin is enough: tick() runs as the extension's owner, and every table of another role is read as that role.",
        &WORKER_ROLE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"meshhook_limits.worker",
        c"Run the background worker (needs shared_preload_libraries).",
        c"Off: drive meshhook_limits.tick() from pg_cron or any scheduler instead.",
        &WORKER_ENABLED,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

fn define_runtime_gucs() {
    GucRegistry::define_int_guc(
        c"meshhook_limits.claim_max_tenants",
        c"The most tenants with waiting jobs a claiming backend keeps in a bound queue's run queue.",
        c"Past it, a scan keeps the tenants not known to be at their limit first, then those whose first due job has waited longest; the others are found by later scans.",
        &CLAIM_MAX_TENANTS,
        100,
        10_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.tenant_slot_ceiling",
        c"The most execution slots one tenant may hold at once, whatever its concurrent_executions limit.",
        c"Tenants share one slot table; this keeps one tenant (with no limit, or a large one) from taking it all.",
        &TENANT_SLOT_CEILING,
        1,
        SLOT_TABLE_SIZE as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.tenant_waiters",
        c"The most callers of one tenant that may wait for room at once (acquire_execution_slot with wait).",
        c"The 1,024 waiters entries are shared by every tenant; past this, a tenant's call tries once instead of waiting.",
        &TENANT_WAITERS,
        0,
        1024,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.queue_read_timeout",
        c"The longest a read of a pg-boss or pgmq table, as its owner, may take (0: no limit).",
        c"The owner's code (a policy, an index function) runs in such reads: past this the read fails (54000) and the tick, explain_queues or bind_queue goes on without it.",
        &QUEUE_READ_TIMEOUT,
        0,
        3_600_000,
        GucContext::Suset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.max_lease",
        c"The longest lease an execution slot may have.",
        c"Longer leases are refused (22023); a longer default_lease is cut to it.",
        &MAX_LEASE,
        1,
        7 * 24 * 3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"meshhook_limits.metrics_tenant_labels",
        c"Whether metrics() exports per-tenant series (tenant_id label).",
        c"Switch off on installations with very many tenants.",
        &METRICS_TENANT_LABELS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.metrics_max_tenants",
        c"At most this many tenants (the busiest) get per-tenant series in metrics().",
        c"Bounds the label cardinality of a scrape.",
        &METRICS_MAX_TENANTS,
        0,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.sample_interval",
        c"Time between two ticks of the background worker.",
        c"Each tick samples queues and connections, reaps slots and evaluates alert rules.",
        &SAMPLE_INTERVAL,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.retention",
        c"How long queue and pool samples are kept.",
        c"",
        &RETENTION,
        60,
        366 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.event_retention",
        c"How long rows of meshhook_limits.events are kept.",
        c"",
        &EVENT_RETENTION,
        60,
        366 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.queue_window",
        c"The recent window of queue statistics (failed_recent, p50/p95, error rate).",
        c"",
        &QUEUE_WINDOW,
        10,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_float_guc(
        c"meshhook_limits.queue_scan_budget",
        c"Share of one CPU core that full passes over the queue tables may use on average.",
        c"Queued counts and oldest ages are exact at every tick. Active counts, failed_recent, p50/p95, \
          throughput and error rate come from a full pass over the job tables, which runs again only after \
          its own duration divided by this budget (1 = every tick).",
        &QUEUE_SCAN_BUDGET,
        0.0001,
        1.0,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"meshhook_limits.pool_warning",
        c"Pool utilisation (of max_connections minus reserved) at which pool status is warning.",
        c"",
        &POOL_WARNING,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"meshhook_limits.pool_critical",
        c"Pool utilisation at which pool status becomes critical once held for pool_critical_for.",
        c"",
        &POOL_CRITICAL,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.pool_critical_for",
        c"How long utilisation must stay at or above pool_critical before the status is critical.",
        c"",
        &POOL_CRITICAL_FOR,
        0,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.pooler_timeout",
        c"How long the tick gives one PgBouncer to connect and answer its sample.",
        c"A pooler slower than this is recorded as down and the tick moves on.",
        &POOLER_TIMEOUT,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.pooler_retention",
        c"How long PgBouncer samples (pooler_samples, pooler_pool_samples) are kept.",
        c"",
        &POOLER_RETENTION,
        60,
        366 * 86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.pooler_wait_warning",
        c"Client wait in a PgBouncer pool (maxwait) at which pooler_health() says warning.",
        c"",
        &POOLER_WAIT_WARNING,
        0,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"meshhook_limits.pooler_wait_critical",
        c"Client wait in a PgBouncer pool (maxwait) at which pooler_health() says critical.",
        c"",
        &POOLER_WAIT_CRITICAL,
        0,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
}

/// The JSON path of the tenant id inside `request.jwt.claims`.
pub fn tenant_claim() -> String {
    text(&TENANT_CLAIM).unwrap_or_else(|| "app_metadata.tenant_id".into())
}

/// The tenant a plain SQL session asserts (`meshhook_limits.tenant_id`), as written.
pub fn tenant_id() -> Option<String> {
    text(&TENANT_ID)
}

/// The comma-separated roles whose `request.jwt.claims` count, as bytes:
/// compared with role names in the server's encoding, whatever it is.
pub fn jwt_roles() -> Option<Vec<u8>> {
    JWT_ROLES.get().map(CString::into_bytes)
}

/// The lease of a slot when the caller gives none, in microseconds.
pub fn default_lease_micros() -> i64 {
    i64::from(DEFAULT_LEASE.get()) * 1_000_000
}

/// The most a refused slot's `retry_after` says, in microseconds.
pub fn retry_after_max_micros() -> i64 {
    i64::from(RETRY_AFTER_MAX.get()) * 1000
}

/// The one database the launcher serves; empty: every database where the
/// extension is installed.
pub fn worker_database() -> String {
    text(&DATABASE).unwrap_or_default()
}

/// The role the background worker connects as; None: the bootstrap superuser.
pub fn worker_role() -> Option<String> {
    text(&WORKER_ROLE).filter(|r| !r.is_empty())
}

/// Time between two ticks of the background worker.
pub fn sample_interval() -> std::time::Duration {
    std::time::Duration::from_millis(u64::try_from(SAMPLE_INTERVAL.get()).unwrap_or(1000))
}

pub fn worker_enabled() -> bool {
    WORKER_ENABLED.get()
}

/// Whether metrics() has per-tenant series, and for at most how many tenants.
pub fn metrics_tenant_labels() -> (bool, usize) {
    (
        METRICS_TENANT_LABELS.get(),
        usize::try_from(METRICS_MAX_TENANTS.get()).unwrap_or(0),
    )
}

/// The most tenants a claiming backend keeps in a binding's run queue.
pub fn claim_max_tenants() -> usize {
    usize::try_from(CLAIM_MAX_TENANTS.get()).unwrap_or(100)
}

/// The most live slots one tenant may hold, whatever its own limit.
pub fn tenant_slot_ceiling() -> i64 {
    i64::from(TENANT_SLOT_CEILING.get())
}

/// The longest a read as another role (`owner::read_as_owner`) may take, in
/// milliseconds; 0 for no limit.
pub fn queue_read_timeout_ms() -> i32 {
    QUEUE_READ_TIMEOUT.get()
}

/// The most waiters entries one tenant may hold at once.
pub fn tenant_waiters() -> usize {
    usize::try_from(TENANT_WAITERS.get()).unwrap_or(0)
}

/// The rate limiter's clock for tests, in Unix epoch seconds (0: the real clock).
pub fn test_clock() -> f64 {
    TEST_CLOCK.get()
}

/// The longest lease, in microseconds.
pub fn max_lease_micros() -> i64 {
    i64::from(MAX_LEASE.get()) * 1_000_000
}

/// Restart grace in microseconds, as configured (read once, when the
/// server starts: see `slots::table::Header::grace_end`).
pub fn restart_grace_micros() -> i64 {
    let g = RESTART_GRACE.get();
    let secs = if g < 0 { DEFAULT_LEASE.get() } else { g };
    i64::from(secs) * 1_000_000
}
