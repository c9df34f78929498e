-- Bad input: every refusal raises the documented SQLSTATE (echoed after it)
-- with a message or hint that says what is allowed, and changes nothing.
-- One session throughout: it must survive every statement.
\set SHOW_CONTEXT never
\set t '''00000000-0000-0000-0000-0000000000c1'''
\set p '''00000000-0000-0000-0000-0000000000d1'''
\set s meshhook_limits
-- For lists of bad values: each one's SQLSTATE, message and hint, one row each.
CREATE FUNCTION pg_temp.refusal(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE hint text;
BEGIN
  EXECUTE stmt;
  RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS hint = PG_EXCEPTION_HINT;
  RETURN SQLSTATE || ': ' || left(SQLERRM, 120) || CASE WHEN hint <> '' THEN ' (' || hint || ')' ELSE '' END;
END
$$;

-- NULL tenant
SELECT * FROM :s.acquire_execution_slot(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM :s.acquire_execution_slot(NULL, gen_random_uuid(), 'r', '10 seconds');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM :s.record_usage(NULL, 'memory_bytes', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM :s.usage(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM :s.effective_limits(NULL, gen_random_uuid());
\echo :LAST_ERROR_SQLSTATE
SELECT :s.assign_plan(NULL, 'x');
\echo :LAST_ERROR_SQLSTATE
SELECT live FROM :s.slot_stats();

-- NULL and unknown slot ids: refused, or "not found"; a live slot is untouched.
SELECT * FROM :s.heartbeat_execution_slot(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT :s.release_execution_slot(NULL, 'failed');
\echo :LAST_ERROR_SQLSTATE
SELECT granted FROM :s.acquire_execution_slot(:t, NULL, 'bad-input') \gset held_
SELECT slot_id AS held FROM :s.slots() WHERE tenant_id = :t \gset
SELECT u AS unknown_id, h.alive, h.reason, :s.release_execution_slot(u::uuid) AS released
  FROM unnest(ARRAY['00000000-0000-0000-0000-000000000000', '00000000-0000-4000-8000-000000000001',
                    'ffffffff-ffff-ffff-ffff-ffffffffffff', '12345678-1234-4234-8234-7fffffff0000']) u,
       LATERAL :s.heartbeat_execution_slot(u::uuid) h;
SELECT state FROM :s.slots() WHERE tenant_id = :t;

-- Slot arguments
SELECT * FROM :s.acquire_execution_slot(:t, NULL, repeat('r', 97));
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM :s.acquire_execution_slot(:t, NULL, repeat('€', 33));
\echo :LAST_ERROR_SQLSTATE
SELECT l AS lease, pg_temp.refusal(format('SELECT * FROM meshhook_limits.acquire_execution_slot(%L, NULL, NULL, %L::interval)', :t, l))
  FROM unnest(ARRAY['0 seconds', '-1 second', '-10 days', '999 milliseconds', '1 day 1 second', '8 days', '1 month', '100 years']) l;
SELECT left(o, 30) AS outcome, pg_temp.refusal(format('SELECT meshhook_limits.release_execution_slot(%L, %L)', :'held', o))
  FROM unnest(ARRAY['done', 'COMPLETED', '', 'completed; DROP TABLE x', repeat('x', 100000)]) o;
SELECT * FROM :s.heartbeat_execution_slot(:'held', -1);
\echo :LAST_ERROR_SQLSTATE
SELECT :s.release_execution_slot(:'held', 'completed', -5);
\echo :LAST_ERROR_SQLSTATE
SELECT pg_temp.refusal(format('SELECT meshhook_limits.heartbeat_execution_slot(%L, %s)', :'held', -9223372036854775808));
SELECT count(*) AS slots_of_t, min(state) AS state, max(memory_peak_bytes) AS peak FROM :s.slots() WHERE tenant_id = :t;
SELECT :s.release_execution_slot(:'held', NULL) AS released_with_null_outcome;
-- The bounds themselves are accepted: a 96-byte run_id, leases of 1 second and 1 day.
SELECT granted, slot_id AS bound FROM :s.acquire_execution_slot(:t, NULL, repeat('€', 32), '1 second') \gset
SELECT :'granted' AS granted, run_id = repeat('€', 32) AS run_id_kept FROM :s.slots() WHERE slot_id = :'bound';
SELECT :s.release_execution_slot(:'bound') AS released;
SELECT granted, slot_id AS bound FROM :s.acquire_execution_slot(:t, NULL, NULL, '1 day') \gset
SELECT :'granted' AS granted_for_a_day, :s.release_execution_slot(:'bound') AS released;

-- set_limit: bad values, ratios, bursts, windows; nothing is written.
SELECT :s.set_limit('concurrent_executions', 3, :t);
SELECT v AS limit_value, pg_temp.refusal(format('SELECT meshhook_limits.set_limit(''concurrent_executions'', %s::numeric, %L)', coalesce(quote_literal(v), 'NULL'), :t)) AS tenant_limit,
       pg_temp.refusal(format('SELECT meshhook_limits.set_plan_limit(''badplan0'', ''concurrent_executions'', %s::numeric)', coalesce(quote_literal(v), 'NULL'))) AS plan_limit
  FROM (SELECT :s.create_plan('badplan0')) _, unnest(ARRAY['-1', '-0.0001', 'NaN', NULL, 'Infinity']) v;
SELECT count(*) AS badplan0_limits FROM :s.limits WHERE plan = 'badplan0';
SELECT :s.drop_plan('badplan0');
SELECT :s.set_limit('concurrent_executions', 2.5, :t);
\echo :LAST_ERROR_SQLSTATE
SELECT :s.set_limit('concurrent_executions', 1e30, :t);
\echo :LAST_ERROR_SQLSTATE
SELECT w AS warn_ratio, pg_temp.refusal(format('SELECT meshhook_limits.set_limit(''memory_bytes'', 2000, %L, warn_ratio => %s::numeric)', :t, coalesce(quote_literal(w), 'NULL')))
  FROM unnest(ARRAY['0', '1.5', NULL, '-0.5', 'NaN']) w;
SELECT :s.set_limit('concurrent_executions', 10, :t, burst => 5);
\echo :LAST_ERROR_SQLSTATE
SELECT :s.set_limit('requests_per_second', 10, :t, burst => -1);
\echo :LAST_ERROR_SQLSTATE
SELECT :s.set_limit('requests_per_second', 10, :t, burst => 'NaN');
\echo :LAST_ERROR_SQLSTATE
SELECT :s.set_limit('widgets', 10, :t);
\echo :LAST_ERROR_SQLSTATE
SELECT r AS resource, pg_temp.refusal(format('SELECT meshhook_limits.set_limit(%L, 10, %L, window_length => ''1 day'')', r, :t))
  FROM unnest(ARRAY['concurrent_executions', 'execution_seconds', 'memory_bytes', 'storage_bytes', 'requests_per_second']) r;
SELECT w AS window_length, pg_temp.refusal(format('SELECT meshhook_limits.set_limit(''meter_x'', 10, %L, window_length => %L::interval)', :t, w))
  FROM unnest(ARRAY['0 seconds', '-1 day', '400 days']) w;
SELECT :s.set_limit('concurrent_executions', 2, NULL, :p);
\echo :LAST_ERROR_SQLSTATE
SELECT :s.clear_limit('concurrent_executions', NULL, :p);
\echo :LAST_ERROR_SQLSTATE
SELECT resource, limit_value, warn_ratio, burst, window_length FROM :s.limits WHERE tenant_id = :t ORDER BY 1;

-- Resource and plan names: refused whole, however hostile; the tables stay.
CREATE TEMP TABLE bad_names AS SELECT * FROM unnest(ARRAY[repeat('a', 100000),
  repeat('''; DROP TABLE meshhook_limits.limits; --', 2500), 'x''); DROP TABLE meshhook_limits.limits; --',
  'x"; DROP TABLE meshhook_limits.limits; --', 'a;b', 'bad name', 'Widgets', '1widgets', '', repeat('a', 64),
  'résumé', E'a\nb', 'a\b']) WITH ORDINALITY AS b(name, n);
SELECT :s.set_limit('bad_meter', 100, :t, window_length => '1 day');
SELECT n, pg_temp.refusal(format('SELECT meshhook_limits.set_limit(%L, 10, %L, window_length => ''1 day'')', name, :t)) AS set_limit,
       pg_temp.refusal(format('SELECT * FROM meshhook_limits.record_usage(%L, %L, 1)', :t, name)) AS record_usage
  FROM bad_names ORDER BY n;
SELECT :s.create_plan('badplan');
SELECT :s.set_plan_limit('badplan', repeat('a', 100000), 10, window_length => '1 day');
\echo :LAST_ERROR_SQLSTATE
SELECT :s.set_plan_limit('badplan', 'concurrent_executions', -1);
\echo :LAST_ERROR_SQLSTATE
SELECT left(n, 30) AS plan, pg_temp.refusal(format('SELECT meshhook_limits.create_plan(%L)', n))
  FROM unnest(ARRAY[repeat('p', 100000), 'x''); DROP TABLE meshhook_limits.plans; --', 'bad plan', '']) n;
SELECT :s.assign_plan(:t, 'badplan');
SELECT left(n, 30) AS plan, pg_temp.refusal(format('SELECT meshhook_limits.assign_plan(%L, %L)', :t, n)) AS assign_plan,
       pg_temp.refusal(format('SELECT meshhook_limits.set_plan_limit(%L, ''concurrent_executions'', 1)', n)) AS set_plan_limit
  FROM unnest(ARRAY['no_such_plan_xyz', '''; DROP TABLE meshhook_limits.plans; --', repeat('p', 100000)]) n;
SELECT plan FROM :s.tenant_plans WHERE tenant_id = :t;
SELECT :s.assign_plan(:t, NULL), :s.drop_plan('badplan');
SELECT to_regclass('meshhook_limits.limits') IS NOT NULL AS limits_exists,
       to_regclass('meshhook_limits.plans') IS NOT NULL AS plans_exists,
       (SELECT count(*) FROM :s.plans) AS plans;

-- record_usage: bad amounts, unknown meters, resources it does not meter.
SELECT status, used FROM :s.record_usage(:t, 'bad_meter', 5);
SELECT a AS amount, pg_temp.refusal(format('SELECT * FROM meshhook_limits.record_usage(%L, ''bad_meter'', %s::numeric)', :t, coalesce(quote_literal(a), 'NULL')))
  FROM unnest(ARRAY['-1', 'NaN', NULL, 'Infinity', '1e19', '1e-12']) a;
SELECT * FROM :s.record_usage(:t, 'never_defined', 1);
\echo :LAST_ERROR_SQLSTATE
SELECT r AS resource, pg_temp.refusal(format('SELECT * FROM meshhook_limits.record_usage(%L, %L, 1)', :t, r))
  FROM unnest(ARRAY['concurrent_executions', 'execution_seconds', 'requests_per_second']) r;
SELECT resource, used, status FROM :s.usage_counters WHERE tenant_id = :t;

-- Claiming and waiting (docs/claiming.md): bad limits, bindings, claims and waits.
SELECT x AS call, pg_temp.refusal(x) FROM unnest(ARRAY[
  format('SELECT meshhook_limits.set_limit(''concurrent_executions_total'', 5, %L)', :t),
  'SELECT meshhook_limits.set_limit(''concurrent_executions_total'', 2.5)',
  'SELECT meshhook_limits.set_limit(''concurrent_executions.openai'', 1.5)',
  'SELECT meshhook_limits.set_limit(''fair_share_weight'', 0)',
  'SELECT meshhook_limits.set_limit(''fair_share_weight'', 2000000)',
  'SELECT meshhook_limits.bind_queue(''kafka'', ''q'')',
  'SELECT meshhook_limits.bind_queue(NULL, ''q'')',
  'SELECT meshhook_limits.bind_queue(''pgmq'', NULL)',
  'SELECT meshhook_limits.bind_queue(''pgboss'', ''q'')',
  'SELECT meshhook_limits.bind_queue(''pgmq'', ''q'')',
  'SELECT * FROM meshhook_limits.claim_jobs(''pgmq'', ''not_bound'')',
  'SELECT * FROM meshhook_limits.claim_jobs(''pgmq'', ''not_bound'', 0)',
  'SELECT * FROM meshhook_limits.claim_jobs(''pgmq'', ''not_bound'', 1001)',
  format('SELECT * FROM meshhook_limits.acquire_execution_slot(%L, wait => ''-1 second'')', :t),
  format('SELECT * FROM meshhook_limits.acquire_execution_slot(%L, wait => ''2 hours'')', :t),
  format('SELECT * FROM meshhook_limits.explain_admission(NULL)')]) x;
SELECT p AS path, pg_temp.refusal(format('SELECT meshhook_limits._json_path(%L, ''tenant_path'')', p))
  FROM unnest(ARRAY['', 'a..b', 'a.b.c.d.e.f.g.h.i', 'x''); DROP TABLE t; --', 'a b', '{a,b}', repeat('k', 64)]) p;
SELECT meshhook_limits.unbind_queue('pgmq', 'not_bound');
SELECT resource FROM :s.limits WHERE resource IN ('concurrent_executions_total', 'fair_share_weight')
   OR resource LIKE 'concurrent_executions.%';

-- The session survived every statement above, and still works.
SELECT granted FROM :s.acquire_execution_slot('00000000-0000-0000-0000-0000000000c2');
SELECT :s.release_execution_slot(slot_id) FROM :s.slots() WHERE tenant_id = '00000000-0000-0000-0000-0000000000c2';
