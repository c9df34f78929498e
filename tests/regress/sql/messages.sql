-- The messages and hints of issue 22: each refusal says what went wrong and
-- what to do, with its own SQLSTATE. One row per call: SQLSTATE, message
-- and hint.
\set SHOW_CONTEXT never
\set s meshhook_limits
\pset format unaligned
CREATE FUNCTION pg_temp.said(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE hint text;
BEGIN
  EXECUTE stmt;
  RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS hint = PG_EXCEPTION_HINT;
  RETURN SQLSTATE || ': ' || SQLERRM || CASE WHEN hint <> '' THEN E'\n  hint: ' || hint ELSE '' END;
END
$$;

-- Alert rules: an unknown metric, a new rule without one, a built-in that
-- cannot be dropped, an unknown built-in to reset.
SELECT pg_temp.said($$SELECT meshhook_limits.set_alert_rule('m_bad', 'queue.depth', 5)$$);
SELECT pg_temp.said($$SELECT meshhook_limits.set_alert_rule('m_new', threshold => 5)$$);
SELECT pg_temp.said($$SELECT meshhook_limits.drop_alert_rule('pool_utilisation')$$);
SELECT pg_temp.said($$SELECT meshhook_limits.reset_alert_rule('m_nope')$$);
-- Changing one argument keeps the others (a built-in switched off and on).
SELECT :s.set_alert_rule('pool_utilisation', enabled => false);
SELECT name, metric, threshold, for_duration, severity, enabled, origin
  FROM :s.effective_alert_rules WHERE name = 'pool_utilisation';
SELECT :s.reset_alert_rule('pool_utilisation') AS reset;

-- Queue thresholds: what is checked is what would apply, and it is shown.
SELECT :s.set_queue_thresholds('pgmq', 'm_q', warn_queued => 50, crit_queued => 500);
SELECT pg_temp.said($$SELECT meshhook_limits.set_queue_thresholds('pgmq', 'm_q', warn_queued => 600)$$);
SELECT pg_temp.said($$SELECT meshhook_limits.set_queue_thresholds('kafka', 'm_q')$$);
SELECT :s.set_queue_thresholds('pgmq', 'm_q', warn_queued => 60);
SELECT source, queue, warn_queued, crit_queued, warn_oldest_age FROM :s.queue_thresholds WHERE queue = 'm_q';
SELECT :s.reset_queue_thresholds('pgmq', 'm_q') AS reset;

-- Readers of health and pressure refuse a role that may not monitor.
CREATE ROLE m_nobody;
SET ROLE m_nobody;
SELECT pg_temp.said('SELECT * FROM meshhook_limits.queue_health()');
SELECT pg_temp.said('SELECT * FROM meshhook_limits.pool_pressure()');
SELECT pg_temp.said('SELECT * FROM meshhook_limits.pooler_health()');
SELECT pg_temp.said('SELECT meshhook_limits.metrics()');
RESET ROLE;

-- A tenant acting for another is pointed at where its own tenant came
-- from: its JWT claim, or meshhook_limits.tenant_id of its login role.
CREATE ROLE m_jwt NOINHERIT;
SET meshhook_limits.jwt_roles = 'm_jwt';
BEGIN;
SET LOCAL ROLE m_jwt;
SELECT set_config('request.jwt.claims', '{"role": "m_jwt", "app_metadata": {"tenant_id": "00000000-0000-0000-0000-0000000000a1"}}', true);
SELECT pg_temp.said($$SELECT * FROM meshhook_limits.acquire_execution_slot('00000000-0000-0000-0000-0000000000b1')$$);
ROLLBACK;

-- apply_session_limits outside a transaction block: a warning, as its
-- settings end with the statement.
SELECT count(*) AS settings FROM :s.apply_session_limits('00000000-0000-0000-0000-0000000000a1');

-- Only CREATE EXTENSION marks a database as newer than the server's start.
SELECT pg_temp.said('SELECT meshhook_limits._extension_created()');

DROP ROLE m_nobody, m_jwt;

-- A worker whose tenant is bound to its login role.
CREATE ROLE m_worker LOGIN;
ALTER ROLE m_worker SET meshhook_limits.tenant_id = '00000000-0000-0000-0000-0000000000a1';
\c - m_worker
\pset format unaligned
CREATE FUNCTION pg_temp.said(stmt text) RETURNS text LANGUAGE plpgsql AS $$
DECLARE hint text;
BEGIN
  EXECUTE stmt;
  RETURN 'accepted';
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS hint = PG_EXCEPTION_HINT;
  RETURN SQLSTATE || ': ' || SQLERRM || CASE WHEN hint <> '' THEN E'\n  hint: ' || hint ELSE '' END;
END
$$;
SELECT meshhook_limits.current_tenant();
SELECT pg_temp.said($$SELECT * FROM meshhook_limits.acquire_execution_slot('00000000-0000-0000-0000-0000000000b1')$$);
\c - postgres
DROP OWNED BY m_worker;
DROP ROLE m_worker;
