-- meshhook_limits 0.2.0 -> 0.3.0: ALTER EXTENSION meshhook_limits UPDATE.
-- Every change to the installed SQL since 0.2.0 (commit bd308bc, kept as
-- sql/released/meshhook_limits--0.2.0.sql), in the order it was made;
-- tests/test_upgrade.py checks that the result equals a fresh install.
\echo Use "ALTER EXTENSION meshhook_limits UPDATE" to load this file. \quit

-- Claimed slots rebuilt from the bound queues after a restart (issue 18).
CREATE FUNCTION meshhook_limits."_restore_claims"() RETURNS bigint /* i64 */
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_restore_claims_wrapper';

-- Bindings that were unbound (or replaced by bind_queue) while jobs claimed
-- through them still ran: the tick keeps following those jobs and ends
-- their slots when they end, as for a bound queue, then forgets the
-- binding (_end_claims). Not dumped: after a restore there are no slots.
CREATE TABLE meshhook_limits.retired_bindings (
  LIKE meshhook_limits.queue_bindings,
  retired_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (id)
);
ALTER TABLE meshhook_limits.retired_bindings ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.retired_bindings FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.retired_bindings TO PUBLIC;

-- unbind_queue: the retired binding keeps its claimed jobs followed.
CREATE OR REPLACE FUNCTION meshhook_limits.unbind_queue(source text, queue text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  b meshhook_limits.queue_bindings;
  t name;
BEGIN
  PERFORM meshhook_limits.require_admin_access('unbind queues');
  DELETE FROM meshhook_limits.queue_bindings qb
   WHERE qb.source = unbind_queue.source AND qb.queue = unbind_queue.queue
  RETURNING * INTO b;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  -- Its claimed jobs that still run keep their slots until they end: the
  -- tick follows them through the retired binding.
  INSERT INTO meshhook_limits.retired_bindings (id, source, queue, tenant_path, project_path, key_path, cost_path,
                                                relation, index_name, created_at)
  VALUES (b.id, b.source, b.queue, b.tenant_path, b.project_path, b.key_path, b.cost_path, b.relation,
          b.index_name, b.created_at)
  ON CONFLICT (id) DO NOTHING;
  -- Only the index and triggers bind_queue made: on the queue table.
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = b.relation AND c.relname = b.index_name) THEN
    EXECUTE pg_catalog.format('DROP INDEX %I.%I',
      (SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = b.relation), b.index_name);
  END IF;
  FOR t IN SELECT tg.tgname FROM pg_catalog.pg_trigger tg
            WHERE tg.tgrelid = b.relation AND NOT tg.tgisinternal
              AND tg.tgname IN (b.index_name || '_ended', b.index_name || '_deleted') LOOP
    EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', t, b.relation);
  END LOOP;
  RETURN true;
END
$$;

COMMENT ON FUNCTION meshhook_limits.unbind_queue(text, text) IS
  'Admin: forget a queue binding and drop its claim index. Claimed jobs keep their slots until they end (the tick follows them).';

-- _end_claims: follows retired bindings too, and forgets them when their jobs have ended.
CREATE OR REPLACE FUNCTION meshhook_limits._end_claims() RETURNS integer
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  c record;
  b meshhook_limits.queue_bindings;
  alive jsonb;
  ended int := 0;
BEGIN
  FOR c IN SELECT s.binding_id,
                  pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                    'slot', s.slot_id, 'job', pg_catalog.split_part(s.job_id, '/', 1),
                    'gen', NULLIF(pg_catalog.split_part(s.job_id, '/', 2), ''),
                    'at', s.acquired_at)) AS claimed
             FROM meshhook_limits._claimed_slots() s GROUP BY s.binding_id LOOP
    SELECT * INTO b FROM meshhook_limits.queue_bindings qb WHERE qb.id = c.binding_id;
    IF NOT FOUND THEN
      -- Unbound since: its jobs are followed the same way.
      SELECT r.id, r.source, r.queue, r.tenant_path, r.project_path, r.key_path, r.cost_path, r.relation,
             r.index_name, r.created_at
        INTO b FROM meshhook_limits.retired_bindings r WHERE r.id = c.binding_id;
      -- Neither (the extension was created again): they end with their leases.
      CONTINUE WHEN NOT FOUND;
    END IF;
    -- A dropped queue's jobs are gone: so are their claims.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = b.relation) THEN
      PERFORM meshhook_limits.release_execution_slot((e->>'slot')::uuid)
         FROM pg_catalog.jsonb_array_elements(c.claimed) e;
      ended := ended + pg_catalog.jsonb_array_length(c.claimed);
      CONTINUE;
    END IF;
    BEGIN
      IF b.source = 'pgboss' THEN
        alive := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(c.slot), '[]')
            FROM pg_catalog.jsonb_to_recordset(%L::jsonb) c(slot uuid, job text, at timestamptz)
            JOIN pgboss.job j ON j.name = %L
             AND j.id = CASE WHEN c.job ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN c.job::uuid END
           WHERE j.state = 'active' AND j.started_on <= c.at $q$, c.claimed, b.queue));
      ELSE
        alive := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(c.slot), '[]')
            FROM pg_catalog.jsonb_to_recordset(%L::jsonb) c(slot uuid, job text, gen text)
            JOIN %s j ON j.msg_id = CASE WHEN c.job ~ '^[0-9]{1,18}$' THEN c.job::bigint END
           WHERE j.read_ct = CASE WHEN c.gen ~ '^[0-9]{1,9}$' THEN c.gen::int END
             AND j.vt > pg_catalog.clock_timestamp() $q$, c.claimed, b.relation));
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: checking claimed jobs of % queue % failed: %', b.source, b.queue, SQLERRM;
      CONTINUE;
    END;
    PERFORM meshhook_limits._renew_slots(ARRAY(SELECT x::uuid FROM pg_catalog.jsonb_array_elements_text(alive) x));
    PERFORM meshhook_limits.release_execution_slot((e->>'slot')::uuid)
       FROM pg_catalog.jsonb_array_elements(c.claimed) e
      WHERE NOT alive @> pg_catalog.jsonb_build_array(e->'slot');
    ended := ended + pg_catalog.jsonb_array_length(c.claimed) - pg_catalog.jsonb_array_length(alive);
  END LOOP;
  -- Retired bindings whose jobs have all ended.
  DELETE FROM meshhook_limits.retired_bindings r
   WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits._claimed_slots() s WHERE s.binding_id = r.id);
  RETURN ended;
END
$$;

-- After a restart: the jobs workers still run in every bound queue, for
-- _restore_claims (src/claim/restore.rs) to give each its claimed slot
-- again. pg-boss: jobs in state active; pgmq: messages read and still
-- invisible (read_ct > 0 and vt in the future; a message sent with a delay
-- was never read). The job id is spelt as in a claim's run id; the lease is
-- what is left of pgmq's visibility timeout (NULL for pg-boss: the default
-- lease, renewed by the tick while the job stays active). The queue tables
-- are read as their owners (_read_as_owner). A queue that cannot be read
-- fails the whole rebuild: claiming must not resume without its jobs.
CREATE FUNCTION meshhook_limits._claims_to_restore()
RETURNS TABLE(binding_id bigint, job_id text, tenant text, project text, key text, cost text, lease_micros bigint)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  b meshhook_limits.queue_bindings;
  running jsonb;
  row_sql text;
BEGIN
  FOR b IN SELECT * FROM (
              SELECT * FROM meshhook_limits.queue_bindings
              UNION ALL
              -- A retired binding's jobs, unless its queue is bound again
              -- (the new binding restores them).
              SELECT r.id, r.source, r.queue, r.tenant_path, r.project_path, r.key_path, r.cost_path, r.relation,
                     r.index_name, r.created_at
                FROM meshhook_limits.retired_bindings r
               WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits.queue_bindings qb
                                  WHERE qb.source = r.source AND qb.queue = r.queue)) qb
            WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = qb.relation)
            ORDER BY qb.id LOOP
    row_sql := pg_catalog.format('%s, %s, %s, %s',
      meshhook_limits._tenant_sql(b.source, b.tenant_path), meshhook_limits._path_sql(b.source, b.project_path),
      meshhook_limits._path_sql(b.source, b.key_path), meshhook_limits._path_sql(b.source, b.cost_path));
    BEGIN
      IF b.source = 'pgboss' THEN
        running := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(j.id::text, %s, NULL)), '[]')
            FROM pgboss.job j WHERE j.name = %L AND j.state = 'active' $q$, row_sql, b.queue));
      ELSE
        running := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
          SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_array(j.msg_id::text || '/' || j.read_ct::text, %s,
                   (extract(epoch FROM j.vt - pg_catalog.clock_timestamp()) * 1000000)::bigint)), '[]')
            FROM %s j WHERE j.read_ct > 0 AND j.vt > pg_catalog.clock_timestamp() $q$, row_sql, b.relation));
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE EXCEPTION 'meshhook_limits: cannot rebuild the claimed slots of % queue % after the restart: %',
        b.source, b.queue, SQLERRM
        USING ERRCODE = '55000',
              HINT = 'claiming in this database resumes once the queue table can be read (grant the extension''s owner access, or unbind the queue)';
    END;
    RETURN QUERY SELECT b.id, x->>0, x->>1, x->>2, x->>3, x->>4, (x->>5)::bigint
                   FROM pg_catalog.jsonb_array_elements(running) x;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._claims_to_restore() FROM PUBLIC;

-- tick(): rebuilds claimed slots after a restart (_restore_claims) before ending claims.
CREATE OR REPLACE FUNCTION meshhook_limits.tick() RETURNS void
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
  -- After a restart: the claimed slots of jobs that still run, from the
  -- queues, before claiming resumes (once per server start; cheap after).
  BEGIN
    PERFORM meshhook_limits._restore_claims();
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING '%', SQLERRM;
  END;
  BEGIN
    PERFORM meshhook_limits._end_claims();
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'meshhook_limits: ending claimed jobs'' slots failed: %', SQLERRM;
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

-- The launcher serves every database with the extension; this wakes it.
CREATE FUNCTION meshhook_limits."_serve_database"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_serve_database_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._serve_database() FROM PUBLIC;
SELECT meshhook_limits._serve_database();
