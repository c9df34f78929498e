-- Row-level security and acting for others, as Supabase RPC does it:
-- PostgREST logs in as `authenticator`, then per request SET LOCAL ROLE
-- authenticated and the JWT claims in request.jwt.claims. Tenant A
-- (...a1) and tenant B (...b1) each have a plan, limits, usage, an event
-- and a live slot; A must see and touch only its own.
\set SHOW_CONTEXT never
\set a '''00000000-0000-0000-0000-0000000000a1'''
\set b '''00000000-0000-0000-0000-0000000000b1'''
\set claims_a '''{"role": "authenticated", "app_metadata": {"tenant_id": "00000000-0000-0000-0000-0000000000a1"}}'''
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE authenticator LOGIN NOINHERIT IN ROLE anon, authenticated;
-- The world, as an admin.
SELECT meshhook_limits.create_plan('plan_a'), meshhook_limits.create_plan('plan_b');
SELECT meshhook_limits.set_plan_limit('plan_a', 'rls_meter', 100, window_length => '1 day'),
       meshhook_limits.set_plan_limit('plan_b', 'rls_meter', 200, window_length => '1 day');
SELECT meshhook_limits.assign_plan(:a, 'plan_a'), meshhook_limits.assign_plan(:b, 'plan_b');
SELECT meshhook_limits.set_limit('rls_global', 1000, window_length => '1 day');
SELECT meshhook_limits.set_limit('concurrent_executions', 5, t), meshhook_limits.set_limit('rls_meter', 10, t, window_length => '1 day'),
       (SELECT status FROM meshhook_limits.record_usage(t, 'rls_meter', 9))
  FROM unnest(ARRAY[:a, :b]::uuid[]) t;
SELECT t AS tenant, granted FROM unnest(ARRAY[:a, :b]::uuid[]) t, LATERAL meshhook_limits.acquire_execution_slot(t, run_id => 'run-' || right(t::text, 2));
-- The rows of B exist (other tests of this database have tenants of their own).
SELECT 'usage_counters' AS t, count(DISTINCT tenant_id) FROM meshhook_limits.usage_counters WHERE tenant_id IN (:a, :b)
UNION ALL SELECT 'events', count(DISTINCT tenant_id) FROM meshhook_limits.events WHERE tenant_id IN (:a, :b)
UNION ALL SELECT 'tenant_plans', count(DISTINCT tenant_id) FROM meshhook_limits.tenant_plans WHERE tenant_id IN (:a, :b);

-- A request of tenant A.
\c - authenticator
-- (Each refusal's SQLSTATE and message, one row each.)
CREATE FUNCTION pg_temp.refusal(stmt text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE stmt;
  RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END
$$;
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', :claims_a, true) IS NOT NULL AS claims_set;
SELECT 'usage_counters' AS t, array_agg(DISTINCT tenant_id) AS tenants FROM meshhook_limits.usage_counters
UNION ALL SELECT 'events', array_agg(DISTINCT tenant_id) FROM meshhook_limits.events
UNION ALL SELECT 'tenant_plans', array_agg(DISTINCT tenant_id) FROM meshhook_limits.tenant_plans;
-- Limits: A's own, the global ones and A's plan's; nothing of B.
SELECT resource, plan, tenant_id, limit_value FROM meshhook_limits.limits ORDER BY 1, 2, 3;
SELECT plan FROM meshhook_limits.plans;
SELECT tenant_id, run_id, state FROM meshhook_limits.slots();
COMMIT;

-- Acting for B, changing configuration, writing tables, calling internals:
-- refused with 42501, and the messages never name B.
BEGIN;
SET LOCAL ROLE authenticated;
SELECT set_config('request.jwt.claims', :claims_a, true) IS NOT NULL AS claims_set;
SELECT call, pg_temp.refusal(call) FROM unnest(ARRAY[
  format('SELECT * FROM meshhook_limits.acquire_execution_slot(%L)', :b),
  format('SELECT * FROM meshhook_limits.record_usage(%L, ''rls_meter'', 1)', :b),
  format('SELECT * FROM meshhook_limits.usage(%L)', :b),
  format('SELECT * FROM meshhook_limits.effective_limits(%L)', :b),
  format('SELECT meshhook_limits.live_slots(%L)', :b),
  format('SELECT meshhook_limits.set_limit(''concurrent_executions'', 1000, %L)', :a),
  'SELECT meshhook_limits.set_limit(''concurrent_executions'', 1000)',
  format('SELECT meshhook_limits.clear_limit(''concurrent_executions'', %L)', :a),
  'SELECT meshhook_limits.create_plan(''evil_plan'')',
  format('SELECT meshhook_limits.assign_plan(%L, ''plan_b'')', :a),
  'SELECT meshhook_limits.set_plan_limit(''plan_a'', ''rls_meter'', 1e9)',
  'SELECT meshhook_limits.clear_plan_limit(''plan_a'', ''rls_meter'')',
  'SELECT meshhook_limits.drop_plan(''plan_b'')',
  'SELECT meshhook_limits.reap_execution_slots()',
  format('INSERT INTO meshhook_limits.limits (resource, tenant_id, limit_value) VALUES (''concurrent_executions'', %L, 999)', :a),
  'UPDATE meshhook_limits.limits SET limit_value = 999',
  'DELETE FROM meshhook_limits.usage_counters',
  'TRUNCATE meshhook_limits.events CASCADE',
  'UPDATE meshhook_limits.tenant_plans SET plan = ''plan_b''',
  'INSERT INTO meshhook_limits.plans (plan) VALUES (''evil_plan'')',
  'UPDATE meshhook_limits.builtin_resources SET description = ''x''',
  format('SELECT meshhook_limits._emit(''limit.exceeded'', %L, ''x'', 1, 1, NULL)', :a),
  format('SELECT * FROM meshhook_limits._resolve(%L, NULL)', :b),
  format('SELECT * FROM meshhook_limits._slot_limits(%L, NULL)', :b),
  'SELECT meshhook_limits._limits_changed()'
]) call;
-- The same reads for itself are allowed.
SELECT resource, used, limit_value FROM meshhook_limits.usage(:a) WHERE resource = 'rls_meter';
SELECT resource, limit_value, source FROM meshhook_limits.effective_limits(:a) WHERE resource IN ('concurrent_executions', 'rls_meter', 'rls_global') ORDER BY 1;
COMMIT;

-- Nothing changed for B (as the admin again).
\c - postgres
SELECT tenant_id, resource, used FROM meshhook_limits.usage_counters WHERE tenant_id IN (:a, :b) ORDER BY 1;
SELECT count(*) AS slots, count(*) FILTER (WHERE tenant_id = :b) AS slots_of_b FROM meshhook_limits.slots() WHERE tenant_id IN (:a, :b);
SELECT resource, plan, tenant_id, limit_value FROM meshhook_limits.limits
 WHERE tenant_id IN (:a, :b) OR plan IN ('plan_a', 'plan_b') OR resource = 'rls_global' ORDER BY 1, 2, 3;
SELECT plan FROM meshhook_limits.plans ORDER BY 1;
SELECT count(*) AS events FROM meshhook_limits.events WHERE tenant_id IN (:a, :b);
