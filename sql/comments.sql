-- meshhook_limits: What each public function and table is for, in the catalog (\df+, \dt+,
-- editors). Functions and tables of the files before carry their own
-- where they were written; these are the rest. tests/test_undo.py fails
-- when a public function or table has none. docs/api.md has the details.

-- Limits and plans
COMMENT ON FUNCTION meshhook_limits.set_limit(text, numeric, uuid, uuid, numeric, interval, numeric) IS
  'Admin: set a limit, globally, for a tenant, or for a tenant''s project (most specific wins).';
COMMENT ON FUNCTION meshhook_limits.clear_limit(text, uuid, uuid) IS
  'Admin: remove a limit set with set_limit; the next more general one applies.';
COMMENT ON FUNCTION meshhook_limits.create_plan(text, text) IS 'Admin: create a plan (a named set of limits).';
COMMENT ON FUNCTION meshhook_limits.drop_plan(text) IS 'Admin: drop a plan no tenant uses (55006 otherwise).';
COMMENT ON FUNCTION meshhook_limits.set_plan_limit(text, text, numeric, numeric, interval, numeric) IS
  'Admin: set a limit of a plan.';
COMMENT ON FUNCTION meshhook_limits.clear_plan_limit(text, text) IS 'Admin: remove a limit of a plan.';
COMMENT ON FUNCTION meshhook_limits.assign_plan(uuid, text) IS 'Admin: put a tenant on a plan (a NULL plan unassigns).';
COMMENT ON FUNCTION meshhook_limits.effective_limits(uuid, uuid) IS
  'The limits in force for a tenant (and project), and where each comes from. The tenant, admins and monitors.';

-- Identity: who the caller is (useful to debug "who am I")
COMMENT ON FUNCTION meshhook_limits.current_tenant() IS
  'The tenant the caller acts for (JWT claim or meshhook_limits.tenant_id), or NULL.';
COMMENT ON FUNCTION meshhook_limits.is_admin() IS
  'Whether the caller is an admin (superuser, service_role or a member of meshhook_limits_admin).';
COMMENT ON FUNCTION meshhook_limits.can_monitor() IS
  'Whether the caller may read monitoring data (admins, meshhook_limits_monitor, pg_monitor).';
COMMENT ON FUNCTION meshhook_limits.require_admin_access(text) IS
  'Raise 42501 unless the caller is an admin; the text says what was attempted.';
COMMENT ON FUNCTION meshhook_limits.require_tenant_access(uuid) IS
  'Raise 42501 unless the caller may act for the tenant (that tenant, or an admin).';
COMMENT ON FUNCTION meshhook_limits.require_tenant_read(uuid) IS
  'Raise 42501 unless the caller may read the tenant''s limits and usage (that tenant, an admin or a monitor).';

-- Execution slots
COMMENT ON FUNCTION meshhook_limits.heartbeat_execution_slot(uuid, bigint) IS
  'Extend a slot''s lease and report its memory; a slot past its memory limit or deadline is revoked.';
COMMENT ON FUNCTION meshhook_limits.reap_execution_slots() IS
  'Revoke slots whose lease expired or whose deadline passed (the worker''s tick runs it).';
COMMENT ON FUNCTION meshhook_limits.slots() IS 'The slots the caller may see (its own, or all for admins and monitors).';
COMMENT ON FUNCTION meshhook_limits.live_slots(uuid) IS 'A tenant''s live slots, in cost units (0 without preloading).';
COMMENT ON FUNCTION meshhook_limits.slot_stats() IS 'Monitors: the shared slot table''s counters since the server started.';

-- Usage, rate limits, storage, sessions
COMMENT ON FUNCTION meshhook_limits.record_usage(uuid, text, numeric, uuid) IS
  'Meter an amount of a resource for a tenant (and project) in the current window; returns ok, warning or exceeded.';
COMMENT ON FUNCTION meshhook_limits.usage(uuid) IS 'A tenant''s usage against each of its limits.';
COMMENT ON FUNCTION meshhook_limits.pause_rate_limit(uuid, text, timestamp with time zone) IS
  'Pause a tenant''s rate for a key until a time (an upstream said "retry after").';
COMMENT ON FUNCTION meshhook_limits.rate_limit_stats() IS 'Monitors: the shared rate table''s counters.';
COMMENT ON FUNCTION meshhook_limits.track_storage(regclass, name) IS
  'Count a table''s rows against its tenants'' storage_bytes (the caller must own the table).';
COMMENT ON FUNCTION meshhook_limits.untrack_storage(regclass) IS 'Stop counting a table for storage quotas.';
COMMENT ON FUNCTION meshhook_limits.apply_session_limits(uuid) IS
  'Set the tenant''s session limits (statement_timeout, work_mem, ...) for the current transaction.';

-- Queues, claiming
COMMENT ON FUNCTION meshhook_limits.queue_health() IS
  'Monitors: per pg-boss and pgmq queue, from the latest tick: queued, active, failed, oldest age, percentiles, status.';
COMMENT ON FUNCTION meshhook_limits.set_queue_thresholds(text, text, bigint, bigint, interval, interval, numeric, numeric) IS
  'Admin: the thresholds of queue status for a source and queue (NULL queue: the source''s default); arguments left out keep the values that apply now.';
COMMENT ON FUNCTION meshhook_limits.reset_queue_thresholds(text, text) IS
  'Admin: remove thresholds set with set_queue_thresholds; the next more general ones apply.';

-- Pool and poolers
COMMENT ON FUNCTION meshhook_limits.pool_pressure() IS
  'Monitors: the server''s client connections by state, utilisation and status, from the latest tick.';
COMMENT ON FUNCTION meshhook_limits.pool_recommendation(interval) IS
  'Monitors: a pool size from the p95 of active sessions over the look-back, with its reasoning.';
COMMENT ON FUNCTION meshhook_limits.add_pooler(text, text, boolean) IS
  'Superuser: a PgBouncer for the tick to sample through dblink (conninfo without a password, or a foreign server).';
COMMENT ON FUNCTION meshhook_limits.drop_pooler(text) IS 'Admin: stop sampling a pooler and forget its samples.';
COMMENT ON FUNCTION meshhook_limits.set_pooler_sizing(text, text, integer, integer, interval) IS
  'Admin: pool sizing of a pooler: off, dry_run or on, within bounds, once per resize_every at most.';
COMMENT ON FUNCTION meshhook_limits.pooler_health() IS
  'Monitors: per pooler and pool, from the latest tick: clients waiting, maxwait, servers, utilisation, status.';
COMMENT ON FUNCTION meshhook_limits.pooler_recommendation() IS
  'Monitors: what pool sizing would do now for each pooler, and why.';

-- Alerts, events, metrics, the worker
COMMENT ON FUNCTION meshhook_limits.set_alert_rule(text, text, numeric, text, interval, text, jsonb, numeric, boolean, text) IS
  'Admin: add an alert rule, or change one (a built-in one of the same name is overridden); arguments left out keep their values.';
COMMENT ON FUNCTION meshhook_limits.drop_alert_rule(text) IS 'Admin: remove an alert rule of your own.';
COMMENT ON FUNCTION meshhook_limits.reset_alert_rule(text) IS 'Admin: put a built-in alert rule back as shipped.';
COMMENT ON FUNCTION meshhook_limits.install_realtime_policy() IS
  'Admin: let each tenant receive its own events on Supabase Realtime (false where Realtime is not installed).';
COMMENT ON FUNCTION meshhook_limits.metrics() IS 'Monitors: every metric in the Prometheus text format.';
COMMENT ON FUNCTION meshhook_limits.tick() IS
  'Admin: one round of sampling, reaping and alert evaluation (the background worker runs it every sample_interval).';

-- Tables and views
COMMENT ON TABLE meshhook_limits.limits IS 'Limits: global, per tenant, per project, per plan (set_limit, set_plan_limit).';
COMMENT ON TABLE meshhook_limits.plans IS 'Plans: named sets of limits (create_plan).';
COMMENT ON TABLE meshhook_limits.tenant_plans IS 'Which plan each tenant is on (assign_plan).';
COMMENT ON TABLE meshhook_limits.builtin_resources IS 'The resources the extension knows, and what enforces each.';
COMMENT ON TABLE meshhook_limits.usage_counters IS 'Metered usage per tenant, project, resource and window (record_usage).';
COMMENT ON TABLE meshhook_limits.events IS 'Every event sent on NOTIFY (and Realtime); a tenant sees its own.';
COMMENT ON TABLE meshhook_limits.fallback_slots IS 'Slots when the library is not preloaded (the table fallback).';
COMMENT ON TABLE meshhook_limits.fallback_tenants IS 'A row per tenant that the table fallback serialises its acquires on.';
COMMENT ON TABLE meshhook_limits.rate_state IS 'Rate-limit state when the library is not preloaded (the table fallback).';
COMMENT ON TABLE meshhook_limits.tracked_tables IS 'Tables counted against storage quotas (track_storage).';
COMMENT ON TABLE meshhook_limits.storage_usage IS 'Bytes per tracked table and tenant.';
COMMENT ON TABLE meshhook_limits.storage_totals IS 'Bytes per tenant over all tracked tables.';
COMMENT ON TABLE meshhook_limits.queue_bindings IS 'Queues claim_jobs may claim from, and where their jobs name tenant, project, key and cost (bind_queue).';
COMMENT ON TABLE meshhook_limits.retired_bindings IS 'Unbound queues whose claimed jobs still run; the tick ends their slots.';
COMMENT ON TABLE meshhook_limits.queue_samples IS 'The tick''s samples of every pg-boss and pgmq queue (queue_health).';
COMMENT ON TABLE meshhook_limits.queue_thresholds IS 'Thresholds of queue status per source and queue (set_queue_thresholds).';
COMMENT ON TABLE meshhook_limits.pool_samples IS 'The tick''s samples of the server''s connections (pool_pressure).';
COMMENT ON TABLE meshhook_limits.poolers IS 'PgBouncers to sample and their sizing (add_pooler, set_pooler_sizing).';
COMMENT ON TABLE meshhook_limits.pooler_samples IS 'One row per pooler per tick: up or down (and why), SHOW TOTALS'' counters.';
COMMENT ON TABLE meshhook_limits.pooler_pool_samples IS 'One row per PgBouncer pool per tick, from SHOW POOLS (pooler_health).';
COMMENT ON TABLE meshhook_limits.alert_rules IS 'Alert rules of your own, and overrides of built-in ones (set_alert_rule).';
COMMENT ON TABLE meshhook_limits.builtin_alert_rules IS 'The alert rules the extension ships.';
COMMENT ON TABLE meshhook_limits.alert_states IS 'Alert series now pending or firing.';
COMMENT ON VIEW meshhook_limits.effective_alert_rules IS 'The alert rules in force: yours, and the built-in ones you did not override.';
COMMENT ON TABLE meshhook_limits.worker_state IS 'The background worker''s last tick, its duration, and errors.';
