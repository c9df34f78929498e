-- meshhook_limits: queue health (pg-boss, pgmq), pool pressure, alerting and
-- tick(), the round the background worker (or pg_cron) runs every interval.
-- Queue systems are read with dynamic SQL: they may be absent, appear later,
-- or carry names that need quoting; every identifier goes through %I.

CREATE TABLE meshhook_limits.queue_samples (
  sampled_at timestamptz NOT NULL,
  source text NOT NULL CHECK (source IN ('pgboss', 'pgmq')),
  queue text NOT NULL,
  queued bigint NOT NULL,
  active bigint NOT NULL,
  failed_recent bigint NOT NULL,
  oldest_age interval,
  p50_ms numeric,
  p95_ms numeric,
  throughput_per_min numeric NOT NULL,
  error_rate numeric,
  status text NOT NULL,
  -- When active, failed_recent, p50/p95, throughput and error_rate were
  -- computed: the last full pass over the queue tables (queue_scan_budget).
  -- queued and oldest_age are always of sampled_at.
  stats_at timestamptz
);
CREATE INDEX queue_samples_at ON meshhook_limits.queue_samples (sampled_at);

CREATE TABLE meshhook_limits.pool_samples (
  sampled_at timestamptz PRIMARY KEY,
  max_connections int NOT NULL,
  total int NOT NULL,
  active int NOT NULL,
  idle int NOT NULL,
  idle_in_transaction int NOT NULL,
  waiting int NOT NULL,
  utilisation numeric NOT NULL,
  longest_transaction interval,
  status text NOT NULL,
  by_application jsonb NOT NULL,
  by_role jsonb NOT NULL
);

-- Thresholds of queue status; queue NULL = the default for a source (or all
-- sources with source '*'). The most specific row wins.
CREATE TABLE meshhook_limits.queue_thresholds (
  source text NOT NULL DEFAULT '*' CHECK (source IN ('*', 'pgboss', 'pgmq')),
  queue text,
  warn_queued bigint NOT NULL DEFAULT 1000,
  crit_queued bigint NOT NULL DEFAULT 10000,
  warn_oldest_age interval NOT NULL DEFAULT '5 minutes',
  crit_oldest_age interval NOT NULL DEFAULT '15 minutes',
  warn_error_rate numeric NOT NULL DEFAULT 0.05,
  crit_error_rate numeric NOT NULL DEFAULT 0.20,
  UNIQUE NULLS NOT DISTINCT (source, queue)
);
-- Empty by default: without a matching row the column defaults above apply.

-- Alert rules. metric: queue.queued, queue.oldest_age_seconds,
-- queue.error_rate, queue.failed_recent, pool.utilisation,
-- pool.idle_in_transaction, pool.waiting, tenant.usage_ratio.
CREATE TABLE meshhook_limits.alert_rules (
  name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
  metric text NOT NULL CHECK (metric IN ('queue.queued', 'queue.oldest_age_seconds', 'queue.error_rate',
      'queue.failed_recent', 'pool.utilisation', 'pool.idle_in_transaction', 'pool.waiting', 'tenant.usage_ratio')),
  comparison text NOT NULL DEFAULT '>' CHECK (comparison IN ('>', '>=', '<', '<=')),
  threshold numeric NOT NULL,
  -- Hysteresis: a firing alert resolves only once the value is back past this
  -- (NULL = the threshold itself).
  resolve_threshold numeric,
  for_duration interval NOT NULL DEFAULT '0' CHECK (for_duration >= interval '0'),
  severity text NOT NULL DEFAULT 'warning' CHECK (severity IN ('info', 'warning', 'critical')),
  labels jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(labels) = 'object'),
  enabled boolean NOT NULL DEFAULT true,
  description text
);
-- Built-in rules ship with the extension; a row of the same name in
-- alert_rules overrides one (enabled = false switches it off). Only
-- alert_rules is dumped, so pg_dump/restore never collides with them.
CREATE TABLE meshhook_limits.builtin_alert_rules (LIKE meshhook_limits.alert_rules INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE meshhook_limits.builtin_alert_rules ADD PRIMARY KEY (name);
INSERT INTO meshhook_limits.builtin_alert_rules (name, metric, threshold, resolve_threshold, for_duration, severity, description) VALUES
  ('queue_backlog', 'queue.queued', 1000, 800, '2 minutes', 'warning', 'a queue has more than 1000 jobs waiting'),
  ('queue_oldest_age', 'queue.oldest_age_seconds', 300, 240, '1 minute', 'warning', 'the oldest waiting job is older than 5 minutes'),
  ('queue_error_rate', 'queue.error_rate', 0.2, 0.1, '5 minutes', 'critical', 'more than 20% of recent jobs failed'),
  ('pool_utilisation', 'pool.utilisation', 0.9, 0.85, '5 minutes', 'critical', 'connections above 90% of max_connections'),
  ('tenant_near_limit', 'tenant.usage_ratio', 0.9, 0.8, '0', 'warning', 'a tenant uses more than 90% of a limit');

CREATE TABLE meshhook_limits.alert_states (
  rule text NOT NULL,
  series text NOT NULL,
  labels jsonb NOT NULL,
  tenant_id uuid,
  state text NOT NULL CHECK (state IN ('pending', 'firing')),
  value numeric,
  since timestamptz NOT NULL,
  fired_at timestamptz,
  PRIMARY KEY (rule, series)
);

CREATE TABLE meshhook_limits.worker_state (
  id boolean PRIMARY KEY DEFAULT true CHECK (id),
  last_tick timestamptz,
  last_tick_ms numeric,
  queues_sampled_at timestamptz,
  -- The last full pass over the queue tables, and how long it took.
  queue_stats_at timestamptz,
  queue_stats_ms numeric,
  ticks bigint NOT NULL DEFAULT 0,
  errors bigint NOT NULL DEFAULT 0,
  last_error text
);
INSERT INTO meshhook_limits.worker_state DEFAULT VALUES;

SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.queue_thresholds', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.alert_rules', '');
-- So that a restored database does not send a firing alert's alert.firing again.
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.alert_states', '');

ALTER TABLE meshhook_limits.queue_samples ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.pool_samples ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.queue_thresholds ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.alert_rules ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.builtin_alert_rules ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.builtin_alert_rules FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
ALTER TABLE meshhook_limits.alert_states ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.worker_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.queue_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.pool_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.queue_thresholds FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.alert_rules FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.alert_states FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.alert_states FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
CREATE POLICY admin_all ON meshhook_limits.worker_state FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.builtin_alert_rules TO PUBLIC;
GRANT SELECT ON meshhook_limits.queue_samples, meshhook_limits.pool_samples, meshhook_limits.queue_thresholds,
  meshhook_limits.alert_rules, meshhook_limits.alert_states, meshhook_limits.worker_state TO PUBLIC;

CREATE FUNCTION meshhook_limits._queue_status(p_source text, p_queue text, p_queued bigint, p_oldest interval,
                                              p_error_rate numeric)
RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE
    WHEN p_queued >= t.crit_queued OR p_oldest >= t.crit_oldest_age OR p_error_rate >= t.crit_error_rate THEN 'critical'
    WHEN p_queued >= t.warn_queued OR p_oldest >= t.warn_oldest_age OR p_error_rate >= t.warn_error_rate THEN 'warning'
    ELSE 'ok' END
  FROM (SELECT x.warn_queued, x.crit_queued, x.warn_oldest_age, x.crit_oldest_age, x.warn_error_rate, x.crit_error_rate,
               (x.queue IS NULL)::int * 2 + (x.source = '*')::int AS rank
          FROM meshhook_limits.queue_thresholds x
         WHERE x.source IN (p_source, '*') AND (x.queue = p_queue OR x.queue IS NULL)
        UNION ALL
        SELECT 1000, 10000, interval '5 minutes', interval '15 minutes', 0.05, 0.20, 99) t
  ORDER BY t.rank
  LIMIT 1
$$;

-- The rules in force: user rules, and built-in rules not overridden by name.
-- security_invoker: the caller's row-level security applies (tenants see none).
CREATE VIEW meshhook_limits.effective_alert_rules WITH (security_invoker = true) AS
  SELECT u.*, 'user'::text AS origin FROM meshhook_limits.alert_rules u
  UNION ALL
  SELECT b.*, 'builtin' FROM meshhook_limits.builtin_alert_rules b
   WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits.alert_rules u WHERE u.name = b.name);
GRANT SELECT ON meshhook_limits.effective_alert_rules TO PUBLIC;

-- Waiting jobs per pg-boss queue (states before 'active': created, retry),
-- read through pg-boss's own partial index job_i5 (... WHERE state <
-- 'active'), index-only: the cost follows the waiting jobs, not the table.
-- The planner is told so: on a fresh or bloated job table its statistics
-- lead it to a (parallel) sequential or bitmap scan of the whole heap, and a
-- plain index scan also marks the dead entries it meets, so the next tick
-- skips them. (The enum comparison, not a cast, matches the index predicate.)
CREATE FUNCTION meshhook_limits._pgboss_waiting()
RETURNS TABLE(name text, queued bigint, oldest timestamptz)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET enable_bitmapscan = off
SET max_parallel_workers_per_gather = 0
AS $$
BEGIN
  -- As the owner of pgboss.job (see _read_as_owner), never as ourselves.
  RETURN QUERY SELECT w.name, w.queued, w.oldest
    FROM pg_catalog.jsonb_to_recordset(meshhook_limits._read_as_owner(pg_catalog.to_regclass('pgboss.job'), $q$
      SELECT coalesce(pg_catalog.jsonb_agg(x), '[]') FROM (
        SELECT j.name::text AS name, count(*) AS queued, min(j.created_on) AS oldest
          FROM pgboss.job j WHERE j.state < 'active' GROUP BY j.name) x $q$))
      AS w(name text, queued bigint, oldest timestamptz);
END
$$;

-- One sample of every pg-boss queue (v10: job + archive; v11+: job).
-- p_full: every count and statistic in one pass over the job table.
-- Otherwise queued and oldest_age only, through pg-boss's own partial index
-- on waiting jobs (job_i5 ... WHERE state < 'active'), at a cost that grows
-- with the waiting jobs, not with the table; the other columns are carried
-- from the previous sample with their stats_at.
CREATE FUNCTION meshhook_limits._sample_pgboss(p_at timestamptz, p_window interval, p_full boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE n bigint; src text; job oid := pg_catalog.to_regclass('pgboss.job');
  queue oid := pg_catalog.to_regclass('pgboss.queue'); stats jsonb;
BEGIN
  IF job IS NULL OR queue IS NULL THEN
    RETURN 0;
  END IF;
  -- pg-boss's tables are read as their owner (_read_as_owner), never as
  -- ourselves: their owner may not be trusted with our rights.
  IF NOT p_full THEN
    WITH waiting AS (SELECT * FROM meshhook_limits._pgboss_waiting()),
    prev AS (SELECT p.* FROM meshhook_limits._latest_queue_samples() p WHERE p.source = 'pgboss')
    INSERT INTO meshhook_limits.queue_samples
      SELECT p_at, 'pgboss', q.name, coalesce(w.queued, 0), coalesce(p.active, 0), coalesce(p.failed_recent, 0),
             p_at - w.oldest, p.p50_ms, p.p95_ms, coalesce(p.throughput_per_min, 0), p.error_rate,
             meshhook_limits._queue_status('pgboss', q.name, coalesce(w.queued, 0), p_at - w.oldest, p.error_rate),
             p.stats_at
        FROM pg_catalog.jsonb_array_elements_text(meshhook_limits._read_as_owner(queue,
               'SELECT coalesce(pg_catalog.jsonb_agg(q.name::text), ''[]'') FROM pgboss.queue q')) AS q(name)
        LEFT JOIN waiting w ON w.name = q.name
        LEFT JOIN prev p ON p.queue = q.name;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
  END IF;
  -- One pass over the job table, aggregating only live jobs (pg-boss leaves
  -- completed_on NULL until a job is finished) and jobs finished within the
  -- window. v11+: finished jobs stay in it, and states
  -- are compared as pg-boss's own enum (no cast per row). v10 moves finished
  -- jobs to pgboss.archive, read only for the window.
  IF pg_catalog.to_regclass('pgboss.archive') IS NULL THEN
    src := 'SELECT name, state, created_on, started_on, completed_on FROM pgboss.job
             WHERE completed_on IS NULL OR completed_on > $1 - $2';
  ELSE
    src := 'SELECT name, state::text AS state, created_on, started_on, completed_on FROM pgboss.job
             WHERE completed_on IS NULL OR completed_on > $1 - $2
            UNION ALL SELECT name, state::text, created_on, started_on, completed_on FROM pgboss.archive
             WHERE completed_on > $1 - $2';
  END IF;
  stats := meshhook_limits._read_as_owner(job, format($q$
    WITH j AS (%1$s),
    agg AS (
      SELECT name,
             count(*) FILTER (WHERE state IN ('created', 'retry')) AS queued,
             count(*) FILTER (WHERE state = 'active') AS active,
             min(created_on) FILTER (WHERE state IN ('created', 'retry')) AS oldest,
             count(*) FILTER (WHERE state = 'failed' AND completed_on > $1 - $2) AS failed,
             count(*) FILTER (WHERE state = 'completed' AND completed_on > $1 - $2) AS completed,
             count(*) FILTER (WHERE state = 'completed' AND completed_on > $1 - interval '1 minute') AS last_minute,
             -- Plain aggregates only, so the scan can feed a hash aggregate;
             -- the percentiles come from these (window-sized) arrays below.
             array_agg(date_part('epoch', completed_on - started_on) * 1000)
               FILTER (WHERE state = 'completed' AND completed_on > $1 - $2 AND started_on IS NOT NULL) AS durations
        FROM j GROUP BY name),
    s AS (
      SELECT q.name, coalesce(a.queued, 0) AS queued, coalesce(a.active, 0) AS active,
             coalesce(a.failed, 0) AS failed, $1 - a.oldest AS oldest_age,
             round(pc.p50::numeric, 3) AS p50, round(pc.p95::numeric, 3) AS p95,
             coalesce(a.last_minute, 0)::numeric AS tput,
             CASE WHEN coalesce(a.failed, 0) + coalesce(a.completed, 0) > 0
                  THEN round(a.failed::numeric / (a.failed + a.completed), 4) END AS err
        FROM pgboss.queue q LEFT JOIN agg a ON a.name = q.name
        LEFT JOIN LATERAL (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50,
                                  percentile_cont(0.95) WITHIN GROUP (ORDER BY d) AS p95
                             FROM unnest(a.durations) d) pc ON true)
    SELECT coalesce(pg_catalog.jsonb_agg(s), '[]') FROM s $q$, src), p_at, p_window);
  INSERT INTO meshhook_limits.queue_samples
    SELECT p_at, 'pgboss', s.name, s.queued, s.active, s.failed, s.oldest_age, s.p50::numeric, s.p95::numeric,
           s.tput::numeric, s.err::numeric,
           meshhook_limits._queue_status('pgboss', s.name, s.queued, s.oldest_age, s.err::numeric), p_at
      -- float8: numbers that come from the queue owner's side are finite
      -- doubles, or the sample fails here (and is skipped) rather than later.
      FROM pg_catalog.jsonb_to_recordset(stats) AS s(name text, queued bigint, active bigint, failed bigint,
           oldest_age interval, p50 float8, p95 float8, tput float8, err float8);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

-- One sample of every pgmq queue in pgmq.meta: queued = visible, active =
-- read and still invisible, so queued + active = pgmq.metrics().queue_length.
-- p_full: also the archive's statistics of the window (p50/p95, throughput);
-- otherwise those are carried from the previous sample with their stats_at.
CREATE FUNCTION meshhook_limits._sample_pgmq(p_at timestamptz, p_window interval, p_full boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE q record; n bigint; qt text; at_ text; r record; a record; stats timestamptz;
  v_p50 numeric; v_p95 numeric; v_tput numeric;
  rows meshhook_limits.queue_samples[] := '{}';
BEGIN
  IF pg_catalog.to_regclass('pgmq.meta') IS NULL THEN
    RETURN 0;
  END IF;
  -- pgmq's tables are read as their owner (_read_as_owner), never as ourselves.
  FOR q IN SELECT x.name FROM pg_catalog.jsonb_array_elements_text(meshhook_limits._read_as_owner(
             pg_catalog.to_regclass('pgmq.meta'),
             'SELECT coalesce(pg_catalog.jsonb_agg(m.queue_name::text), ''[]'') FROM pgmq.meta m')) AS x(name)
            ORDER BY 1 LOOP
    qt := lower('q_' || q.name);
    at_ := lower('a_' || q.name);
    -- Each queue in its own read-only subtransaction (no XID is assigned):
    -- a broken or locked queue table is skipped with a warning, the others
    -- are still sampled.
    BEGIN
      CONTINUE WHEN pg_catalog.to_regclass(format('pgmq.%I', qt)) IS NULL;
      SELECT * INTO r FROM pg_catalog.jsonb_to_record(meshhook_limits._read_as_owner(
          pg_catalog.to_regclass(format('pgmq.%I', qt)),
          format('SELECT pg_catalog.to_jsonb(x) FROM (SELECT count(*) FILTER (WHERE vt <= $1) AS visible,
                         count(*) FILTER (WHERE vt > $1) AS invisible,
                         min(enqueued_at) FILTER (WHERE vt <= $1) AS oldest FROM pgmq.%I) x', qt), p_at))
        AS x(visible bigint, invisible bigint, oldest timestamptz);
      v_p50 := NULL; v_p95 := NULL; v_tput := 0; stats := p_at;
      IF NOT p_full THEN
        -- (_latest_queue_samples() inline: as a function with a SET clause it
        -- would be planned again for every queue)
        SELECT p.p50_ms, p.p95_ms, p.throughput_per_min, p.stats_at INTO v_p50, v_p95, v_tput, stats
          FROM meshhook_limits.queue_samples p
         WHERE p.source = 'pgmq' AND p.queue = q.name
           AND p.sampled_at = (SELECT w.queues_sampled_at FROM meshhook_limits.worker_state w);
      ELSIF pg_catalog.to_regclass(format('pgmq.%I', at_)) IS NOT NULL THEN
        SELECT * INTO a FROM pg_catalog.jsonb_to_record(meshhook_limits._read_as_owner(
            pg_catalog.to_regclass(format('pgmq.%I', at_)),
            format('SELECT pg_catalog.to_jsonb(x) FROM (
               SELECT count(*) FILTER (WHERE archived_at > $1 - interval ''1 minute'') AS last_minute,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM archived_at - enqueued_at) * 1000) AS p50,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM archived_at - enqueued_at) * 1000) AS p95
               FROM pgmq.%I WHERE archived_at > $1 - $2) x', at_), p_at, p_window))
          AS x(last_minute bigint, p50 float8, p95 float8);
        v_p50 := round(a.p50::numeric, 3); v_p95 := round(a.p95::numeric, 3); v_tput := coalesce(a.last_minute, 0);
      END IF;
      rows := rows || ROW(p_at, 'pgmq', q.name, r.visible, r.invisible, 0, p_at - r.oldest,
                          v_p50, v_p95, coalesce(v_tput, 0), NULL,
                          meshhook_limits._queue_status('pgmq', q.name, r.visible, p_at - r.oldest, NULL), stats
                         )::meshhook_limits.queue_samples;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: skipped pgmq queue %: %', quote_literal(q.name), SQLERRM;
      rows := rows || ARRAY(SELECT ROW(p_at, p.source, p.queue, p.queued, p.active, p.failed_recent, p.oldest_age,
                                       p.p50_ms, p.p95_ms, p.throughput_per_min, p.error_rate, p.status, p.stats_at
                                      )::meshhook_limits.queue_samples
                              FROM meshhook_limits._latest_queue_samples() p
                             WHERE p.source = 'pgmq' AND p.queue = q.name);
    END;
  END LOOP;
  INSERT INTO meshhook_limits.queue_samples SELECT * FROM unnest(rows);
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n;
END
$$;

CREATE FUNCTION meshhook_limits._sample_pool(p_at timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  usable int := current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int;
  warn numeric := current_setting('meshhook_limits.pool_warning')::numeric;
  crit numeric := current_setting('meshhook_limits.pool_critical')::numeric;
  crit_for interval := current_setting('meshhook_limits.pool_critical_for')::interval;
  s record; st text; held boolean;
BEGIN
  SELECT count(*)::int AS total,
         count(*) FILTER (WHERE a.state = 'active')::int AS active,
         count(*) FILTER (WHERE a.state = 'idle')::int AS idle,
         count(*) FILTER (WHERE a.state LIKE 'idle in transaction%')::int AS iit,
         count(*) FILTER (WHERE a.wait_event_type = 'Lock')::int AS waiting,
         max(p_at - a.xact_start) AS longest,
         coalesce((SELECT jsonb_object_agg(k, c) FROM (SELECT coalesce(nullif(b.application_name, ''), '(none)') k, count(*) c
                    FROM pg_catalog.pg_stat_activity b WHERE b.backend_type = 'client backend' GROUP BY 1) x), '{}') AS by_app,
         coalesce((SELECT jsonb_object_agg(k, c) FROM (SELECT coalesce(b.usename::text, '(none)') k, count(*) c
                    FROM pg_catalog.pg_stat_activity b WHERE b.backend_type = 'client backend' GROUP BY 1) x), '{}') AS by_role
    INTO s
    FROM pg_catalog.pg_stat_activity a
   WHERE a.backend_type = 'client backend';
  -- Critical only once utilisation has stayed at or above the critical
  -- threshold for crit_for (every sample of that span, and the span covered).
  held := s.total::numeric / GREATEST(usable, 1) >= crit
      AND EXISTS (SELECT 1 FROM meshhook_limits.pool_samples p WHERE p.sampled_at <= p_at - crit_for)
      AND NOT EXISTS (SELECT 1 FROM meshhook_limits.pool_samples p
                       WHERE p.sampled_at > p_at - crit_for AND p.utilisation < crit);
  st := CASE WHEN held THEN 'critical'
             WHEN s.total::numeric / GREATEST(usable, 1) >= warn THEN 'warning' ELSE 'ok' END;
  INSERT INTO meshhook_limits.pool_samples
  VALUES (p_at, usable, s.total, s.active, s.idle, s.iit, s.waiting,
          round(s.total::numeric / GREATEST(usable, 1), 4), s.longest, st, s.by_app, s.by_role)
  ON CONFLICT (sampled_at) DO NOTHING;
END
$$;

-- Current value of every series of a metric, with its labels.
CREATE FUNCTION meshhook_limits._series(p_metric text)
RETURNS TABLE(series text, labels jsonb, tenant_id uuid, value numeric)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE tenants uuid[];
BEGIN
  IF p_metric LIKE 'queue.%' THEN
    RETURN QUERY
      SELECT h.source || ':' || h.queue, jsonb_build_object('source', h.source, 'queue', h.queue), NULL::uuid,
             CASE p_metric WHEN 'queue.queued' THEN h.queued::numeric
                           WHEN 'queue.oldest_age_seconds' THEN coalesce(extract(epoch FROM h.oldest_age), 0)
                           WHEN 'queue.error_rate' THEN h.error_rate
                           ELSE h.failed_recent::numeric END
        FROM meshhook_limits._latest_queue_samples() h;
  ELSIF p_metric LIKE 'pool.%' THEN
    RETURN QUERY
      SELECT 'pool', '{}'::jsonb, NULL::uuid,
             CASE p_metric WHEN 'pool.utilisation' THEN p.utilisation
                           WHEN 'pool.idle_in_transaction' THEN p.idle_in_transaction::numeric
                           ELSE p.waiting::numeric END
        FROM meshhook_limits.pool_samples p ORDER BY p.sampled_at DESC LIMIT 1;
  ELSIF p_metric = 'tenant.usage_ratio' THEN
    -- Every tenant metered in the last day, with live slots, or storing data
    -- (none: skip planning the usage query at all, every tick).
    tenants := meshhook_limits._active_tenants(NULL);
    IF cardinality(tenants) = 0 THEN
      RETURN;
    END IF;
    RETURN QUERY
      SELECT u.tenant_id::text || ':' || u.resource, jsonb_build_object('tenant_id', u.tenant_id, 'resource', u.resource),
             u.tenant_id, round(u.used / u.limit_value, 6)
        FROM meshhook_limits._usage_ratios(tenants) u
       WHERE u.used IS NOT NULL AND u.limit_value > 0;
  END IF;
END
$$;

-- Tenants worth watching: live slots first, then the most recently metered,
-- then those storing data; at most p_max (NULL = all).
CREATE FUNCTION meshhook_limits._active_tenants(p_max int, p_busiest uuid[] DEFAULT '{}')
RETURNS uuid[] LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT coalesce(array_agg(c.tenant_id ORDER BY c.prio, c.seen DESC, c.tenant_id), '{}') FROM (
    SELECT x.tenant_id, min(x.prio) AS prio, max(x.seen) AS seen FROM (
      SELECT b AS tenant_id, 0 AS prio, pg_catalog.now() AS seen FROM unnest(p_busiest) b
      UNION ALL
      SELECT s.tenant_id, 0, pg_catalog.now() FROM meshhook_limits.slots() s WHERE s.state = 'live' AND p_max IS NULL
      UNION ALL
      SELECT u.tenant_id, 1, max(u.updated_at) FROM meshhook_limits.usage_counters u
       WHERE u.updated_at > pg_catalog.now() - interval '1 day' GROUP BY u.tenant_id
      UNION ALL
      SELECT s.tenant_id, 1, pg_catalog.now() - interval '1 day' FROM meshhook_limits.storage_totals s WHERE s.bytes > 0
    ) x GROUP BY x.tenant_id
    ORDER BY 2, 3 DESC, 1
    LIMIT p_max) c
$$;

-- Usage against effective limits for many tenants at once (tenant scope:
-- tenant → plan → global), set-based: one pass, not one resolution per tenant.
-- used is NULL for resources that have no usage (execution_seconds, rates).
CREATE FUNCTION meshhook_limits._usage_ratios(p_tenants uuid[])
RETURNS TABLE(tenant_id uuid, resource text, used numeric, limit_value numeric, warn_ratio numeric)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH t AS (SELECT DISTINCT x AS tenant_id FROM unnest(p_tenants) x),
  -- Equality joins per level (hashable), most specific first.
  eff AS (
    SELECT DISTINCT ON (x.tenant_id, x.resource) x.tenant_id, x.resource, x.limit_value, x.window_length, x.warn_ratio
      FROM (
        SELECT t.tenant_id, l.resource, l.limit_value, l.window_length, l.warn_ratio, 1 AS rank
          FROM t JOIN meshhook_limits.limits l ON l.tenant_id = t.tenant_id AND l.project_id IS NULL
        UNION ALL
        SELECT t.tenant_id, l.resource, l.limit_value, l.window_length, l.warn_ratio, 2
          FROM t JOIN meshhook_limits.tenant_plans tp ON tp.tenant_id = t.tenant_id
                 JOIN meshhook_limits.limits l ON l.plan = tp.plan
        UNION ALL
        SELECT t.tenant_id, g.resource, g.limit_value, g.window_length, g.warn_ratio, 3
          FROM t CROSS JOIN (SELECT * FROM meshhook_limits.limits l WHERE l.tenant_id IS NULL AND l.plan IS NULL) g) x
     ORDER BY x.tenant_id, x.resource, x.rank),
  live AS (SELECT s.tenant_id, count(*) AS n FROM meshhook_limits.slots() s
            WHERE s.state = 'live' GROUP BY s.tenant_id),
  nil AS (SELECT '00000000-0000-0000-0000-000000000000'::uuid AS id)
  SELECT e.tenant_id, e.resource,
         CASE
           WHEN e.resource = 'concurrent_executions' THEN coalesce(lv.n, 0)::numeric
           WHEN e.resource = 'storage_bytes' THEN
             -- Tracked tables, plus the last reading reported with record_usage.
             coalesce(st.bytes, 0)
             + coalesce((SELECT u.used FROM meshhook_limits.usage_counters u, nil
                          WHERE u.tenant_id = e.tenant_id AND u.resource = 'storage_bytes'
                            AND u.project_id = nil.id AND u.window_start = 'epoch'), 0)
           WHEN e.window_length IS NOT NULL THEN
             coalesce((SELECT u.used FROM meshhook_limits.usage_counters u, nil
                        WHERE u.tenant_id = e.tenant_id AND u.resource = e.resource AND u.project_id = nil.id
                          AND u.window_start = to_timestamp(floor(extract(epoch FROM pg_catalog.now())
                               / extract(epoch FROM e.window_length)) * extract(epoch FROM e.window_length))), 0)
           WHEN e.resource = 'memory_bytes' THEN
             (SELECT u.used FROM meshhook_limits.usage_counters u, nil
               WHERE u.tenant_id = e.tenant_id AND u.resource = e.resource AND u.project_id = nil.id
                 AND u.window_start = 'epoch')
         END,
         e.limit_value, e.warn_ratio
    FROM eff e
    LEFT JOIN live lv ON lv.tenant_id = e.tenant_id
    LEFT JOIN meshhook_limits.storage_totals st ON st.tenant_id = e.tenant_id
$$;

-- usage(tenant) without the caller check: one tenant of _usage_ratios.
CREATE FUNCTION meshhook_limits._usage(p_tenant uuid)
RETURNS TABLE(resource text, used numeric, limit_value numeric, ratio numeric, status text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT u.resource, u.used, u.limit_value,
         CASE WHEN u.used IS NULL THEN NULL
              WHEN u.limit_value = 0 THEN CASE WHEN u.used > 0 THEN 'Infinity'::numeric ELSE 0 END
              ELSE round(u.used / u.limit_value, 4) END,
         CASE WHEN u.used IS NULL THEN 'ok' ELSE meshhook_limits._status(u.used, u.limit_value, u.warn_ratio) END
    FROM meshhook_limits._usage_ratios(ARRAY[p_tenant]) u
   ORDER BY u.resource
$$;

CREATE FUNCTION meshhook_limits._latest_queue_samples()
RETURNS SETOF meshhook_limits.queue_samples
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT s.* FROM meshhook_limits.queue_samples s
   WHERE s.sampled_at = (SELECT w.queues_sampled_at FROM meshhook_limits.worker_state w)
$$;

-- A sample that could not be taken (a locked or broken queue table) is not a
-- recovery: the queue's last sample stands, with its old sampled values.
CREATE FUNCTION meshhook_limits._carry_queue_samples(p_at timestamptz, p_source text, p_queue text DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO meshhook_limits.queue_samples
    (sampled_at, source, queue, queued, active, failed_recent, oldest_age, p50_ms, p95_ms, throughput_per_min,
     error_rate, status, stats_at)
  SELECT p_at, p.source, p.queue, p.queued, p.active, p.failed_recent, p.oldest_age, p.p50_ms, p.p95_ms,
         p.throughput_per_min, p.error_rate, p.status, p.stats_at
    FROM meshhook_limits._latest_queue_samples() p
   WHERE p.source = p_source AND (p_queue IS NULL OR p.queue = p_queue)
$$;

-- alert.firing / alert.resolved of one series of a rule.
CREATE FUNCTION meshhook_limits._emit_alert(p_event text, p_rule text, p_metric text, p_severity text,
                                            p_threshold numeric, p_tenant uuid, p_value numeric,
                                            p_labels jsonb, p_since timestamptz)
RETURNS void LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
  SELECT meshhook_limits._emit(p_event, p_tenant, p_metric, p_value, p_threshold,
    jsonb_build_object('rule', p_rule, 'severity', p_severity, 'labels', p_labels, 'since', p_since))
$$;

CREATE FUNCTION meshhook_limits._compare(p_value numeric, p_op text, p_threshold numeric) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE p_op WHEN '>' THEN p_value > p_threshold WHEN '>=' THEN p_value >= p_threshold
                   WHEN '<' THEN p_value < p_threshold ELSE p_value <= p_threshold END
$$;

-- pending → firing after for_duration (alert.firing), firing → resolved once
-- the value is back past resolve_threshold (alert.resolved). A series that
-- disappears resolves too. One event per transition: no storms.
CREATE FUNCTION meshhook_limits._evaluate_alerts(p_at timestamptz) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE rule record; s record; st record; n bigint := 0; active boolean; clear_thr numeric;
  v_series text[]; v_labels jsonb[]; v_tenants uuid[]; v_values numeric[];
BEGIN
  FOR rule IN SELECT * FROM meshhook_limits.effective_alert_rules r WHERE r.enabled ORDER BY r.name LOOP
  -- Each rule on its own: one that fails (a bad series value, say) is
  -- logged and counted in worker_state.errors; the others are evaluated.
  BEGIN
    clear_thr := coalesce(rule.resolve_threshold, rule.threshold);
    -- The rule's series, read once into arrays (unnest zips them back).
    SELECT coalesce(array_agg(x.series), '{}'), coalesce(array_agg(x.labels), '{}'),
           coalesce(array_agg(x.tenant_id), '{}'), coalesce(array_agg(x.value), '{}')
      INTO v_series, v_labels, v_tenants, v_values
      FROM meshhook_limits._series(rule.metric) x WHERE x.labels @> rule.labels;
    -- Set-based first: only series that change state go through the loop —
    -- new past the threshold, pending that clears or is due, firing that is
    -- back past resolve_threshold. With 1,000 quiet or steadily alerting
    -- queues, none do.
    FOR s IN SELECT c.series, c.labels, c.tenant_id, c.value
               FROM unnest(v_series, v_labels, v_tenants, v_values) AS c(series, labels, tenant_id, value)
               LEFT JOIN meshhook_limits.alert_states a ON a.rule = rule.name AND a.series = c.series
              WHERE (a.rule IS NULL AND c.value IS NOT NULL
                     AND meshhook_limits._compare(c.value, rule.comparison, rule.threshold))
                 OR (a.state = 'pending' AND (c.value IS NULL
                     OR NOT meshhook_limits._compare(c.value, rule.comparison, rule.threshold)
                     OR p_at - a.since >= rule.for_duration))
                 OR (a.state = 'firing' AND (c.value IS NULL
                     OR NOT meshhook_limits._compare(c.value, rule.comparison, clear_thr))) LOOP
      SELECT * INTO st FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
      active := s.value IS NOT NULL AND meshhook_limits._compare(s.value, rule.comparison, rule.threshold);
      IF st IS NULL OR st.rule IS NULL THEN
        IF active THEN
          INSERT INTO meshhook_limits.alert_states VALUES (rule.name, s.series, s.labels, s.tenant_id, 'pending', s.value, p_at, NULL);
          SELECT * INTO st FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
        ELSE
          CONTINUE;
        END IF;
      END IF;
      IF st.state = 'pending' THEN
        IF NOT active THEN
          DELETE FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
        ELSIF p_at - st.since >= rule.for_duration THEN
          UPDATE meshhook_limits.alert_states a SET state = 'firing', fired_at = p_at, value = s.value
           WHERE a.rule = rule.name AND a.series = s.series;
          PERFORM meshhook_limits._emit_alert('alert.firing', rule.name, rule.metric, rule.severity, rule.threshold,
                                              s.tenant_id, s.value, s.labels, st.since);
          n := n + 1;
        ELSE
          UPDATE meshhook_limits.alert_states a SET value = s.value WHERE a.rule = rule.name AND a.series = s.series;
        END IF;
      ELSIF st.state = 'firing' THEN
        IF s.value IS NULL OR NOT meshhook_limits._compare(s.value, rule.comparison, clear_thr) THEN
          DELETE FROM meshhook_limits.alert_states a WHERE a.rule = rule.name AND a.series = s.series;
          PERFORM meshhook_limits._emit_alert('alert.resolved', rule.name, rule.metric, rule.severity, rule.threshold,
                                              s.tenant_id, s.value, s.labels, st.since);
          n := n + 1;
        ELSE
          UPDATE meshhook_limits.alert_states a SET value = s.value WHERE a.rule = rule.name AND a.series = s.series;
        END IF;
      END IF;
    END LOOP;
    -- Series that stay pending or firing: their current value, in one statement.
    UPDATE meshhook_limits.alert_states a SET value = c.value
      FROM unnest(v_series, v_values) AS c(series, value)
     WHERE a.rule = rule.name AND a.series = c.series AND a.value IS DISTINCT FROM c.value;
    -- Series that are gone (a queue dropped, a tenant idle): resolve or forget.
    FOR st IN DELETE FROM meshhook_limits.alert_states a
               WHERE a.rule = rule.name
                 AND NOT EXISTS (SELECT 1 FROM unnest(v_series) AS c(series) WHERE c.series = a.series)
               RETURNING a.* LOOP
      IF st.state = 'firing' THEN
        PERFORM meshhook_limits._emit_alert('alert.resolved', rule.name, rule.metric, rule.severity, rule.threshold,
                                            st.tenant_id, NULL, st.labels, st.since);
        n := n + 1;
      END IF;
    END LOOP;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: alert rule % failed: %', quote_literal(rule.name), SQLERRM;
    UPDATE meshhook_limits.worker_state
       SET errors = errors + 1, last_error = format('alert rule %s: %s', rule.name, SQLERRM);
  END;
  END LOOP;
  -- Rules that were disabled or deleted stop quietly.
  DELETE FROM meshhook_limits.alert_states a
   WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits.effective_alert_rules r WHERE r.name = a.rule AND r.enabled);
  RETURN n;
END
$$;

-- One round: sample the queues and the pool, reap slots, evaluate alerts,
-- prune old samples. The worker runs it every sample_interval; without the
-- worker, pg_cron can: SELECT cron.schedule('meshhook', '1 second', 'SELECT meshhook_limits.tick()').
CREATE FUNCTION meshhook_limits.tick() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET lock_timeout = '200ms'   -- a locked queue table is skipped, never waited on
SET work_mem = '32MB'        -- percentiles over busy queues sort in memory
SET max_parallel_workers_per_gather = 0  -- a sampler takes one core at most, never the queues' CPUs
AS $$
DECLARE
  t0 timestamptz := pg_catalog.clock_timestamp();
  win interval;
  keep interval;
  budget float8;
  ws record;
  full_pass boolean;
  t_full timestamptz;
BEGIN
  -- The first call of a session (pg_cron opens one per run) loads the library
  -- here, which defines the settings read below.
  PERFORM meshhook_limits.require_admin_access('run tick()');
  win := current_setting('meshhook_limits.queue_window')::interval;
  keep := current_setting('meshhook_limits.retention')::interval;
  budget := current_setting('meshhook_limits.queue_scan_budget')::float8;
  -- A full pass over the queue tables when the budget allows: the last one
  -- took queue_stats_ms, so the next may start queue_stats_ms / budget after
  -- it. Also when there is no previous sample to carry statistics from.
  SELECT w.queue_stats_at, w.queue_stats_ms INTO ws FROM meshhook_limits.worker_state w;
  full_pass := budget >= 1 OR ws.queue_stats_at IS NULL OR ws.queue_stats_at > t0
    OR t0 >= ws.queue_stats_at + (coalesce(ws.queue_stats_ms, 0) / budget) * interval '1 millisecond'
    OR NOT EXISTS (SELECT 1 FROM meshhook_limits._latest_queue_samples());
  t_full := pg_catalog.clock_timestamp();
  BEGIN
    PERFORM meshhook_limits._sample_pgboss(t0, win, full_pass);
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: sampling pg-boss failed: %', SQLERRM;
    PERFORM meshhook_limits._carry_queue_samples(t0, 'pgboss');
  END;
  BEGIN
    PERFORM meshhook_limits._sample_pgmq(t0, win, full_pass);
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: sampling pgmq failed: %', SQLERRM;
    PERFORM meshhook_limits._carry_queue_samples(t0, 'pgmq');
  END;
  -- queue_health() and the alert rules read the samples of this time.
  UPDATE meshhook_limits.worker_state
     SET queues_sampled_at = t0,
         queue_stats_at = CASE WHEN full_pass THEN t0 ELSE queue_stats_at END,
         queue_stats_ms = CASE WHEN full_pass
                               THEN round(extract(epoch FROM pg_catalog.clock_timestamp() - t_full) * 1000, 3)
                               ELSE queue_stats_ms END;
  -- Each step on its own: one that fails (bad stored data, a locked table)
  -- is logged and the others still run, so reaping never stops.
  BEGIN
    PERFORM meshhook_limits.reap_execution_slots();
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: reaping slots failed: %', SQLERRM;
  END;
  BEGIN
    PERFORM meshhook_limits._sample_pool(t0);
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: sampling the pool failed: %', SQLERRM;
  END;
  BEGIN
    PERFORM meshhook_limits._evaluate_alerts(t0);
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: evaluating alerts failed: %', SQLERRM;
  END;
  DELETE FROM meshhook_limits.queue_samples s WHERE s.sampled_at < t0 - keep;
  DELETE FROM meshhook_limits.pool_samples s WHERE s.sampled_at < t0 - GREATEST(keep, current_setting('meshhook_limits.pool_critical_for')::interval + interval '1 minute');
  DELETE FROM meshhook_limits.events e WHERE e.created_at < t0 - current_setting('meshhook_limits.event_retention')::interval;
  UPDATE meshhook_limits.worker_state SET last_tick = t0, ticks = ticks + 1,
         last_tick_ms = round(extract(epoch FROM pg_catalog.clock_timestamp() - t0) * 1000, 3);
END
$$;

CREATE FUNCTION meshhook_limits.queue_health()
RETURNS TABLE(source text, queue text, queued bigint, active bigint, failed_recent bigint, oldest_age interval,
              p50_ms numeric, p95_ms numeric, throughput_per_min numeric, error_rate numeric, status text,
              sampled_at timestamptz, stats_sampled_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT s.source, s.queue, s.queued, s.active, s.failed_recent, s.oldest_age, s.p50_ms, s.p95_ms,
         s.throughput_per_min, s.error_rate, s.status, s.sampled_at, s.stats_at
    FROM meshhook_limits._latest_queue_samples() s
   WHERE meshhook_limits.can_monitor()
   ORDER BY 1, 2
$$;

CREATE FUNCTION meshhook_limits.pool_pressure()
RETURNS TABLE(max_connections int, total int, active int, idle int, idle_in_transaction int, waiting int,
              utilisation numeric, longest_transaction interval, status text, sampled_at timestamptz,
              by_application jsonb, by_role jsonb)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  SELECT p.max_connections, p.total, p.active, p.idle, p.idle_in_transaction, p.waiting, p.utilisation,
         p.longest_transaction, p.status, p.sampled_at, p.by_application, p.by_role
    FROM meshhook_limits.pool_samples p
   WHERE meshhook_limits.can_monitor()
   ORDER BY p.sampled_at DESC LIMIT 1
$$;

-- A pool size a DBA can act on: enough for the busiest moments seen (p95 of
-- active sessions over the look-back, plus 25% headroom), never more than
-- 80% of the usable connections so admin and replication sessions still fit.
CREATE FUNCTION meshhook_limits.pool_recommendation(lookback interval DEFAULT '1 hour')
RETURNS TABLE(recommended_pool_size int, observed_p95_active numeric, observed_max_total int,
              usable_connections int, samples bigint, reasoning text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
  WITH s AS (
    SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY p.active)::numeric AS p95, max(p.total) AS mx,
           max(p.max_connections) AS usable, count(*) AS n
      FROM meshhook_limits.pool_samples p
     WHERE p.sampled_at > pg_catalog.now() - lookback AND meshhook_limits.can_monitor())
  SELECT LEAST(GREATEST(ceil(coalesce(s.p95, 0) * 1.25)::int, 2), (s.usable * 0.8)::int), s.p95, s.mx, s.usable, s.n,
         format('p95 of active sessions over %s is %s; 25%% headroom gives %s; capped at 80%% of %s usable '
                'connections. Size the transaction pool (e.g. PgBouncer default_pool_size summed over databases) '
                'to this, and let clients queue in the pooler rather than hold idle server connections.',
                lookback, coalesce(round(s.p95, 1), 0), ceil(coalesce(s.p95, 0) * 1.25), s.usable)
    FROM s WHERE s.n > 0
$$;

-- Alert rules: admins manage them with plain DML through this function.
CREATE FUNCTION meshhook_limits.set_alert_rule(name text, metric text, threshold numeric,
    comparison text DEFAULT '>', for_duration interval DEFAULT '0', severity text DEFAULT 'warning',
    labels jsonb DEFAULT '{}', resolve_threshold numeric DEFAULT NULL, enabled boolean DEFAULT true,
    description text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage alert rules');
  IF threshold IS NULL OR threshold = 'NaN' OR abs(threshold) > 1e18 THEN
    RAISE EXCEPTION 'threshold must be a number between -1e18 and 1e18' USING ERRCODE = '22023';
  END IF;
  IF resolve_threshold = 'NaN' OR abs(resolve_threshold) > 1e18 THEN
    RAISE EXCEPTION 'resolve_threshold must be NULL or a number between -1e18 and 1e18' USING ERRCODE = '22023';
  END IF;
  BEGIN
    INSERT INTO meshhook_limits.alert_rules AS r (name, metric, comparison, threshold, resolve_threshold,
        for_duration, severity, labels, enabled, description)
    VALUES (set_alert_rule.name, set_alert_rule.metric, set_alert_rule.comparison, set_alert_rule.threshold,
            set_alert_rule.resolve_threshold, set_alert_rule.for_duration, set_alert_rule.severity,
            coalesce(set_alert_rule.labels, '{}'), coalesce(set_alert_rule.enabled, true), set_alert_rule.description)
    ON CONFLICT (name) DO UPDATE SET metric = EXCLUDED.metric, comparison = EXCLUDED.comparison,
      threshold = EXCLUDED.threshold, resolve_threshold = EXCLUDED.resolve_threshold,
      for_duration = EXCLUDED.for_duration, severity = EXCLUDED.severity, labels = EXCLUDED.labels,
      enabled = EXCLUDED.enabled, description = EXCLUDED.description;
  EXCEPTION WHEN check_violation OR not_null_violation THEN
    RAISE EXCEPTION 'invalid alert rule: %', SQLERRM USING ERRCODE = '22023',
      HINT = 'metric is one of queue.queued, queue.oldest_age_seconds, queue.error_rate, queue.failed_recent, '
             'pool.utilisation, pool.idle_in_transaction, pool.waiting, tenant.usage_ratio; comparison one of > >= < <=; '
             'severity info, warning or critical; for_duration >= 0';
  END;
END
$$;

CREATE FUNCTION meshhook_limits.set_queue_thresholds(source text DEFAULT '*', queue text DEFAULT NULL,
    warn_queued bigint DEFAULT 1000, crit_queued bigint DEFAULT 10000,
    warn_oldest_age interval DEFAULT '5 minutes', crit_oldest_age interval DEFAULT '15 minutes',
    warn_error_rate numeric DEFAULT 0.05, crit_error_rate numeric DEFAULT 0.20)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_admin_access('set queue thresholds');
  IF warn_queued IS NULL OR crit_queued IS NULL OR warn_queued < 0 OR crit_queued < warn_queued
     OR warn_oldest_age IS NULL OR crit_oldest_age IS NULL OR crit_oldest_age < warn_oldest_age
     OR warn_error_rate IS NULL OR crit_error_rate IS NULL OR warn_error_rate = 'NaN' OR crit_error_rate = 'NaN'
     OR warn_error_rate < 0 OR crit_error_rate < warn_error_rate THEN
    RAISE EXCEPTION 'invalid queue thresholds' USING ERRCODE = '22023',
      HINT = 'each critical threshold must be >= its warning threshold, and all >= 0';
  END IF;
  BEGIN
    INSERT INTO meshhook_limits.queue_thresholds AS t VALUES (coalesce(set_queue_thresholds.source, '*'),
      set_queue_thresholds.queue, warn_queued, crit_queued, warn_oldest_age, crit_oldest_age, warn_error_rate, crit_error_rate)
    ON CONFLICT (source, queue) DO UPDATE SET warn_queued = EXCLUDED.warn_queued, crit_queued = EXCLUDED.crit_queued,
      warn_oldest_age = EXCLUDED.warn_oldest_age, crit_oldest_age = EXCLUDED.crit_oldest_age,
      warn_error_rate = EXCLUDED.warn_error_rate, crit_error_rate = EXCLUDED.crit_error_rate;
  EXCEPTION WHEN check_violation THEN
    RAISE EXCEPTION 'source must be *, pgboss or pgmq' USING ERRCODE = '22023';
  END;
END
$$;

-- The worker records a failed tick (its role may be one that cannot write
-- the extension's tables: meshhook_limits.worker_role).
CREATE FUNCTION meshhook_limits._record_tick_error(p_error text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM meshhook_limits.require_admin_access('record a tick error');
  UPDATE meshhook_limits.worker_state SET errors = errors + 1, last_error = left(p_error, 1000);
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._record_tick_error(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits._record_tick_error(text) TO meshhook_limits_admin;

REVOKE EXECUTE ON FUNCTION meshhook_limits.tick() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.tick() TO meshhook_limits_admin;
