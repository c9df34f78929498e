-- meshhook_limits: The tick: one round of sampling, reaping and alert evaluation, run by the
-- background worker (or pg_cron), and the worker's state.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

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
ALTER TABLE meshhook_limits.worker_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.worker_state FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.worker_state TO PUBLIC;

-- One round: sample the queues, the pool and the poolers, reap slots, evaluate alerts,
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
  -- A pooler connection a cancelled tick left open in this backend is
  -- closed before anyone else's code (a queue owner's) can run here.
  BEGIN
    PERFORM meshhook_limits._pooler_close_all();
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: closing pooler connections failed: %', SQLERRM;
  END;
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
  -- After a restart: the claimed slots of jobs that still run, from the
  -- queues, before claiming resumes (once per server start; cheap after).
  -- Claimed slots are ended only once they are rebuilt: before, shared
  -- memory knows none, and a retired binding would look done.
  BEGIN
    PERFORM meshhook_limits._restore_claims();
    BEGIN
      PERFORM meshhook_limits._end_claims();
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: ending claimed jobs'' slots failed: %', SQLERRM;
    END;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING '%', SQLERRM;
  END;
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
    PERFORM meshhook_limits._sample_poolers(t0);
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: sampling the poolers failed: %', SQLERRM;
  END;
  BEGIN
    PERFORM meshhook_limits._evaluate_alerts(t0);
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: evaluating alerts failed: %', SQLERRM;
  END;
  DELETE FROM meshhook_limits.queue_samples s WHERE s.sampled_at < t0 - keep;
  DELETE FROM meshhook_limits.pool_samples s WHERE s.sampled_at < t0 - GREATEST(keep, current_setting('meshhook_limits.pool_critical_for')::interval + interval '1 minute');
  -- Pooler samples: at least the longest window pool sizing looks back over.
  BEGIN
    keep := GREATEST(current_setting('meshhook_limits.pooler_retention')::interval,
                     (SELECT max(p.resize_every) + interval '1 minute' FROM meshhook_limits.poolers p));
    DELETE FROM meshhook_limits.pooler_samples s WHERE s.sampled_at < t0 - keep;
    DELETE FROM meshhook_limits.pooler_pool_samples s WHERE s.sampled_at < t0 - keep;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: pruning the pooler samples failed: %', SQLERRM;
  END;
  DELETE FROM meshhook_limits.events e WHERE e.created_at < t0 - current_setting('meshhook_limits.event_retention')::interval;
  UPDATE meshhook_limits.worker_state SET last_tick = t0, ticks = ticks + 1,
         last_tick_ms = round(extract(epoch FROM pg_catalog.clock_timestamp() - t0) * 1000, 3);
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits.tick() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.tick() TO meshhook_limits_admin;

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
