-- meshhook_limits: Queue health: samples of pg-boss and pgmq queues, read as the queue
-- tables' owner, and the thresholds that give a queue its status.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

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

SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.queue_thresholds', '');

ALTER TABLE meshhook_limits.queue_samples ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.queue_thresholds ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.queue_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.queue_thresholds FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.queue_samples TO PUBLIC;
GRANT SELECT ON meshhook_limits.queue_thresholds TO PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_status(text, text, bigint, interval, numeric) FROM PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._pgboss_waiting() FROM PUBLIC;

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
  -- ourselves: their owner may not be trusted with our rights. And only an
  -- administrator's (_tick_reads): the tick waits on the code they run.
  IF NOT (meshhook_limits._tick_reads(job) AND meshhook_limits._tick_reads(queue)) THEN
    RETURN 0;
  END IF;
  IF NOT p_full THEN
    WITH waiting AS (SELECT * FROM meshhook_limits._pgboss_waiting()),
    prev AS (SELECT p.* FROM meshhook_limits._latest_queue_samples() p WHERE p.source = 'pgboss')
    INSERT INTO meshhook_limits.queue_samples
      SELECT p_at, 'pgboss', q.name, coalesce(w.queued, 0), coalesce(p.active, 0), coalesce(p.failed_recent, 0),
             p_at - w.oldest, p.p50_ms, p.p95_ms, coalesce(p.throughput_per_min, 0), p.error_rate,
             meshhook_limits._queue_status('pgboss', q.name, coalesce(w.queued, 0), p_at - w.oldest, p.error_rate),
             p.stats_at
        FROM pg_catalog.jsonb_array_elements_text(meshhook_limits._read_as_owner(queue,
               'SELECT coalesce(pg_catalog.jsonb_agg(q.name::text), ''[]'') FROM pgboss.queue q
                 WHERE pg_catalog.left(q.name, 10) <> ''__pgboss__''')) AS q(name)
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
  -- pg-boss 10's archive: a table of its own (a trusted one: _tick_reads),
  -- never whatever else bears the name (the read runs as job's owner).
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass('pgboss.archive')
                    AND c.relkind IN ('r', 'p') AND meshhook_limits._tick_reads(c.oid)) THEN
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
                             FROM unnest(a.durations) d) pc ON true
       -- pg-boss's own queues (__pgboss__send-it: its scheduler's) are not the user's.
       WHERE pg_catalog.left(q.name, 10) <> '__pgboss__')
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
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pgboss(timestamptz, interval, boolean) FROM PUBLIC;

-- One sample of every pgmq queue in pgmq.meta: queued = visible, active =
-- read and still invisible, so queued + active = pgmq.metrics().queue_length.
-- p_full: also the archive's statistics of the window (p50/p95, throughput);
-- otherwise those are carried from the previous sample with their stats_at.
CREATE FUNCTION meshhook_limits._sample_pgmq(p_at timestamptz, p_window interval, p_full boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE q record; n bigint; qt text; at_ text; r record; a record; stats timestamptz;
  v_p50 numeric; v_p95 numeric; v_tput numeric; owner text;
  rows meshhook_limits.queue_samples[] := '{}';
BEGIN
  IF pg_catalog.to_regclass('pgmq.meta') IS NULL THEN
    RETURN 0;
  END IF;
  -- pgmq's tables are read as their owner (_read_as_owner), never as
  -- ourselves, and only an administrator's (_tick_reads): the tick waits on
  -- the code they run.
  IF NOT meshhook_limits._tick_reads(pg_catalog.to_regclass('pgmq.meta')) THEN
    RETURN 0;
  END IF;
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
      CONTINUE WHEN pg_catalog.to_regclass(format('pgmq.%I', qt)) IS NULL
                 OR NOT meshhook_limits._tick_reads(pg_catalog.to_regclass(format('pgmq.%I', qt)));
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
      ELSIF pg_catalog.to_regclass(format('pgmq.%I', at_)) IS NOT NULL
            AND meshhook_limits._tick_reads(pg_catalog.to_regclass(format('pgmq.%I', at_))) THEN
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
      PERFORM meshhook_limits._queue_read(pg_catalog.md5('pgmq:' || q.name));
    EXCEPTION WHEN OTHERS THEN
      -- Once per process, queue and cause: the worker tries every second.
      IF meshhook_limits._queue_skip_is_new(pg_catalog.md5('pgmq:' || q.name), SQLSTATE) THEN
        owner := (SELECT c.relowner::pg_catalog.regrole::text FROM pg_catalog.pg_class c
                   WHERE c.oid = pg_catalog.to_regclass(format('pgmq.%I', qt)));
        RAISE WARNING 'meshhook_limits: skipped pgmq queue %: %', quote_literal(q.name), SQLERRM
          USING HINT = CASE SQLSTATE
            WHEN '42501' THEN format('the tick reads each queue as its table''s owner, %s, which lacks a right it '
                                     'needs: GRANT USAGE ON SCHEMA pgmq TO %s, and SELECT on the queue''s tables. ',
                                     owner, owner)
            WHEN '57014' THEN 'reading it took longer than meshhook_limits.queue_read_timeout: look for a lock '
                              'held on its table, or raise the setting. '
            ELSE '' END
            || 'The queue keeps its last sample; this is said once per queue and cause until it is read again';
      END IF;
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
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pgmq(timestamptz, interval, boolean) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._latest_queue_samples()
RETURNS SETOF meshhook_limits.queue_samples
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT s.* FROM meshhook_limits.queue_samples s
   WHERE s.sampled_at = (SELECT w.queues_sampled_at FROM meshhook_limits.worker_state w)
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._latest_queue_samples() FROM PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._carry_queue_samples(timestamptz, text, text) FROM PUBLIC;

CREATE FUNCTION meshhook_limits.queue_health()
RETURNS TABLE(source text, queue text, queued bigint, active bigint, failed_recent bigint, oldest_age interval,
              p50_ms numeric, p95_ms numeric, throughput_per_min numeric, error_rate numeric, status text,
              sampled_at timestamptz, stats_sampled_at timestamptz)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._require_monitor('read queue health');
  RETURN QUERY
  SELECT s.source, s.queue, s.queued, s.active, s.failed_recent, s.oldest_age, s.p50_ms, s.p95_ms,
         s.throughput_per_min, s.error_rate, s.status, s.sampled_at, s.stats_at
    FROM meshhook_limits._latest_queue_samples() s
   WHERE meshhook_limits.can_monitor()
   ORDER BY 1, 2;
END
$$;

-- Arguments left out (or NULL) keep what applies to (source, queue) now: its
-- own row, else the next more general one, else the defaults.
CREATE FUNCTION meshhook_limits.set_queue_thresholds(source text DEFAULT '*', queue text DEFAULT NULL,
    warn_queued bigint DEFAULT NULL, crit_queued bigint DEFAULT NULL,
    warn_oldest_age interval DEFAULT NULL, crit_oldest_age interval DEFAULT NULL,
    warn_error_rate numeric DEFAULT NULL, crit_error_rate numeric DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  src text := coalesce(set_queue_thresholds.source, '*');
  q text := set_queue_thresholds.queue;
  cur record;
BEGIN
  PERFORM meshhook_limits.require_admin_access('set queue thresholds');
  IF src NOT IN ('*', 'pgboss', 'pgmq') THEN
    RAISE EXCEPTION 'source must be *, pgboss or pgmq' USING ERRCODE = '22023';
  END IF;
  SELECT t.* INTO cur
    FROM (SELECT x.warn_queued, x.crit_queued, x.warn_oldest_age, x.crit_oldest_age, x.warn_error_rate,
                 x.crit_error_rate, (x.queue IS NULL)::int * 2 + (x.source = '*')::int AS rank
            FROM meshhook_limits.queue_thresholds x
           WHERE x.source IN (src, '*') AND (x.queue = q OR x.queue IS NULL)
          UNION ALL
          SELECT 1000, 10000, interval '5 minutes', interval '15 minutes', 0.05, 0.20, 99) t
   ORDER BY t.rank
   LIMIT 1;
  cur.warn_queued := coalesce(set_queue_thresholds.warn_queued, cur.warn_queued);
  cur.crit_queued := coalesce(set_queue_thresholds.crit_queued, cur.crit_queued);
  cur.warn_oldest_age := coalesce(set_queue_thresholds.warn_oldest_age, cur.warn_oldest_age);
  cur.crit_oldest_age := coalesce(set_queue_thresholds.crit_oldest_age, cur.crit_oldest_age);
  cur.warn_error_rate := coalesce(set_queue_thresholds.warn_error_rate, cur.warn_error_rate);
  cur.crit_error_rate := coalesce(set_queue_thresholds.crit_error_rate, cur.crit_error_rate);
  IF cur.warn_queued < 0 OR cur.crit_queued < cur.warn_queued OR cur.crit_oldest_age < cur.warn_oldest_age
     OR cur.warn_oldest_age < interval '0' OR cur.warn_error_rate = 'NaN' OR cur.crit_error_rate = 'NaN'
     OR cur.warn_error_rate < 0 OR cur.crit_error_rate < cur.warn_error_rate THEN
    RAISE EXCEPTION 'invalid queue thresholds: queued % / %, oldest age % / %, error rate % / % (warning / critical)',
      cur.warn_queued, cur.crit_queued, cur.warn_oldest_age, cur.crit_oldest_age, cur.warn_error_rate,
      cur.crit_error_rate USING ERRCODE = '22023',
      HINT = 'each critical threshold must be >= its warning threshold, and all >= 0; '
             'arguments left out keep the values that apply now';
  END IF;
  INSERT INTO meshhook_limits.queue_thresholds AS t VALUES (src, q, cur.warn_queued, cur.crit_queued,
      cur.warn_oldest_age, cur.crit_oldest_age, cur.warn_error_rate, cur.crit_error_rate)
  ON CONFLICT (source, queue) DO UPDATE SET warn_queued = EXCLUDED.warn_queued, crit_queued = EXCLUDED.crit_queued,
    warn_oldest_age = EXCLUDED.warn_oldest_age, crit_oldest_age = EXCLUDED.crit_oldest_age,
    warn_error_rate = EXCLUDED.warn_error_rate, crit_error_rate = EXCLUDED.crit_error_rate;
END
$$;

-- Undo set_queue_thresholds for one (source, queue): the next more general
-- row, or the defaults, apply again. True when a row went.
CREATE FUNCTION meshhook_limits.reset_queue_thresholds(source text DEFAULT '*', queue text DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  PERFORM meshhook_limits.require_admin_access('set queue thresholds');
  IF source IS NULL OR source NOT IN ('*', 'pgboss', 'pgmq') THEN
    RAISE EXCEPTION 'source must be *, pgboss or pgmq' USING ERRCODE = '22023';
  END IF;
  DELETE FROM meshhook_limits.queue_thresholds t
   WHERE t.source = reset_queue_thresholds.source AND t.queue IS NOT DISTINCT FROM reset_queue_thresholds.queue;
  RETURN FOUND;
END
$$;
