//! meshhook_limits: limits, execution slots and usage metering for a
//! Postgres-native multi-tenant workflow engine.
//!
//! `lib.rs` stays thin: module lines, `_PG_init` in a fixed order
//! (preload check → GUCs → shared memory → transaction callbacks), and the
//! hand-written SQL that defines tables, policies and SQL-language functions.
use pgrx::prelude::*;

mod claim;
mod error;
mod gucs;
mod identity;
mod limits;
mod metrics;
mod owner;
mod pooler;
mod rate;
mod row;
mod session;
mod shmem;
mod slots;
mod storage;
mod worker;

pgrx::pg_module_magic!();

/// Everything in shared memory, allocated when the library is preloaded.
static SEGMENTS: &[&shmem::Segment] = &[
    &slots::table::SEGMENT,
    // After the slot table: it sets when the table's restart grace ends.
    &slots::grace::SEGMENT,
    &rate::table::SEGMENT,
    &limits::SEGMENT,
    &claim::pacing::SEGMENT,
    &worker::launcher::SEGMENT,
];

// First of all: the schema everything goes into must not be another role's.
// CREATE EXTENSION uses a schema named meshhook_limits that already exists,
// and its owner could add overloads that our SECURITY DEFINER functions
// would call (issue 19, a schema squatted before the install).
pgrx::extension_sql!(
    r#"
DO $$
DECLARE
  nsp oid := (SELECT n.oid FROM pg_catalog.pg_namespace n WHERE n.nspname = 'meshhook_limits');
  owner oid := (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.oid = nsp);
BEGIN
  IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = owner) THEN
    RAISE EXCEPTION 'schema meshhook_limits is owned by role %, not by a superuser', owner::pg_catalog.regrole
      USING ERRCODE = '42501',
            HINT = 'someone created it before the extension: drop it (and what is in it) or ALTER SCHEMA meshhook_limits OWNER TO a superuser after checking its contents, then CREATE EXTENSION again';
  END IF;
  -- Nor may anyone else create in it, or have done so.
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
              WHERE n.oid = nsp AND a.privilege_type = 'CREATE'
                AND (a.grantee = 0 OR NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = a.grantee)))
     OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace = nsp)
     OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace = nsp)
     OR EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.typnamespace = nsp)
     OR EXISTS (SELECT 1 FROM pg_catalog.pg_operator o WHERE o.oprnamespace = nsp) THEN
    RAISE EXCEPTION 'schema meshhook_limits already holds objects, or a role that is not a superuser may create in it'
      USING ERRCODE = '42501',
            HINT = 'check what is in it and who may create there, drop the schema, then CREATE EXTENSION again';
  END IF;
END
$$;
"#,
    name = "schema_owner_check",
    bootstrap
);

// The hand-written SQL, one file per concern, created in this order (each
// file `requires` the one before it, and the Rust functions its SQL-language
// functions, policies and grants name when they are created). Each file
// carries its objects' grants and revokes.
extension_sql_file!(
    "../sql/limits.sql",
    name = "limits",
    requires = [
        identity::current_tenant,
        identity::is_admin,
        identity::can_monitor,
        identity::_caller_has_privs_of
    ]
);
extension_sql_file!("../sql/events.sql", name = "events", requires = ["limits"]);
extension_sql_file!(
    "../sql/slots_fallback.sql",
    name = "slots_fallback",
    requires = ["events", "retry_after_grants"]
);
extension_sql_file!(
    "../sql/rate.sql",
    name = "rate",
    requires = ["slots_fallback"]
);
extension_sql_file!(
    "../sql/storage.sql",
    name = "storage",
    requires = ["rate", owner::_read_as_owner, "row_bytes"]
);
extension_sql_file!(
    "../sql/usage.sql",
    name = "usage",
    requires = ["storage", slots::listing::live_slots, slots::listing::slots]
);
extension_sql_file!(
    "../sql/session.sql",
    name = "session",
    requires = ["usage", "session_grants"]
);
extension_sql_file!(
    "../sql/queues.sql",
    name = "queues",
    requires = ["session", owner::_read_as_owner]
);
extension_sql_file!("../sql/pool.sql", name = "pool", requires = ["queues"]);
extension_sql_file!(
    "../sql/pooler.sql",
    name = "pooler",
    requires = [
        "pool",
        "pooler_connect_grants",
        pooler::_pooler_may_connect,
        pooler::_caller_is_superuser
    ]
);
extension_sql_file!(
    "../sql/pooler_sizing.sql",
    name = "pooler_sizing",
    requires = ["pooler"]
);
extension_sql_file!(
    "../sql/pooler_api.sql",
    name = "pooler_api",
    requires = ["pooler_sizing"]
);
extension_sql_file!(
    "../sql/alerts.sql",
    name = "alerts",
    requires = ["pooler_api"]
);
extension_sql_file!(
    "../sql/claim_bindings.sql",
    name = "claim_bindings",
    requires = [
        "alerts",
        "claim_slot_grants",
        "claim_count_grants",
        "claim_ended_grants",
        slots::claimed::_claim_slot,
        slots::claimed::_claim_shares,
        claim::claim_jobs
    ]
);
extension_sql_file!(
    "../sql/claim_bind.sql",
    name = "claim_bind",
    requires = ["claim_bindings"]
);
extension_sql_file!(
    "../sql/claim.sql",
    name = "claim",
    requires = ["claim_bind"]
);
extension_sql_file!(
    "../sql/claim_explain.sql",
    name = "claim_explain",
    requires = ["claim"]
);
extension_sql_file!(
    "../sql/tick.sql",
    name = "tick",
    requires = [
        "claim_explain",
        slots::reap::reap_execution_slots,
        claim::restore::_restore_claims
    ]
);
extension_sql_file!(
    "../sql/metrics.sql",
    name = "metrics_sql",
    requires = ["tick"]
);
// What each public function and table is for, once all of them exist.
extension_sql_file!("../sql/comments.sql", name = "comments", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    let preloading = unsafe { pg_sys::process_shared_preload_libraries_in_progress };
    error::no_backtraces_for_callers();
    gucs::init(preloading);
    if preloading {
        shmem::init(SEGMENTS);
        slots::grace::init();
        worker::register();
    }
    slots::init();
    limits::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn resolution_prefers_project_over_tenant_over_plan_over_global() {
        Spi::run(
            "SELECT meshhook_limits.set_limit('concurrent_executions', 50);
             SELECT meshhook_limits.create_plan('pro');
             SELECT meshhook_limits.set_plan_limit('pro', 'concurrent_executions', 20);
             SELECT meshhook_limits.assign_plan('00000000-0000-0000-0000-00000000000a', 'pro');",
        )
        .expect("setup");
        let src = |q: &str| Spi::get_one::<String>(q).expect("query").expect("row");
        let q = "SELECT source || ':' || limit_value::text FROM meshhook_limits.effective_limits(
                   '00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000b1')
                 WHERE resource = 'concurrent_executions'";
        assert_eq!(src(q), "plan:20");
        Spi::run("SELECT meshhook_limits.set_limit('concurrent_executions', 7, '00000000-0000-0000-0000-00000000000a')").expect("tenant");
        assert_eq!(src(q), "tenant:7");
        Spi::run("SELECT meshhook_limits.set_limit('concurrent_executions', 3, '00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000b1')").expect("project");
        assert_eq!(src(q), "project:3");
        Spi::run("SELECT meshhook_limits.clear_limit('concurrent_executions', '00000000-0000-0000-0000-00000000000a', '00000000-0000-0000-0000-0000000000b1')").expect("clear");
        assert_eq!(src(q), "tenant:7");
    }

    #[pg_test(error = "limit_value must be a finite number >= 0, got -1")]
    fn negative_limit_is_refused() {
        Spi::run("SELECT meshhook_limits.set_limit('concurrent_executions', -1)").expect("raises");
    }

    #[pg_test(error = "unknown resource \"widgets\" needs a window_length")]
    fn unknown_resource_without_window_is_refused() {
        Spi::run("SELECT meshhook_limits.set_limit('widgets', 10)").expect("raises");
    }

    #[pg_test]
    fn metered_usage_reports_warning_then_exceeded() {
        Spi::run(
            "SELECT meshhook_limits.set_limit('executions_per_day', 10, window_length => '1 day')",
        )
        .expect("limit");
        let t = "'00000000-0000-0000-0000-0000000000c1'";
        let status = |amount: i32| {
            Spi::get_one::<String>(&format!(
                "SELECT status FROM meshhook_limits.record_usage({t}, 'executions_per_day', {amount})"
            ))
            .expect("record")
            .expect("row")
        };
        assert_eq!(status(5), "ok");
        assert_eq!(status(3), "warning");
        assert_eq!(status(3), "exceeded");
    }

    #[pg_test]
    fn shared_memory_slot_is_granted_and_counted() {
        // pgrx's test server preloads the library, so the fast path is on.
        let granted = Spi::get_one::<bool>(
            "SELECT granted FROM meshhook_limits.acquire_execution_slot('00000000-0000-0000-0000-0000000000d1')",
        )
        .expect("acquire");
        assert_eq!(granted, Some(true));
        let live = Spi::get_one::<i64>(
            "SELECT meshhook_limits.live_slots('00000000-0000-0000-0000-0000000000d1')",
        )
        .expect("live");
        assert_eq!(live, Some(1));
    }
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'meshhook_limits'",
            "meshhook_limits.restart_grace = 0",
        ]
    }
}
