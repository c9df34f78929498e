-- meshhook_limits 0.2.0 -> 0.3.0: ALTER EXTENSION meshhook_limits UPDATE.
-- Every change to the installed SQL since 0.2.0 (commit bd308bc, kept as
-- sql/released/meshhook_limits--0.2.0.sql); tests/test_upgrade.py checks
-- that the result equals a fresh install.
\echo Use "ALTER EXTENSION meshhook_limits UPDATE" to load this file. \quit

-- The extension's schema must be a superuser's (a schema another role made
-- before CREATE EXTENSION lets it add overloads our definer functions call).
DO $$
DECLARE
  owner oid := (SELECT n.nspowner FROM pg_catalog.pg_namespace n WHERE n.nspname = 'meshhook_limits');
BEGIN
  IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = owner) THEN
    RAISE EXCEPTION 'schema meshhook_limits is owned by role %, not by a superuser', owner::pg_catalog.regrole
      USING ERRCODE = '42501',
            HINT = 'check what that role put in the schema, then ALTER SCHEMA meshhook_limits OWNER TO a superuser and update again';
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
              WHERE n.nspname = 'meshhook_limits' AND a.privilege_type = 'CREATE'
                AND (a.grantee = 0 OR NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = a.grantee))) THEN
    RAISE EXCEPTION 'a role that is not a superuser may create in schema meshhook_limits' USING ERRCODE = '42501',
      HINT = 'check what it created there, REVOKE CREATE ON SCHEMA meshhook_limits from it, and update again';
  END IF;
END
$$;

-- pgmq: a message's tenant can be bound to its sender (bind_queue's sender_tenant).
ALTER TABLE meshhook_limits.queue_bindings ADD COLUMN sender_tenant boolean NOT NULL DEFAULT false;

-- Claimed slots rebuilt from the bound queues after a restart.
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
                                                relation, index_name, created_at, sender_tenant)
  VALUES (b.id, b.source, b.queue, b.tenant_path, b.project_path, b.key_path, b.cost_path, b.relation,
          b.index_name, b.created_at, b.sender_tenant)
  ON CONFLICT (id) DO NOTHING;
  -- Only the index and triggers bind_queue made: on the queue table.
  FOR t IN SELECT c.relname FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
            WHERE i.indrelid = b.relation AND c.relname IN (b.index_name, b.index_name || '_due', b.index_name || '_at') LOOP
    EXECUTE pg_catalog.format('DROP INDEX %I.%I',
      (SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = b.relation), t);
  END LOOP;
  FOR t IN SELECT tg.tgname FROM pg_catalog.pg_trigger tg
            WHERE tg.tgrelid = b.relation AND NOT tg.tgisinternal
              AND tg.tgname IN (b.index_name || '_ended', b.index_name || '_deleted', b.index_name || '_sender') LOOP
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
             r.index_name, r.created_at, r.sender_tenant
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
    -- A queue whose owner is no longer trusted (_tick_reads; claim_jobs
    -- refuses it too) is not read: its claims end with their leases.
    CONTINUE WHEN NOT meshhook_limits._tick_reads(b.relation);
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
-- fails the whole rebuild: claiming must not resume without its jobs (a
-- queue of an owner the tick does not trust is not read at all).
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
                     r.index_name, r.created_at, r.sender_tenant
                FROM meshhook_limits.retired_bindings r
               WHERE NOT EXISTS (SELECT 1 FROM meshhook_limits.queue_bindings qb
                                  WHERE qb.source = r.source AND qb.queue = r.queue)) qb
            WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = qb.relation)
            ORDER BY qb.id LOOP
    -- A queue whose owner the tick does not trust (_tick_reads) is not read:
    -- claim_jobs refuses it too, so its jobs were claimed, if at all, before
    -- its owner changed, and end with their leases.
    CONTINUE WHEN NOT meshhook_limits._tick_reads(b.relation);
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
                   -- A day at most: an infinite or far vt (anyone who may
                   -- send may write one) neither fails nor overflows.
                   (extract(epoch FROM LEAST(j.vt, pg_catalog.clock_timestamp() + interval '1 day')
                                       - pg_catalog.clock_timestamp()) * 1000000)::bigint)), '[]')
            FROM %s j WHERE j.read_ct > 0 AND j.vt > pg_catalog.clock_timestamp() $q$, row_sql, b.relation));
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE EXCEPTION 'meshhook_limits: cannot rebuild the claimed slots of % queue % after the restart: %',
        b.source, b.queue, SQLERRM
        USING ERRCODE = '55000',
              HINT = 'claiming in this database resumes once the queue table can be read by its owner (see the error), or once the queue is unbound';
    END;
    RETURN QUERY SELECT b.id, x->>0, x->>1, x->>2, x->>3, x->>4, (x->>5)::bigint
                   FROM pg_catalog.jsonb_array_elements(running) x;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._claims_to_restore() FROM PUBLIC;

-- tick(): rebuilds claimed slots after a restart (_restore_claims) before ending claims,
-- and samples the PgBouncers named by add_pooler (below).
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

-- The launcher serves every database with the extension; this wakes it.
CREATE FUNCTION meshhook_limits."_serve_database"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_serve_database_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._serve_database() FROM PUBLIC;

-- pg-boss 12: the claim statements follow its fetch (blocked, start_after <=,
-- key_strict_fifo heads, heartbeat_on).
-- The major version of pg-boss in this database, from its schema: 12 has
-- columns 11 has not (blocked, heartbeat_on); NULL without pg-boss.
CREATE FUNCTION meshhook_limits._pgboss_major() RETURNS integer
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN pg_catalog.to_regclass('pgboss.job') IS NULL THEN NULL
              WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                            WHERE a.attrelid = pg_catalog.to_regclass('pgboss.job') AND a.attname = 'blocked'
                              AND NOT a.attisdropped) THEN 12
              ELSE 11 END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pgboss_major() FROM PUBLIC;

DROP FUNCTION meshhook_limits._claim_queries(bigint);
CREATE FUNCTION meshhook_limits._claim_queries(p_binding bigint)
RETURNS TABLE(tenants_q text, head_q text, take_q text, due_q text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  b meshhook_limits.queue_bindings;
  t_sql text; p_sql text; k_sql text; c_sql text;
  waiting text;   -- the queue's waiting jobs, as in the index predicate
  rel text;
  due_col text;   -- when a job is due (pg-boss start_after, pgmq vt) ...
  due_now text;   -- ... and its test for "due now", as the queue's fetch spells it
  fetchable text; -- the waiting jobs the queue's fetch may take (pg-boss 12: not blocked)
  v12 boolean;
  conds text;     -- pg-boss: what else the queue's fetch asks of a job it takes
  cols text;      -- the head statements' columns
BEGIN
  PERFORM meshhook_limits.require_admin_access('claim jobs');
  SELECT * INTO STRICT b FROM meshhook_limits.queue_bindings qb WHERE qb.id = p_binding;
  t_sql := meshhook_limits._claim_key_sql(b);
  p_sql := meshhook_limits._path_sql(b.source, b.project_path);
  k_sql := meshhook_limits._path_sql(b.source, b.key_path);
  c_sql := meshhook_limits._path_sql(b.source, b.cost_path);
  IF b.source = 'pgboss' THEN
    rel := 'pgboss.job';
    waiting := pg_catalog.format('j.name = %L AND j.state < %L', b.queue, 'active');
  ELSE
    rel := b.relation::text;
    waiting := 'true';
  END IF;
  due_col := CASE b.source WHEN 'pgboss' THEN 'j.start_after' ELSE 'j.vt' END;
  due_now := CASE WHEN b.source = 'pgmq' THEN '<= pg_catalog.clock_timestamp()'
                  WHEN meshhook_limits._pgboss_major() >= 12 THEN '<= pg_catalog.now()'
                  ELSE '< pg_catalog.now()' END;
  fetchable := CASE WHEN b.source = 'pgboss' AND meshhook_limits._pgboss_major() >= 12
                    THEN waiting || ' AND NOT j.blocked' ELSE waiting END;
  -- Over the _due index: per tenant, when its first job is due, and
  -- whether that is now (a tenant whose jobs are all deferred is left out
  -- by claim_jobs, without a probe of its jobs). A chunk of a scan: at most
  -- $2 tenants, from the first after $1 ('' for the first chunk, which also
  -- tells whether jobs without a tenant wait).
  tenants_q := pg_catalog.format($q$
    WITH RECURSIVE t(tenant, at, n) AS (
      (SELECT %1$s, %4$s, 1 FROM %2$s j WHERE %3$s AND %1$s > $1 ORDER BY %1$s, %4$s LIMIT 1)
      UNION ALL
      SELECT x.tenant, x.at, t.n + 1 FROM t, LATERAL (
        SELECT %1$s AS tenant, %4$s AS at FROM %2$s j WHERE %3$s AND %1$s > t.tenant ORDER BY %1$s, %4$s LIMIT 1) x
       WHERE t.n < $2)
    SELECT tenant, at, at %5$s FROM t
    UNION ALL
    (SELECT NULL, NULL, true FROM %2$s j WHERE $1 = '' AND %3$s AND %1$s IS NULL LIMIT 1) $q$,
    t_sql, rel, fetchable, due_col, due_now);
  -- The tenants with a job due, read from an index on when the queue's
  -- jobs are due (pg-boss: the binding's _at index; pgmq: the queue's own
  -- vt index): the first $1 jobs due, grouped by tenant
  -- (tenant text, since when its first job has been due, how many of the
  -- jobs read are its). With fewer than $1 jobs due, one such read finds
  -- every tenant the skip scan would, however many tenants have only
  -- deferred jobs. NULL when the queue has no such index (a btree): the
  -- read would then walk the whole queue.
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
              WHERE i.indrelid = b.relation AND i.indisvalid
                AND c.relam = (SELECT am.oid FROM pg_catalog.pg_am am WHERE am.amname = 'btree')
                AND CASE b.source
                      WHEN 'pgboss' THEN c.relname = b.index_name || '_at'
                      ELSE i.indpred IS NULL AND i.indkey[0] = (SELECT a.attnum FROM pg_catalog.pg_attribute a
                                                                 WHERE a.attrelid = i.indrelid AND a.attname = 'vt')
                    END) THEN
    due_q := pg_catalog.format($q$
      SELECT d.tenant, pg_catalog.min(d.at), pg_catalog.count(*) FROM (
        SELECT %1$s AS tenant, %4$s AS at FROM %2$s j WHERE %3$s AND %4$s %5$s ORDER BY %4$s LIMIT $1) d
       GROUP BY d.tenant $q$,
      t_sql, rel, fetchable, due_col,
      -- (pgmq: due at the transaction's start, as for head: a bound of
      -- the index scan, where clock_timestamp() would be a filter on
      -- every deferred job after the due ones.)
      CASE WHEN b.source = 'pgmq' THEN '<= pg_catalog.now()' ELSE due_now END);
  END IF;
  IF b.source = 'pgboss' THEN
    v12 := meshhook_limits._pgboss_major() >= 12;
    -- Queues whose policy allows one active job per singleton key (pg-boss's
    -- unique indexes job_i2, job_i3, job_i6): a job whose key has one
    -- active is not taken, as boss.fetch() could not take it. pg-boss 12
    -- also: never a job blocked by its dependencies (boss.flow), start_after
    -- due as 12 spells it (<=, 11: <), and for key_strict_fifo only the head
    -- of its key (a retry first, then the oldest), when no job of the key is
    -- active, retried or failed (pg-boss's strict_fifo_heads, and its unique
    -- index job_i8): taken at once, so the next head statement sees it.
    -- The head: the tenant's next job in the queue's order, locked. Its
    -- start_after test is on the claim index's last column: deferred jobs
    -- at the front of the tenant's range are passed over on the index.
    conds := pg_catalog.format($q$
         AND j.start_after %1$s pg_catalog.now()
         AND (j.policy IS NULL OR j.policy NOT IN ('singleton', 'stately', 'exclusive')
              OR NOT EXISTS (SELECT 1 FROM pgboss.job a
                              WHERE a.name = j.name AND a.state = 'active' AND a.policy = j.policy
                                AND coalesce(a.singleton_key, '') = coalesce(j.singleton_key, ''))) %2$s $q$,
      CASE WHEN v12 THEN '<=' ELSE '<' END,
      CASE WHEN v12 THEN $v12$
         AND NOT j.blocked
         AND (j.policy IS DISTINCT FROM 'key_strict_fifo'
              OR (NOT EXISTS (SELECT 1 FROM pgboss.job b
                               WHERE b.name = j.name AND b.singleton_key = j.singleton_key AND b.id <> j.id
                                 AND b.state IN ('active', 'retry', 'failed') AND b.policy = 'key_strict_fifo')
                  AND NOT EXISTS (SELECT 1 FROM pgboss.job h
                               WHERE h.name = j.name AND h.singleton_key = j.singleton_key AND h.id <> j.id
                                 AND h.state < 'active' AND NOT h.blocked AND h.policy = 'key_strict_fifo'
                                 AND h.start_after <= pg_catalog.now()
                                 AND (h.state > j.state OR (h.state = j.state AND (h.created_on, h.id) < (j.created_on, j.id))))))
        $v12$ ELSE '' END);
    cols := pg_catalog.format($q$
      SELECT j.id::text AS id, j.data AS data, %1$s AS project, %2$s AS key, %3$s AS cost, NULL::text AS gen,
             j.created_on AS at,
             coalesce(j.policy IN ('singleton', 'stately', 'exclusive', 'key_strict_fifo'), false) AS one_active,
             CASE WHEN j.started_on IS NOT NULL THEN j.retry_count + 1 ELSE j.retry_count END AS retry_count $q$,
      p_sql, k_sql, c_sql);
    head_q := pg_catalog.format($q$ %1$s
        FROM pgboss.job j
       WHERE %2$s AND %3$s = $1 AND j.id::text <> ALL ($2) %4$s
       ORDER BY %5$s, j.priority DESC, j.created_on, j.id LIMIT 1 FOR UPDATE OF j SKIP LOCKED $q$,
      cols, waiting, t_sql, conds, t_sql);
    -- What boss.fetch() does to a job it takes (12 also starts its
    -- heartbeat clock, which 12's supervisor fails a silent job by).
    take_q := pg_catalog.format($q$
      UPDATE pgboss.job j SET state = 'active', started_on = pg_catalog.now(), %s
             retry_count = CASE WHEN j.started_on IS NOT NULL THEN j.retry_count + 1 ELSE j.retry_count END
       WHERE j.name = %L AND j.id = ANY ($1::uuid[]) $q$,
      CASE WHEN v12 THEN 'heartbeat_on = pg_catalog.now(),' ELSE '' END, b.queue);
  ELSE
    -- retry_count: the reads before this one (read_ct after it, less one).
    -- The tenant as a range (>= and <=, not =): with =, the planner may
    -- walk the queue's primary key in msg_id order instead (the tenant is
    -- then a constant of the order), past every other tenant's messages.
    -- Visible as of the transaction's start (now(), unlike
    -- clock_timestamp(), is a condition on the claim index's vt column, so
    -- messages not visible yet are passed over on the index).
    cols := pg_catalog.format($q$
      SELECT j.msg_id::text AS id, j.message AS data, %1$s AS project, %2$s AS key, %3$s AS cost,
             (j.read_ct + 1)::text AS gen, j.enqueued_at AS at, false AS one_active, j.read_ct AS retry_count $q$,
      p_sql, k_sql, c_sql);
    head_q := pg_catalog.format($q$ %1$s
        FROM %2$s j
       WHERE %3$s >= $1 AND %3$s <= $1 AND j.vt <= pg_catalog.now() AND j.msg_id::text <> ALL ($2)
       ORDER BY %3$s, j.msg_id LIMIT 1 FOR UPDATE OF j SKIP LOCKED $q$,
      cols, rel, t_sql);
    -- What pgmq.read(queue, vt, qty) does to the messages it returns.
    take_q := pg_catalog.format($q$
      UPDATE %s j SET vt = pg_catalog.clock_timestamp() + $2, read_ct = j.read_ct + 1,
             last_read_at = pg_catalog.clock_timestamp()
       WHERE j.msg_id = ANY ($1::bigint[]) $q$, rel);
  END IF;
  RETURN NEXT;
END
$$;

-- Jobs that can never be claimed are out of their tenant's range of the claim index.
CREATE FUNCTION meshhook_limits._claim_key(tenant text, project text, key text, cost text) RETURNS text
LANGUAGE c IMMUTABLE PARALLEL SAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_claim_key';
COMMENT ON FUNCTION meshhook_limits._claim_key(text, text, text, text) IS
  'The key of a job in a claim index: its tenant when claim_jobs can claim it, else NULL.';

-- The key of a job in the claim index: its tenant (_tenant_sql), or NULL
-- when the job can never be claimed: a tenant or project that is not a
-- uuid (so values anyone who may enqueue writes, junk or not, add no
-- tenants for the skip scan to visit; issue 19), an empty
-- or over-long (200 bytes) concurrency key, a cost that is not a whole
-- number from 1 to 1,000,000 (as claim_jobs parses them, src/claim/mod.rs).
-- Such a job is out of its tenant's range, so it never stands in front of
-- the tenant's claimable jobs, and is left as it is (counted as invalid).
-- The checks are one C function (_claim_key, src/claim/key.rs): both claim
-- indexes compute the key on every send, and regular expressions here made
-- sends into a bound queue twice as dear.
CREATE FUNCTION meshhook_limits._claim_key_sql(b meshhook_limits.queue_bindings, p_alias text DEFAULT 'j.')
RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT pg_catalog.format('(meshhook_limits._claim_key(%s, %s, %s, %s) COLLATE pg_catalog."C")',
    meshhook_limits._path_sql(b.source, b.tenant_path, p_alias),
    meshhook_limits._path_sql(b.source, b.project_path, p_alias),
    meshhook_limits._path_sql(b.source, b.key_path, p_alias),
    meshhook_limits._path_sql(b.source, b.cost_path, p_alias))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._claim_key_sql(meshhook_limits.queue_bindings, text) FROM PUBLIC;

-- The claim indexes of a binding, built in the caller's transaction
-- (writers of the queue wait meanwhile):
--   <index_name>:      each tenant's waiting jobs in the queue's own order
--                      (the head of a tenant's jobs, what claim_jobs takes),
--                      with when each is due last, so the head statement
--                      passes deferred jobs on the index alone, never
--                      reading them from the table;
--   <index_name>_due:  each tenant's waiting jobs by when they are due
--                      (pg-boss start_after, pgmq vt; pg-boss 12: not held
--                      by a flow), for the skip scan over the tenants: its
--                      first entry per tenant says whether the tenant has a
--                      job due at all, so tenants whose jobs are all
--                      deferred cost one probe a scan, never a walk through
--                      their jobs (issue 19, item 3);
--   <index_name>_at:   pg-boss: the queue's waiting jobs by when they are due
--                      (pg-boss 12 has no such index of its own; pgmq's vt
--                      index is one), for reading the jobs due instead of
--                      scanning the tenants while few are (issue 20).
CREATE FUNCTION meshhook_limits._create_claim_index(b meshhook_limits.queue_bindings)
RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  waiting text;   -- pg-boss: the queue's waiting jobs ...
  fetchable text; -- ... and those its fetch may take (pg-boss 12: not blocked)
BEGIN
  IF b.source = 'pgboss' THEN
    waiting := pg_catalog.format('name = %L AND state OPERATOR(pg_catalog.<) %L::pgboss.job_state', b.queue, 'active');
    fetchable := waiting || CASE WHEN meshhook_limits._pgboss_major() >= 12 THEN ' AND NOT blocked' ELSE '' END;
    EXECUTE pg_catalog.format('CREATE INDEX %I ON pgboss.job (%s, priority DESC, created_on, id, start_after) WHERE %s',
      b.index_name, meshhook_limits._claim_key_sql(b, ''), waiting);
    EXECUTE pg_catalog.format('CREATE INDEX %I ON pgboss.job (%s, start_after) WHERE %s',
      b.index_name || '_due', meshhook_limits._claim_key_sql(b, ''), fetchable);
    EXECUTE pg_catalog.format('CREATE INDEX %I ON pgboss.job (start_after) WHERE %s', b.index_name || '_at', fetchable);
  ELSE
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %s (%s, msg_id, vt)', b.index_name, b.relation,
      meshhook_limits._claim_key_sql(b, ''));
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %s (%s, vt)', b.index_name || '_due', b.relation,
      meshhook_limits._claim_key_sql(b, ''));
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._create_claim_index(meshhook_limits.queue_bindings) FROM PUBLIC;

-- bind_queue: sender_tenant (pgmq), and the owner checks (_queue_distrust).
DROP FUNCTION meshhook_limits.bind_queue(text, text, text, text, text, text);
-- The trigger bind_queue(..., sender_tenant => true) puts on a pgmq queue
-- table, BEFORE INSERT OR UPDATE OF message: the tenant of a message is the
-- sender's, whatever the sender wrote (issue 19, item 4). TG_ARGV[0] is the
-- binding's tenant path (text[]).
--   - A sender that carries a tenant (JWT claims of meshhook_limits.jwt_roles,
--     or meshhook_limits.tenant_id): its tenant is written at the path.
--   - An admin (superuser, service_role, meshhook_limits_admin): as written.
--   - A request with JWT claims but no tenant (anon), or a session with
--     meshhook_limits.tenant_id set whose tenant does not count here (code
--     run for someone else: CREATE INDEX, ANALYZE): refused, 42501.
--   - Any other role (the application's backend, granted INSERT by the
--     operator): as written; it is trusted with the tenant, as pg-boss's
--     senders are.
-- A message must be a JSON object (22023): its tenant is written into it.
CREATE FUNCTION meshhook_limits._stamp_sender_tenant() RETURNS trigger
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  path text[] := TG_ARGV[0]::text[];
  me uuid := meshhook_limits.current_tenant();
BEGIN
  IF me IS NULL THEN
    IF meshhook_limits.is_admin()
       OR (coalesce(pg_catalog.current_setting('request.jwt.claims', true), '') = ''
           AND coalesce(pg_catalog.current_setting('meshhook_limits.tenant_id', true), '') = '') THEN
      RETURN NEW;
    END IF;
    RAISE EXCEPTION 'a request without a tenant may not send to %', TG_TABLE_NAME USING ERRCODE = '42501',
      HINT = 'send with a JWT whose claims carry the tenant id (meshhook_limits.tenant_claim)';
  END IF;
  IF pg_catalog.jsonb_typeof(NEW.message) IS DISTINCT FROM 'object' THEN
    RAISE EXCEPTION 'messages of % must be JSON objects', TG_TABLE_NAME USING ERRCODE = '22023',
      HINT = 'the sender''s tenant is written into the message at the queue''s tenant path';
  END IF;
  FOR i IN 1 .. pg_catalog.array_length(path, 1) - 1 LOOP
    IF pg_catalog.jsonb_typeof(NEW.message OPERATOR(pg_catalog.#>) path[1:i]) IS DISTINCT FROM 'object' THEN
      NEW.message := pg_catalog.jsonb_set(NEW.message, path[1:i], '{}'::jsonb, true);
    END IF;
  END LOOP;
  NEW.message := pg_catalog.jsonb_set(NEW.message, path, pg_catalog.to_jsonb(me::text), true);
  RETURN NEW;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._stamp_sender_tenant() FROM PUBLIC;

CREATE FUNCTION meshhook_limits.bind_queue(source text, queue text, tenant_path text DEFAULT 'tenant_id',
    project_path text DEFAULT NULL, key_path text DEFAULT NULL, cost_path text DEFAULT NULL,
    sender_tenant boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  rel regclass;
  tp text[]; pp text[]; kp text[]; cp text[];
  b meshhook_limits.queue_bindings;
  idx name;
  why text; why_hint text;
BEGIN
  PERFORM meshhook_limits.require_admin_access('bind queues');
  rel := meshhook_limits._queue_relation(bind_queue.source, bind_queue.queue);
  -- Owned by roles the binder controls (_queue_distrust).
  SELECT d.problem, d.hint INTO why, why_hint FROM meshhook_limits._queue_distrust(rel) d LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'cannot bind % queue %: %', bind_queue.source, quote_literal(left(bind_queue.queue, 80)), why
      USING ERRCODE = '42501', HINT = why_hint;
  END IF;
  IF bind_queue.tenant_path IS NULL THEN
    RAISE EXCEPTION 'tenant_path must not be NULL' USING ERRCODE = '22023';
  END IF;
  IF bind_queue.sender_tenant IS NULL OR (bind_queue.sender_tenant AND bind_queue.source <> 'pgmq') THEN
    RAISE EXCEPTION 'sender_tenant is true or false, and true only for pgmq' USING ERRCODE = '22023',
      HINT = 'pg-boss jobs are sent by the application''s own backend, which names their tenant (docs/security.md)';
  END IF;
  tp := meshhook_limits._json_path(bind_queue.tenant_path, 'tenant_path');
  pp := meshhook_limits._json_path(bind_queue.project_path, 'project_path');
  kp := meshhook_limits._json_path(bind_queue.key_path, 'key_path');
  cp := meshhook_limits._json_path(bind_queue.cost_path, 'cost_path');
  SELECT * INTO b FROM meshhook_limits.queue_bindings qb
   WHERE qb.source = bind_queue.source AND qb.queue = bind_queue.queue FOR UPDATE;
  IF FOUND THEN
    IF b.tenant_path = tp AND b.relation = rel AND b.project_path IS NOT DISTINCT FROM pp
       AND b.key_path IS NOT DISTINCT FROM kp AND b.cost_path IS NOT DISTINCT FROM cp
       AND b.sender_tenant = bind_queue.sender_tenant THEN
      RETURN;
    END IF;
    -- Other paths, another index: bound again (its claimed jobs are followed
    -- through the retired binding).
    PERFORM meshhook_limits.unbind_queue(bind_queue.source, bind_queue.queue);
  END IF;
  INSERT INTO meshhook_limits.queue_bindings (source, queue, tenant_path, project_path, key_path, cost_path,
                                              relation, index_name, sender_tenant)
  VALUES (bind_queue.source, bind_queue.queue, tp, pp, kp, cp, rel, '-', bind_queue.sender_tenant)
  RETURNING * INTO b;
  idx := 'meshhook_claim_' || b.id;
  UPDATE meshhook_limits.queue_bindings qb SET index_name = idx WHERE qb.id = b.id
  RETURNING * INTO b;
  PERFORM meshhook_limits._create_claim_index(b);
  -- The triggers end a claimed job's slot in the transaction that ends the
  -- job (_claim_ended: shared memory only, no SQL in the queue's statements).
  IF bind_queue.source = 'pgboss' THEN
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I AFTER UPDATE ON pgboss.job FOR EACH ROW WHEN (OLD.name OPERATOR(pg_catalog.=) %L '
      'AND OLD.state OPERATOR(pg_catalog.=) %L::pgboss.job_state AND NEW.state OPERATOR(pg_catalog.<>) %L::pgboss.job_state) '
      'EXECUTE FUNCTION meshhook_limits._claim_ended(%L, %L)',
      idx || '_ended', bind_queue.queue, 'active', 'active', b.id, 'pgboss');
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I AFTER DELETE ON pgboss.job FOR EACH ROW WHEN (OLD.name OPERATOR(pg_catalog.=) %L '
      'AND OLD.state OPERATOR(pg_catalog.=) %L::pgboss.job_state) '
      'EXECUTE FUNCTION meshhook_limits._claim_ended(%L, %L)',
      idx || '_deleted', bind_queue.queue, 'active', b.id, 'pgboss');
  ELSE
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION meshhook_limits._claim_ended(%L, %L)',
      idx || '_deleted', rel, b.id, 'pgmq');
    -- A message's tenant is its sender's (_stamp_sender_tenant), before any
    -- other trigger of ours sees it.
    IF bind_queue.sender_tenant THEN
      EXECUTE pg_catalog.format(
        'CREATE TRIGGER %I BEFORE INSERT OR UPDATE OF message ON %s FOR EACH ROW '
        'EXECUTE FUNCTION meshhook_limits._stamp_sender_tenant(%L)', idx || '_sender', rel, tp::text);
    END IF;
  END IF;
END
$$;
COMMENT ON FUNCTION meshhook_limits.bind_queue(text, text, text, text, text, text, boolean) IS
  'Admin: where a pg-boss or pgmq queue''s jobs name their tenant, project, concurrency key and cost; adds the claim index; sender_tenant (pgmq): each message''s tenant is its sender''s. See docs/claiming.md.';

-- Every bound queue's claim index again, with the new key.
DO $$
DECLARE b meshhook_limits.queue_bindings;
BEGIN
  FOR b IN SELECT * FROM meshhook_limits.queue_bindings qb
            WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = qb.relation) LOOP
    EXECUTE pg_catalog.format('DROP INDEX IF EXISTS %I.%I',
      (SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = b.relation), b.index_name);
    PERFORM meshhook_limits._create_claim_index(b);
  END LOOP;
END
$$;

-- pg-boss's own queues (__pgboss__send-it) are left out of queue_health().
CREATE OR REPLACE FUNCTION meshhook_limits._sample_pgboss(p_at timestamptz, p_window interval, p_full boolean DEFAULT true)
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

-- claim_jobs returns retry_count (pg-boss 12's complete({id, retryCount}) needs it).
DROP FUNCTION meshhook_limits.claim_jobs(text, text, integer, interval);
CREATE FUNCTION meshhook_limits."claim_jobs"(
	"source" TEXT, /* Option < & str > */
	"queue" TEXT, /* Option < & str > */
	"batch" INT DEFAULT 1, /* Option < i32 > */
	"lease" interval DEFAULT NULL /* Option < Interval > */
) RETURNS TABLE (
	"job_id" TEXT,  /* String */
	"tenant_id" uuid,  /* Uuid */
	"project_id" uuid,  /* Option < Uuid > */
	"concurrency_key" TEXT,  /* Option < String > */
	"slot_id" uuid,  /* Uuid */
	"lease_expires_at" timestamp with time zone,  /* Option < Ts > */
	"data" jsonb,  /* Option < JsonB > */
	"retry_count" INT  /* Option < i32 > */
)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'claim_jobs_wrapper';
COMMENT ON FUNCTION meshhook_limits.claim_jobs(text, text, integer, interval) IS
  'Claim up to batch jobs whose every limit has room, fairly across tenants, with their slots; the job is taken as the queue''s own fetch takes it. Runs as the caller (an admin worker). See docs/claiming.md.';

-- explain_queues: one row per tenant however its jobs spell it; deferred,
-- invalid and key-limited jobs are not runnable (two columns added).
DROP FUNCTION meshhook_limits.explain_queues(uuid);
CREATE FUNCTION meshhook_limits.explain_queues(tenant uuid DEFAULT NULL)
RETURNS TABLE(source text, queue text, tenant_id uuid, waiting bigint, running bigint, runnable bigint,
              blocked bigint, blocked_by text, deferred bigint, invalid bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  me uuid := meshhook_limits.current_tenant();
  v_only uuid := explain_queues.tenant;
  b meshhook_limits.queue_bindings;
  t_sql text; p_sql text; k_sql text; c_sql text;
  not_due text;
  w jsonb;
  r record;
  k record;
  why text;
  key_blocked bigint;
  -- As claim_jobs parses ids (src/claim/mod.rs parse_uuid).
  uuid_re constant text := '^([0-9a-fA-F]{32}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})$';
BEGIN
  IF NOT meshhook_limits.can_monitor() THEN
    IF me IS NULL THEN
      RAISE EXCEPTION 'no tenant identity to explain queues for' USING ERRCODE = '42501',
        HINT = 'call with a JWT whose claims carry the tenant id, or as an admin';
    END IF;
    IF v_only IS NOT NULL AND v_only <> me THEN
      RAISE EXCEPTION 'a tenant may explain only its own jobs' USING ERRCODE = '42501',
        HINT = 'call with the tenant id of your own JWT claim, or NULL';
    END IF;
    v_only := me;
  END IF;
  FOR b IN SELECT * FROM meshhook_limits.queue_bindings qb
            WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = qb.relation)
            ORDER BY qb.source, qb.queue LOOP
    t_sql := meshhook_limits._tenant_sql(b.source, b.tenant_path);
    p_sql := meshhook_limits._path_sql(b.source, b.project_path);
    k_sql := meshhook_limits._path_sql(b.source, b.key_path);
    c_sql := meshhook_limits._path_sql(b.source, b.cost_path);
    not_due := CASE WHEN b.source = 'pgmq' THEN 'false'
                    WHEN meshhook_limits._pgboss_major() >= 12 THEN '(j.blocked OR j.start_after > pg_catalog.now())'
                    ELSE 'j.start_after >= pg_catalog.now()' END;
    BEGIN
      w := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
        SELECT coalesce(pg_catalog.jsonb_agg(x), '[]') FROM (
          SELECT tenant, key, count(*) AS waiting,
                 count(*) FILTER (WHERE not_due) AS deferred,
                 count(*) FILTER (WHERE NOT not_due AND NOT valid) AS invalid
            FROM (SELECT %1$s AS tenant, %2$s AS key, %7$s AS not_due,
                         meshhook_limits._claim_key(%1$s, %3$s, %2$s, %4$s) IS NOT NULL AS valid
                    FROM %5$s j WHERE %6$s AND %1$s ~ %8$L) y
           WHERE %9$s
           GROUP BY tenant, key) x $q$,
        t_sql, k_sql, p_sql, c_sql,
        CASE b.source WHEN 'pgboss' THEN 'pgboss.job' ELSE b.relation::text END,
        CASE b.source WHEN 'pgboss' THEN pg_catalog.format('j.name = %L AND j.state < ''active''', b.queue)
                      ELSE 'j.vt <= pg_catalog.clock_timestamp()' END,
        not_due, uuid_re,
        CASE WHEN v_only IS NOT NULL
             THEN pg_catalog.format('pg_catalog.lower(pg_catalog.replace(tenant, ''-'', '''')) = %L',
                                    pg_catalog.replace(v_only::text, '-', ''))
             ELSE 'true' END));
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: reading % queue % failed: %', b.source, b.queue, SQLERRM;
      CONTINUE;
    END;
    -- Tenants with waiting jobs, and tenants with claimed jobs running.
    FOR r IN SELECT coalesce(w.tenant_id, c.tenant_id) AS tenant, coalesce(w.waiting, 0) AS waiting,
                    coalesce(w.deferred, 0) AS deferred, coalesce(w.invalid, 0) AS invalid,
                    coalesce(c.running, 0) AS running
               FROM (SELECT x.tenant::uuid AS tenant_id, sum(x.waiting)::bigint AS waiting,
                            sum(x.deferred)::bigint AS deferred, sum(x.invalid)::bigint AS invalid
                       FROM pg_catalog.jsonb_to_recordset(w) x(tenant text, key text, waiting bigint,
                                                                deferred bigint, invalid bigint)
                      GROUP BY 1) w
               FULL JOIN (SELECT s.tenant_id, sum(s.cost)::bigint AS running
                            FROM meshhook_limits._claimed_slots() s
                           WHERE s.binding_id = b.id AND (v_only IS NULL OR s.tenant_id = v_only)
                           GROUP BY s.tenant_id) c ON c.tenant_id = w.tenant_id
              ORDER BY 2 DESC, 1 LOOP
      SELECT e.resource INTO why FROM meshhook_limits.explain_admission(r.tenant) e
       WHERE e.blocking ORDER BY e.scope = 'total' LIMIT 1;
      source := b.source; queue := b.queue; tenant_id := r.tenant; waiting := r.waiting;
      running := r.running; deferred := r.deferred; invalid := r.invalid;
      blocked := 0;
      IF why IS NULL THEN
        -- The tenant has room: its jobs under a full concurrency key wait.
        FOR k IN SELECT x.key, sum(x.waiting - x.deferred - x.invalid)::bigint AS ready
                   FROM pg_catalog.jsonb_to_recordset(w) x(tenant text, key text, waiting bigint,
                                                            deferred bigint, invalid bigint)
                  WHERE x.key IS NOT NULL AND pg_catalog.octet_length(x.key) BETWEEN 1 AND 200
                    AND x.tenant::uuid = r.tenant
                  GROUP BY x.key HAVING sum(x.waiting - x.deferred - x.invalid) > 0 LOOP
          IF EXISTS (SELECT 1 FROM meshhook_limits.explain_admission(r.tenant, NULL, k.key) e
                      WHERE e.scope = 'key' AND e.blocking) THEN
            blocked := blocked + k.ready;
            why := coalesce(why, 'concurrent_executions.' || k.key);
          END IF;
        END LOOP;
      ELSE
        blocked := r.waiting - r.deferred - r.invalid;
      END IF;
      runnable := r.waiting - r.deferred - r.invalid - blocked;
      blocked_by := why;
      RETURN NEXT;
      why := NULL;
    END LOOP;
  END LOOP;
END
$$;
COMMENT ON FUNCTION meshhook_limits.explain_queues(uuid) IS
  'Per bound queue and tenant: waiting (= deferred + invalid + blocked + runnable), running (claimed), and the limit that blocks. Admins see all tenants, a tenant its own.';

-- Claims run the queue's statements as the queue table's owner (src/claim/mod.rs);
-- bind_queue and claim_jobs refuse what that cannot confine, and bind_queue
-- refuses queue objects of roles the binder does not control (issue 19).
CREATE FUNCTION meshhook_limits."_caller_controls"(
	"role" oid /* pg_sys :: Oid */
) RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_caller_controls_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._caller_controls(oid) FROM PUBLIC;

-- Every table below a queue table, partitions and plain inheritance
-- children alike, at any depth: statements on the queue table reach them
-- and fire their triggers.
CREATE FUNCTION meshhook_limits._queue_descendants(p_rel regclass) RETURNS TABLE(oid oid)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH RECURSIVE kids(oid) AS (
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = p_rel
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN kids k ON i.inhparent = k.oid)
  SELECT kids.oid FROM kids
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_descendants(regclass) FROM PUBLIC;

-- Why bind_queue must not bind a queue table, as (problem, hint) rows,
-- none when it may: against squatting, its schema, the table, its
-- partitions and the functions in the schema (which workers call) must each
-- be owned by a role the caller of bind_queue controls
-- (_caller_controls: itself, a role it is a member of, or a superuser). A
-- schema someone else made before the queue system was installed (CREATE
-- SCHEMA IF NOT EXISTS keeps it) lets its owner replace the queue's
-- objects; a table someone else owns is theirs to read and rewrite.
-- (claim_jobs checks the claiming role's own trust in the owners on every
-- call: src/claim/mod.rs.)
CREATE FUNCTION meshhook_limits._queue_distrust(p_rel regclass)
RETURNS TABLE(problem text, hint text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH t AS (
    SELECT c.oid, c.relowner, n.oid AS nsp, n.nspname, n.nspowner
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = p_rel),
  parts AS (
    SELECT d.oid FROM meshhook_limits._queue_descendants(p_rel) d UNION SELECT p_rel::oid)
  SELECT pg_catalog.format('schema %I is owned by role %I, which the role binding the queue does not control',
                           t.nspname, t.nspowner::regrole::text),
         pg_catalog.format('if %1$s is meant to own the queue, GRANT %1$s TO the binding role; otherwise the schema was '
                           'made by someone else before the queue system was installed: drop it and install again',
                           t.nspowner::regrole::text)
    FROM t WHERE NOT meshhook_limits._caller_controls(t.nspowner)
  UNION ALL
  SELECT pg_catalog.format('queue table %s is owned by role %I, which the role binding the queue does not control',
                           c.oid::regclass, c.relowner::regrole::text),
         pg_catalog.format('if %1$s is meant to own the queue, GRANT %1$s TO the binding role; otherwise create the '
                           'queue again as a role you control', c.relowner::regrole::text)
    FROM parts JOIN pg_catalog.pg_class c ON c.oid = parts.oid
   WHERE NOT meshhook_limits._caller_controls(c.relowner)
  UNION ALL
  -- The workers call the queue system's functions (pgmq.archive): their
  -- owners can rewrite them.
  SELECT pg_catalog.format('function %s is owned by role %I, which the role binding the queue does not control',
                           p.oid::regprocedure, p.proowner::regrole::text),
         pg_catalog.format('workers call the functions in schema %1$I: if %2$s is meant to own %3$s, GRANT %2$s TO the '
                           'binding role; otherwise drop the function or give it to the schema''s owner',
                           t.nspname, p.proowner::regrole::text, p.oid::regprocedure)
    FROM t JOIN pg_catalog.pg_proc p ON p.pronamespace = t.nsp
   WHERE NOT meshhook_limits._caller_controls(p.proowner)
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_distrust(regclass) FROM PUBLIC;

CREATE OR REPLACE FUNCTION meshhook_limits._queue_binding(p_source text, p_queue text)
RETURNS meshhook_limits.queue_bindings
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  b meshhook_limits.queue_bindings;
BEGIN
  PERFORM meshhook_limits.require_admin_access('claim jobs');
  SELECT * INTO b FROM meshhook_limits.queue_bindings qb WHERE qb.source = p_source AND qb.queue = p_queue;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'queue % of % is not bound', coalesce(quote_literal(left(p_queue, 80)), 'NULL'),
      coalesce(quote_literal(left(p_source, 40)), 'NULL')
      USING ERRCODE = '22023', HINT = 'an admin binds it with meshhook_limits.bind_queue(source, queue, tenant_path)';
  END IF;
  -- A queue dropped (and perhaps created again) after it was bound: its
  -- table, index and triggers are gone.
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.oid = b.relation) THEN
    RAISE EXCEPTION 'queue % of % was dropped after it was bound', quote_literal(left(p_queue, 80)),
      quote_literal(p_source)
      USING ERRCODE = '55000', HINT = 'bind it again with meshhook_limits.bind_queue (or unbind it)';
  END IF;
  -- The claim statements name pg-boss's table: it must still be this one.
  IF b.source = 'pgboss' AND pg_catalog.to_regclass('pgboss.job') IS DISTINCT FROM b.relation THEN
    RAISE EXCEPTION 'pgboss.job is no longer the table queue % was bound on', quote_literal(left(p_queue, 80))
      USING ERRCODE = '55000', HINT = 'bind it again with meshhook_limits.bind_queue (or unbind it)';
  END IF;
  RETURN b;
END
$$;

-- Serve this database now (the launcher).
SELECT meshhook_limits._serve_database();

-- The tick reads only the queue tables of administrators' roles: code an
-- owner attached to a table can catch the cancel of
-- meshhook_limits.queue_read_timeout and hold the tick (issue 19).
CREATE FUNCTION meshhook_limits."_tick_reads"(
	"rel" oid /* pg_sys :: Oid */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_tick_reads_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._tick_reads(oid) FROM PUBLIC;
CREATE OR REPLACE FUNCTION meshhook_limits._sample_pgmq(p_at timestamptz, p_window interval, p_full boolean DEFAULT true)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE q record; n bigint; qt text; at_ text; r record; a record; stats timestamptz;
  v_p50 numeric; v_p95 numeric; v_tput numeric;
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

-- _slot_limits(t, NULL, NULL) of many tenants at once, in one set-based
-- query (claim_jobs loads the limits of every tenant it finds waiting: one
-- query per tenant cost 2 ms each, seconds with thousands; issue 20).
-- Without a project or key, the project's and the key's caps are NULL and
-- each resource resolves tenant -> plan -> global, as in _resolve.
CREATE FUNCTION meshhook_limits._slot_limits_of(p_tenants uuid[])
RETURNS TABLE(tenant_id uuid, tenant_cap bigint, project_cap bigint, exec_micros bigint, memory_bytes bigint,
              key_cap bigint, total_cap bigint, weight float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH t AS (SELECT DISTINCT u AS tenant_id FROM pg_catalog.unnest(p_tenants) u WHERE u IS NOT NULL),
  wanted(resource) AS (VALUES ('concurrent_executions'), ('execution_seconds'), ('memory_bytes'),
                              ('fair_share_weight')),
  r AS (
    SELECT DISTINCT ON (x.tenant_id, x.resource) x.tenant_id, x.resource, x.limit_value
      FROM (
        SELECT t.tenant_id, l.resource, l.limit_value, 1 AS rank
          FROM t JOIN meshhook_limits.limits l ON l.tenant_id = t.tenant_id AND l.project_id IS NULL
         WHERE l.resource IN (SELECT w.resource FROM wanted w)
        UNION ALL
        SELECT t.tenant_id, l.resource, l.limit_value, 2
          FROM t JOIN meshhook_limits.tenant_plans tp ON tp.tenant_id = t.tenant_id
          JOIN meshhook_limits.limits l ON l.plan = tp.plan
         WHERE l.resource IN (SELECT w.resource FROM wanted w)
        UNION ALL
        SELECT t.tenant_id, l.resource, l.limit_value, 3
          FROM t CROSS JOIN meshhook_limits.limits l
         WHERE l.tenant_id IS NULL AND l.plan IS NULL AND l.resource IN (SELECT w.resource FROM wanted w)) x
     ORDER BY x.tenant_id, x.resource, x.rank)
  -- (LEAST ignores a NULL: a resource without a limit stays NULL here.)
  SELECT p.tenant_id,
         CASE WHEN p.ce IS NOT NULL THEN LEAST(pg_catalog.floor(p.ce), 9e18)::bigint END,
         NULL::bigint,
         CASE WHEN p.es IS NOT NULL THEN LEAST(p.es * 1000000, 9e18)::bigint END,
         CASE WHEN p.mb IS NOT NULL THEN LEAST(p.mb, 9e18)::bigint END,
         NULL::bigint,
         (SELECT LEAST(pg_catalog.floor(l.limit_value), 9e18)::bigint FROM meshhook_limits.limits l
           WHERE l.resource = 'concurrent_executions_total' AND l.tenant_id IS NULL AND l.plan IS NULL),
         p.fw::float8
    FROM (SELECT t.tenant_id,
                 max(r.limit_value) FILTER (WHERE r.resource = 'concurrent_executions') AS ce,
                 max(r.limit_value) FILTER (WHERE r.resource = 'execution_seconds') AS es,
                 max(r.limit_value) FILTER (WHERE r.resource = 'memory_bytes') AS mb,
                 max(r.limit_value) FILTER (WHERE r.resource = 'fair_share_weight') AS fw
            FROM t LEFT JOIN r ON r.tenant_id = t.tenant_id
           GROUP BY t.tenant_id) p
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._slot_limits_of(uuid[]) FROM PUBLIC;

-- PgBouncer sampling, the Rust parts (src/pooler.rs).
CREATE FUNCTION meshhook_limits."_pooler_may_connect"() RETURNS bool /* bool */
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pooler_may_connect_wrapper';
CREATE FUNCTION meshhook_limits."_caller_is_superuser"() RETURNS bool /* bool */
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_caller_is_superuser_wrapper';
CREATE FUNCTION meshhook_limits."_pooler_connect"(
	"dblink" TEXT, /* & str */
	"conn" TEXT, /* & str */
	"conninfo" TEXT, /* & str */
	"ms" INT /* i32 */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pooler_connect_wrapper';
CREATE FUNCTION meshhook_limits."_pooler_disconnect"(
	"dblink" TEXT, /* Option < & str > */
	"conn" TEXT /* & str */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pooler_disconnect_wrapper';
CREATE FUNCTION meshhook_limits."_pooler_close_all"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pooler_close_all_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_connect(text, text, text, integer) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_disconnect(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_close_all() FROM PUBLIC;

-- PgBouncer: poolers named by add_pooler, sampled by the tick through dblink,
-- pooler_health(), pool sizing (sql/pooler.sql, whole).
-- The poolers to sample. conninfo is a libpq connection string without a
-- password, or the name of a dblink foreign server whose user mapping holds
-- the credentials (add_pooler refuses passwords: this table is readable by
-- monitors). sizing: off, dry_run (record what it would do) or on (apply).
CREATE TABLE meshhook_limits.poolers (
  name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
  conninfo text NOT NULL,
  enabled boolean NOT NULL DEFAULT true,
  sizing text NOT NULL DEFAULT 'off' CHECK (sizing IN ('off', 'dry_run', 'on')),
  min_pool_size int NOT NULL DEFAULT 2 CHECK (min_pool_size >= 1),
  max_pool_size int NOT NULL DEFAULT 50 CHECK (max_pool_size >= min_pool_size AND max_pool_size <= 100000),
  -- The window a sizing decision looks back over, and the least time between two changes.
  resize_every interval NOT NULL DEFAULT '1 minute' CHECK (resize_every BETWEEN interval '1 second' AND interval '1 day'),
  resized_at timestamptz
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.poolers', '');
ALTER TABLE meshhook_limits.poolers ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.poolers FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.poolers TO PUBLIC;

-- One row per pooler per tick: reachable or not (and why), and SHOW TOTALS'
-- counters (since the pooler started) for rates between two samples.
CREATE TABLE meshhook_limits.pooler_samples (
  pooler text NOT NULL,
  sampled_at timestamptz NOT NULL,
  up boolean NOT NULL,
  error text,
  version text,
  default_pool_size int,
  xact_count bigint,
  query_count bigint,
  wait_time_us bigint,
  avg_wait_us bigint,
  sample_ms numeric NOT NULL,
  PRIMARY KEY (pooler, sampled_at)
);
CREATE INDEX pooler_samples_sampled_at ON meshhook_limits.pooler_samples (sampled_at);
ALTER TABLE meshhook_limits.pooler_samples ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.pooler_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.pooler_samples TO PUBLIC;

-- One row per pool (database, user) of a reachable pooler per tick, from
-- SHOW POOLS, with the database's pool size from SHOW DATABASES.
CREATE TABLE meshhook_limits.pooler_pool_samples (
  pooler text NOT NULL,
  sampled_at timestamptz NOT NULL,
  database text NOT NULL,
  user_name text NOT NULL,
  pool_mode text,
  pool_size int,
  clients_active int NOT NULL,
  clients_waiting int NOT NULL,
  servers_active int NOT NULL,
  servers_idle int NOT NULL,
  servers_used int NOT NULL,
  servers_tested int NOT NULL,
  servers_login int NOT NULL,
  maxwait_seconds numeric NOT NULL,
  status text NOT NULL,
  PRIMARY KEY (pooler, sampled_at, database, user_name)
);
CREATE INDEX pooler_pool_samples_sampled_at ON meshhook_limits.pooler_pool_samples (sampled_at);
ALTER TABLE meshhook_limits.pooler_pool_samples ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.pooler_pool_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.pooler_pool_samples TO PUBLIC;

-- The Rust parts (src/pooler.rs): internal, but add_pooler (which runs as
-- its caller) asks _caller_is_superuser.
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_may_connect() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._caller_is_superuser() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits._caller_is_superuser() TO meshhook_limits_admin;

-- The schema of dblink when it is installed by a superuser, else NULL. Its
-- functions are called schema-qualified with arguments of their exact types,
-- so no other function of that schema can stand in for them.
CREATE FUNCTION meshhook_limits._dblink_schema() RETURNS name
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT n.nspname
    FROM pg_catalog.pg_extension e
    JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
    JOIN pg_catalog.pg_roles r ON r.oid = e.extowner
   WHERE e.extname = 'dblink' AND r.rolsuper
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._dblink_schema() FROM PUBLIC;

-- The latest sample of every enabled pooler.
CREATE FUNCTION meshhook_limits._latest_pooler_samples() RETURNS SETOF meshhook_limits.pooler_samples
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT l.* FROM meshhook_limits.poolers p
   CROSS JOIN LATERAL (SELECT s.* FROM meshhook_limits.pooler_samples s WHERE s.pooler = p.name
                        ORDER BY s.sampled_at DESC LIMIT 1) l
   WHERE p.enabled
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._latest_pooler_samples() FROM PUBLIC;

-- Wait until the answer on connection p_conn can be read without blocking,
-- until p_deadline.
CREATE FUNCTION meshhook_limits._pooler_wait(p_dblink name, p_conn text, p_command text, p_deadline timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE busy int;
BEGIN
  LOOP
    EXECUTE format('SELECT %I.dblink_is_busy($1::text)', p_dblink) INTO busy USING p_conn;
    EXIT WHEN busy = 0;
    IF pg_catalog.clock_timestamp() >= p_deadline THEN
      RAISE EXCEPTION 'no answer to % within meshhook_limits.pooler_timeout (%)',
        p_command, current_setting('meshhook_limits.pooler_timeout') USING ERRCODE = '08006';
    END IF;
    PERFORM pg_catalog.pg_sleep(0.001);
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_wait(name, text, text, timestamptz) FROM PUBLIC;

-- Send one admin-console command on connection p_conn and wait for its
-- answer until p_deadline; the caller then reads it with dblink_get_result.
CREATE FUNCTION meshhook_limits._pooler_send(p_dblink name, p_conn text, p_command text, p_deadline timestamptz)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  EXECUTE format('SELECT %I.dblink_send_query($1::text, $2::text)', p_dblink) USING p_conn, p_command;
  PERFORM meshhook_limits._pooler_wait(p_dblink, p_conn, p_command, p_deadline);
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_send(name, text, text, timestamptz) FROM PUBLIC;

-- What a pooler answered, made safe to keep: text valid in the database's
-- encoding (else a stand-in naming its hash) and at most p_max characters;
-- a number that is a plain non-negative integer up to p_max (else an error:
-- the pooler is recorded as down with it).
CREATE FUNCTION meshhook_limits._pooler_text(p text, p_max int DEFAULT 200) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM pg_catalog.convert_to(p, pg_catalog.getdatabaseencoding());  -- verifies the bytes
  RETURN left(p, p_max);
EXCEPTION WHEN OTHERS THEN
  RETURN '(not valid ' || pg_catalog.getdatabaseencoding() || ': ' || left(pg_catalog.md5(p), 12) || ')';
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_text(text, int) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._pooler_number(p text, p_max bigint) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF meshhook_limits._pooler_text(p, 20) ~ '^[0-9]{1,18}$' AND p::bigint <= p_max THEN
    RETURN p::bigint;
  END IF;
  RAISE EXCEPTION 'the pooler answered % where a number from 0 to % belongs',
    coalesce(quote_literal(meshhook_limits._pooler_text(p, 40)), 'NULL'), p_max USING ERRCODE = '22003';
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_number(text, bigint) FROM PUBLIC;

-- Rows of one admin-console command as text columns c1..cN (N = p_columns,
-- the command's layout in this PgBouncer version).
CREATE FUNCTION meshhook_limits._pooler_show(p_dblink name, p_conn text, p_command text, p_columns int,
                                             p_deadline timestamptz)
RETURNS SETOF text[] LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE cols text := (SELECT string_agg(format('c%s text', i), ', ' ORDER BY i) FROM generate_series(1, p_columns) i);
        arr text := (SELECT string_agg(format('c%s', i), ', ' ORDER BY i) FROM generate_series(1, p_columns) i);
BEGIN
  PERFORM meshhook_limits._pooler_send(p_dblink, p_conn, p_command, p_deadline);
  -- At most 10,000 rows are looked at (pools are kept 500 at most).
  RETURN QUERY EXECUTE format('SELECT ARRAY[%s] FROM %I.dblink_get_result($1::text) AS t(%s) LIMIT 10000',
                              arr, p_dblink, cols)
    USING p_conn;
  -- The end of the command's results (dblink needs it read before the
  -- next), once it has come: a pooler that never ends its answer must not
  -- hold the tick in a read that waits for it.
  PERFORM meshhook_limits._pooler_wait(p_dblink, p_conn, p_command, p_deadline);
  EXECUTE format('SELECT count(*) FROM %I.dblink_get_result($1::text) AS t(c1 text)', p_dblink) USING p_conn;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_show(name, text, text, int, timestamptz) FROM PUBLIC;

-- Sample one pooler: a row in pooler_samples (up or down, with why) and one
-- per pool in pooler_pool_samples (the 500 with the most clients waiting,
-- then active); pool.pooler_down / pool.pooler_up on a change; then pool
-- sizing. A pooler that refuses, fails, answers what is not a count where
-- one belongs, or takes longer than pooler_timeout in all is recorded as
-- down; the tick goes on. One that timed out is tried again 10 s later, not
-- at every tick.
--
-- The dblink connection is opened and closed within this call, which runs
-- no code of anyone else's in between (_sample_poolers says where it may
-- run at all, src/pooler.rs).
CREATE FUNCTION meshhook_limits._sample_pooler(p_pooler meshhook_limits.poolers, p_at timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  db name := meshhook_limits._dblink_schema();
  conn text := 'meshhook_limits_pooler_' || pg_catalog.md5(p_pooler.name);
  t_start timestamptz := pg_catalog.clock_timestamp();
  deadline timestamptz := pg_catalog.clock_timestamp() + current_setting('meshhook_limits.pooler_timeout')::interval;
  last record;
  v text; vnum int; pool_cols int; db_cols int;
  pools jsonb; sizes jsonb; totals jsonb; dflt int; ev jsonb; err text; detail text; state text;
BEGIN
  SELECT s.up, s.sampled_at, s.sample_ms INTO last FROM meshhook_limits.pooler_samples s
   WHERE s.pooler = p_pooler.name ORDER BY s.sampled_at DESC LIMIT 1;
  IF last.up = false AND last.sample_ms > 100 AND p_at < last.sampled_at + interval '10 seconds' THEN
    RETURN;
  END IF;
  BEGIN
    IF db IS NULL THEN
      RAISE EXCEPTION 'extension dblink is not installed (by a superuser)' USING ERRCODE = '55000';
    END IF;
    -- dblink takes a conninfo that names a foreign server (its first 63
    -- bytes) as that server: only a superuser's dblink_fdw server counts.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_foreign_server fs
                WHERE fs.srvname = p_pooler.conninfo::name
                  AND NOT ((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = fs.srvowner)
                           AND fs.srvfdw = (SELECT w.oid FROM pg_catalog.pg_foreign_data_wrapper w WHERE w.fdwname = 'dblink_fdw'))) THEN
      RAISE EXCEPTION 'foreign server % (named like this pooler''s conninfo) is not a superuser''s dblink_fdw server; not connecting',
        quote_ident(p_pooler.conninfo::name) USING ERRCODE = '42501';
    END IF;
    PERFORM meshhook_limits._pooler_disconnect(db, conn);
    PERFORM meshhook_limits._pooler_connect(db, conn, p_pooler.conninfo,
      GREATEST(ceil(extract(epoch FROM deadline - pg_catalog.clock_timestamp()) * 1000)::int, 1));
    SELECT meshhook_limits._pooler_text(r[1]) INTO v
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW VERSION', 1, deadline) r;
    vnum := (SELECT m[1]::int * 100 + m[2]::int FROM regexp_match(v, '^PgBouncer (\d{1,3})\.(\d{1,3})') m);
    IF vnum IS NULL OR vnum < 118 THEN
      RAISE EXCEPTION '% is not PgBouncer 1.18 or newer', coalesce(quote_literal(v), 'the server') USING ERRCODE = '0A000';
    END IF;
    -- The layouts of SHOW POOLS and SHOW DATABASES by version (columns are
    -- only ever added; the ones read keep their places).
    pool_cols := CASE WHEN vnum >= 124 THEN 17 ELSE 16 END;
    db_cols := CASE WHEN vnum >= 124 THEN 17 WHEN vnum = 123 THEN 14 ELSE 13 END;
    -- SHOW POOLS by column: 1 database, 2 user, 3 cl_active, 4 cl_waiting,
    -- 7 sv_active, 10 sv_idle, 11 sv_used, 12 sv_tested, 13 sv_login,
    -- 14 maxwait, 15 maxwait_us, 16 pool_mode. The admin console's own
    -- pseudo-pool (database pgbouncer) is not a pool.
    SELECT jsonb_agg(y.a) INTO pools FROM (SELECT x.a FROM (
      SELECT jsonb_build_array(meshhook_limits._pooler_text(r[1], 63), meshhook_limits._pooler_text(r[2], 63),
               meshhook_limits._pooler_number(r[3], 1000000), meshhook_limits._pooler_number(r[4], 1000000),
               meshhook_limits._pooler_number(r[7], 1000000), meshhook_limits._pooler_number(r[10], 1000000),
               meshhook_limits._pooler_number(r[11], 1000000), meshhook_limits._pooler_number(r[12], 1000000),
               meshhook_limits._pooler_number(r[13], 1000000),
               meshhook_limits._pooler_number(r[14], 1000000000) + meshhook_limits._pooler_number(r[15], 999999) / 1000000.0,
               meshhook_limits._pooler_text(r[16], 20)) AS a
        FROM meshhook_limits._pooler_show(db, conn, 'SHOW POOLS', pool_cols, deadline) r
       WHERE r[1] IS DISTINCT FROM 'pgbouncer') x
     ORDER BY (x.a->>3)::bigint DESC, (x.a->>2)::bigint DESC, x.a->>0, x.a->>1
     LIMIT 500) y;
    SELECT jsonb_object_agg(meshhook_limits._pooler_text(r[1], 63), meshhook_limits._pooler_number(r[6], 100000)) INTO sizes
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW DATABASES', db_cols, deadline) r;
    SELECT jsonb_object_agg(meshhook_limits._pooler_text(r[1], 63), r[2]) INTO totals
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW TOTALS', 2, deadline) r;
    SELECT meshhook_limits._pooler_number(r[2], 100000) INTO dflt
      FROM meshhook_limits._pooler_show(db, conn, 'SHOW CONFIG', 4, deadline) r
     WHERE r[1] = 'default_pool_size';
    INSERT INTO meshhook_limits.pooler_samples
    VALUES (p_pooler.name, p_at, true, NULL, v, dflt,
            meshhook_limits._pooler_number(totals->>'total_xact_count', 1000000000000000000),
            meshhook_limits._pooler_number(totals->>'total_query_count', 1000000000000000000),
            meshhook_limits._pooler_number(totals->>'total_wait_time', 1000000000000000000),
            meshhook_limits._pooler_number(totals->>'avg_wait_time', 1000000000000000000),
            round(extract(epoch FROM pg_catalog.clock_timestamp() - t_start) * 1000, 3))
    ON CONFLICT DO NOTHING;
    INSERT INTO meshhook_limits.pooler_pool_samples
    SELECT p_pooler.name, p_at, a->>0, a->>1, a->>10, (sizes->>(a->>0))::int,
           (a->>2)::int, (a->>3)::int, (a->>4)::int, (a->>5)::int, (a->>6)::int, (a->>7)::int, (a->>8)::int,
           round((a->>9)::numeric, 6),
           CASE WHEN (a->>9)::numeric * 1000 >= meshhook_limits._setting_ms('meshhook_limits.pooler_wait_critical') THEN 'critical'
                WHEN (a->>9)::numeric * 1000 >= meshhook_limits._setting_ms('meshhook_limits.pooler_wait_warning') THEN 'warning'
                ELSE 'ok' END
      FROM jsonb_array_elements(coalesce(pools, '[]')) a
    ON CONFLICT DO NOTHING;
    -- Sizing on its own: a pooler that refuses SET (a stats_users login,
    -- not admin_users) is still up; the failure is an event, once per
    -- resize_every.
    BEGIN
      ev := meshhook_limits._size_pooler(p_pooler, p_at, db, conn, deadline);
    EXCEPTION WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS err = MESSAGE_TEXT;
      UPDATE meshhook_limits.poolers p SET resized_at = p_at WHERE p.name = p_pooler.name;
      ev := jsonb_build_object('event', 'pool.resize_failed', 'payload',
                               jsonb_build_object('pooler', p_pooler.name, 'mode', p_pooler.sizing,
                                                  'error', meshhook_limits._pooler_text(err, 500)));
    END;
    PERFORM meshhook_limits._pooler_disconnect(db, conn);
    -- Events once the connection is closed (sending one may run Realtime's code).
    IF last.up = false THEN
      PERFORM meshhook_limits._emit('pool.pooler_up', NULL, p_pooler.name, NULL, NULL,
                                    jsonb_build_object('pooler', p_pooler.name, 'version', v, 'down_since',
                                      (SELECT min(s.sampled_at) FROM meshhook_limits.pooler_samples s
                                        WHERE s.pooler = p_pooler.name AND NOT s.up
                                          AND s.sampled_at > coalesce((SELECT max(u.sampled_at) FROM meshhook_limits.pooler_samples u
                                                                        WHERE u.pooler = p_pooler.name AND u.up AND u.sampled_at < p_at),
                                                                      '-infinity'))));
    END IF;
    IF ev IS NOT NULL THEN
      PERFORM meshhook_limits._emit(ev->>'event', NULL, p_pooler.name, (ev->>'value')::numeric, (ev->>'limit')::numeric,
                                    ev->'payload');
    END IF;
  EXCEPTION WHEN OTHERS OR query_canceled THEN
    GET STACKED DIAGNOSTICS err = MESSAGE_TEXT, detail = PG_EXCEPTION_DETAIL, state = RETURNED_SQLSTATE;
    PERFORM meshhook_limits._pooler_disconnect(db, conn);
    IF state = '57014' THEN
      RAISE;  -- a cancel of the tick itself (the pooler's deadline is 08006)
    END IF;
    err := err || coalesce(': ' || nullif(regexp_replace(meshhook_limits._pooler_text(detail, 500), '\s+', ' ', 'g'), ''), '');
    INSERT INTO meshhook_limits.pooler_samples (pooler, sampled_at, up, error, sample_ms)
    VALUES (p_pooler.name, p_at, false, meshhook_limits._pooler_text(err, 1000),
            round(extract(epoch FROM pg_catalog.clock_timestamp() - t_start) * 1000, 3))
    ON CONFLICT DO NOTHING;
    IF last.up IS DISTINCT FROM false THEN
      PERFORM meshhook_limits._emit('pool.pooler_down', NULL, p_pooler.name, NULL, NULL,
                                    jsonb_build_object('pooler', p_pooler.name, 'error', meshhook_limits._pooler_text(err, 500)));
    END IF;
  END;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pooler(meshhook_limits.poolers, timestamptz) FROM PUBLIC;

-- A setting with a time unit, in milliseconds.
CREATE FUNCTION meshhook_limits._setting_ms(p_name text) RETURNS numeric
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT extract(epoch FROM current_setting(p_name)::interval) * 1000
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._setting_ms(text) FROM PUBLIC;

-- Every enabled pooler, each on its own (a failing one never stops the others).
CREATE FUNCTION meshhook_limits._sample_poolers(p_at timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE p meshhook_limits.poolers;
BEGIN
  -- Only in the extension's worker or a superuser's own session (not an
  -- admin's tick(), not code a table's owner planted): a connection opened
  -- here has the extension owner's rights (src/pooler.rs).
  IF NOT meshhook_limits._pooler_may_connect() THEN
    RETURN;
  END IF;
  FOR p IN SELECT * FROM meshhook_limits.poolers x WHERE x.enabled ORDER BY x.name LOOP
    BEGIN
      PERFORM meshhook_limits._sample_pooler(p, p_at);
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: sampling pooler % failed: %', quote_literal(p.name), SQLERRM;
    END;
  END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_poolers(timestamptz) FROM PUBLIC;

-- The pool size to run with, from both sides over the pooler's last
-- resize_every: raise when clients kept waiting (in at least half the
-- samples, or the longest wait reached pooler_wait_warning) by the p95 of
-- waiting clients of the busiest pool; lower when no client waited and the
-- busiest pool used at most half its servers (p95), to that p95 plus 25%.
-- Between the two nothing changes (hysteresis). Always within the pooler's
-- min/max_pool_size, and within what the server has room for (which wins
-- over min_pool_size): max_connections minus superuser_reserved_connections
-- and reserved_connections, minus the pools of the other poolers, this
-- pooler's pools of their own size and the sessions no pooler opened,
-- shared by the pools that follow default_pool_size.
CREATE FUNCTION meshhook_limits._pooler_size_advice(p_pooler meshhook_limits.poolers, p_at timestamptz)
RETURNS TABLE(current_size int, recommended_size int, server_cap int, pools int, reason text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  cur int; n bigint; fixed bigint; others bigint; pooled bigint; direct bigint; cap bigint; usable bigint;
  w record; target int; why text;
BEGIN
  SELECT s.default_pool_size INTO cur FROM meshhook_limits.pooler_samples s
   WHERE s.pooler = p_pooler.name AND s.up AND s.sampled_at <= p_at ORDER BY s.sampled_at DESC LIMIT 1;
  IF cur IS NULL THEN
    RETURN;
  END IF;
  -- The pools of the latest sample: those on the default size, and the rest.
  SELECT count(*) FILTER (WHERE x.pool_size = cur), coalesce(sum(x.pool_size) FILTER (WHERE x.pool_size <> cur), 0)
    INTO n, fixed
    FROM meshhook_limits.pooler_pool_samples x
   WHERE x.pooler = p_pooler.name
     AND x.sampled_at = (SELECT max(y.sampled_at) FROM meshhook_limits.pooler_pool_samples y
                          WHERE y.pooler = p_pooler.name AND y.sampled_at <= p_at);
  n := GREATEST(n, 1);
  -- The latest pools of every pooler sampled in the last 5 minutes: the
  -- other poolers' pool sizes, and the server connections all of them use.
  SELECT coalesce(sum(x.pool_size) FILTER (WHERE x.pooler <> p_pooler.name), 0),
         coalesce(sum(x.servers_active + x.servers_idle + x.servers_used + x.servers_tested + x.servers_login), 0)
    INTO others, pooled
    FROM meshhook_limits.pooler_pool_samples x
    JOIN (SELECT y.pooler, max(y.sampled_at) AS at FROM meshhook_limits.pooler_pool_samples y
           WHERE y.sampled_at > p_at - interval '5 minutes' AND y.sampled_at <= p_at GROUP BY y.pooler) l
      ON l.pooler = x.pooler AND l.at = x.sampled_at;
  -- Sessions on the server that no pooler opened (clients connected
  -- directly, the worker), from the server's own sample of this tick.
  direct := GREATEST(coalesce((SELECT p.total FROM meshhook_limits.pool_samples p
                                WHERE p.sampled_at <= p_at ORDER BY p.sampled_at DESC LIMIT 1), 0) - pooled, 0);
  usable := current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
            - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0);
  cap := GREATEST((usable - others - fixed - direct) / n, 1);
  SELECT count(DISTINCT x.sampled_at) AS samples,
         count(DISTINCT x.sampled_at) FILTER (WHERE x.clients_waiting > 0) AS waited,
         max(x.maxwait_seconds) AS maxwait,
         min(x.sampled_at) AS first_at
    INTO w
    FROM meshhook_limits.pooler_pool_samples x
   WHERE x.pooler = p_pooler.name AND x.sampled_at > p_at - p_pooler.resize_every AND x.sampled_at <= p_at
     AND x.pool_size = cur;
  IF w.samples < 2 OR NOT EXISTS (SELECT 1 FROM meshhook_limits.pooler_samples s
                                    WHERE s.pooler = p_pooler.name AND s.sampled_at <= p_at - p_pooler.resize_every) THEN
    RETURN QUERY SELECT cur, cur, LEAST(cap, 2147483647)::int, LEAST(n, 2147483647)::int,
                        format('not enough samples yet: sizing looks back over %s', p_pooler.resize_every);
    RETURN;
  END IF;
  IF w.waited * 2 >= w.samples OR w.maxwait * 1000 >= meshhook_limits._setting_ms('meshhook_limits.pooler_wait_warning') THEN
    SELECT cur + GREATEST(ceil(percentile_cont(0.95) WITHIN GROUP (ORDER BY b.waiting))::int, 1) INTO target
      FROM (SELECT max(x.clients_waiting) AS waiting FROM meshhook_limits.pooler_pool_samples x
             WHERE x.pooler = p_pooler.name AND x.sampled_at > p_at - p_pooler.resize_every AND x.sampled_at <= p_at
               AND x.pool_size = cur
             GROUP BY x.sampled_at) b;
    why := format('clients waited in %s of %s samples over %s (longest wait %s s): raise by the p95 of waiting clients',
                  w.waited, w.samples, p_pooler.resize_every, round(w.maxwait, 3));
  ELSIF w.waited = 0 THEN
    SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY b.busy) INTO w.maxwait
      FROM (SELECT max(x.servers_active) AS busy FROM meshhook_limits.pooler_pool_samples x
             WHERE x.pooler = p_pooler.name AND x.sampled_at > p_at - p_pooler.resize_every AND x.sampled_at <= p_at
               AND x.pool_size = cur
             GROUP BY x.sampled_at) b;
    IF w.maxwait * 2 <= cur THEN
      target := ceil(w.maxwait * 1.25)::int;
      why := format('no client waited over %s and the busiest pool used at most %s servers (p95) of %s: '
                    'lower to that plus 25%%', p_pooler.resize_every, w.maxwait, cur);
    ELSE
      target := cur;
      why := format('no client waited over %s; the busiest pool used %s servers (p95) of %s: keep',
                    p_pooler.resize_every, w.maxwait, cur);
    END IF;
  ELSE
    target := cur;
    why := format('clients waited in %s of %s samples over %s: keep', w.waited, w.samples, p_pooler.resize_every);
  END IF;
  -- Within [min_pool_size, max_pool_size], and never above the server's
  -- room, which wins over min_pool_size: bounds are an admin's, the room
  -- is every database's.
  target := LEAST(GREATEST(target, p_pooler.min_pool_size), p_pooler.max_pool_size);
  IF target > cap THEN
    why := why || format('; capped at %s: the server''s %s usable connections, less %s held by other pools and %s '
                         'sessions no pooler opened, over %s pools', cap, usable, others + fixed, direct, n);
    target := cap;
  END IF;
  RETURN QUERY SELECT cur, target, LEAST(cap, 2147483647)::int, LEAST(n, 2147483647)::int, why;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._pooler_size_advice(meshhook_limits.poolers, timestamptz) FROM PUBLIC;

-- Act on the advice when sizing is on (SET default_pool_size on the admin
-- console) or record it when dry_run: at most once per resize_every. Returns
-- the event to send (pool.resized, pool.resize_proposed, with before, after
-- and why), which the caller sends once the connection is closed.
CREATE FUNCTION meshhook_limits._size_pooler(p_pooler meshhook_limits.poolers, p_at timestamptz, p_dblink name,
                                             p_conn text, p_deadline timestamptz)
RETURNS jsonb LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE a record;
BEGIN
  IF p_pooler.sizing = 'off' OR p_at < p_pooler.resized_at + p_pooler.resize_every THEN
    RETURN NULL;
  END IF;
  SELECT * INTO a FROM meshhook_limits._pooler_size_advice(p_pooler, p_at);
  IF a.recommended_size IS NULL OR a.recommended_size = a.current_size THEN
    RETURN NULL;
  END IF;
  IF p_pooler.sizing = 'on' THEN
    PERFORM meshhook_limits._pooler_send(p_dblink, p_conn, format('SET default_pool_size = %s', a.recommended_size::int),
                                         p_deadline);
    EXECUTE format('SELECT count(*) FROM %I.dblink_get_result($1::text, true) AS t(c1 text)', p_dblink) USING p_conn;
    PERFORM meshhook_limits._pooler_wait(p_dblink, p_conn, 'SET default_pool_size', p_deadline);
    EXECUTE format('SELECT count(*) FROM %I.dblink_get_result($1::text) AS t(c1 text)', p_dblink) USING p_conn;
  END IF;
  UPDATE meshhook_limits.poolers p SET resized_at = p_at WHERE p.name = p_pooler.name;
  RETURN jsonb_build_object(
    'event', CASE p_pooler.sizing WHEN 'on' THEN 'pool.resized' ELSE 'pool.resize_proposed' END,
    'value', a.recommended_size, 'limit', a.current_size,
    'payload', jsonb_build_object('pooler', p_pooler.name, 'before', a.current_size,
                                  'after', a.recommended_size, 'why', a.reason,
                                  'mode', p_pooler.sizing, 'min_pool_size', p_pooler.min_pool_size,
                                  'max_pool_size', p_pooler.max_pool_size, 'server_cap', a.server_cap,
                                  'pools', a.pools));
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._size_pooler(meshhook_limits.poolers, timestamptz, name, text, timestamptz) FROM PUBLIC;

-- Name a PgBouncer to sample (superusers: the tick connects with the
-- extension owner's rights, so where it connects is a superuser's choice).
-- Runs as its caller.
CREATE FUNCTION meshhook_limits.add_pooler(name text, conninfo text, enabled boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE ci text := conninfo;
BEGIN
  -- The caller itself (this function runs as its caller: an admin's
  -- definer function calling it is the admin), outside code a table's
  -- owner planted (which runs as that owner in any session).
  IF NOT meshhook_limits._caller_is_superuser() THEN
    RAISE EXCEPTION 'only a superuser may add a pooler' USING ERRCODE = '42501',
      HINT = 'the tick connects to it with the extension owner''s rights; ask a superuser to run add_pooler';
  END IF;
  IF meshhook_limits._dblink_schema() IS NULL THEN
    RAISE EXCEPTION 'sampling PgBouncer needs the dblink extension' USING ERRCODE = '55000',
      HINT = 'CREATE EXTENSION dblink (as a superuser), then add the pooler again';
  END IF;
  IF name IS NULL OR name !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
    RAISE EXCEPTION 'invalid pooler name %', coalesce(quote_literal(name), 'NULL') USING ERRCODE = '22023',
      HINT = 'letters, digits, _ . and -, starting with a letter or digit, at most 63 characters';
  END IF;
  IF ci IS NULL OR btrim(ci) = '' THEN
    RAISE EXCEPTION 'conninfo must not be empty' USING ERRCODE = '22023',
      HINT = 'a libpq connection string such as ''host=/var/run/postgresql port=6432 dbname=pgbouncer user=pgbouncer'', or the name of a dblink foreign server';
  END IF;
  IF ci ~* '(^|\s)password\s*=' OR ci ~* '^postgres(ql)?://[^/@]*:[^/@]*@' OR ci ~* '[?&]password=' THEN
    RAISE EXCEPTION 'conninfo must not hold a password' USING ERRCODE = '22023',
      HINT = 'poolers is readable by monitors: put the password in a dblink foreign server''s user mapping '
             '(CREATE SERVER ... FOREIGN DATA WRAPPER dblink_fdw; CREATE USER MAPPING ...) and pass the server''s name, '
             'or in the server''s ~/.pgpass';
  END IF;
  -- A connection string (not a foreign server's name) gets a connect
  -- timeout, so that on PostgreSQL 15 (where dblink cannot be interrupted
  -- while it connects) an unreachable pooler holds the tick at most that long.
  IF ci ~* 'connect_timeout' AND ci !~* 'connect_timeout\s*=\s*''?([1-9]|10)''?(\s|&|$)' THEN
    RAISE EXCEPTION 'connect_timeout must be from 1 to 10 seconds' USING ERRCODE = '22023',
      HINT = 'the tick waits that long for an unreachable pooler on PostgreSQL 15; leave it out for 2';
  END IF;
  IF ci !~* 'connect_timeout' AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_foreign_server s WHERE s.srvname = ci::name) THEN
    IF ci ~* '^postgres(ql)?://' THEN
      ci := ci || CASE WHEN ci ~ '\?' THEN '&' ELSE '?' END || 'connect_timeout=2';
    ELSIF ci ~ '=' THEN
      ci := ci || ' connect_timeout=2';
    END IF;
  END IF;
  INSERT INTO meshhook_limits.poolers AS p (name, conninfo, enabled)
  VALUES (add_pooler.name, ci, coalesce(enabled, true))
  ON CONFLICT ON CONSTRAINT poolers_pkey DO UPDATE SET conninfo = EXCLUDED.conninfo, enabled = EXCLUDED.enabled;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits.add_pooler(text, text, boolean) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.add_pooler(text, text, boolean) TO meshhook_limits_admin;

CREATE FUNCTION meshhook_limits.drop_pooler(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
DECLARE existed boolean;
BEGIN
  PERFORM meshhook_limits.require_admin_access('drop a pooler');
  DELETE FROM meshhook_limits.poolers p WHERE p.name = drop_pooler.name;
  existed := FOUND;
  DELETE FROM meshhook_limits.pooler_samples s WHERE s.pooler = drop_pooler.name;
  DELETE FROM meshhook_limits.pooler_pool_samples s WHERE s.pooler = drop_pooler.name;
  RETURN existed;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits.drop_pooler(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.drop_pooler(text) TO meshhook_limits_admin;

-- Pool sizing of one pooler: off, dry_run or on, within [min_pool_size,
-- max_pool_size], one change at most per resize_every. Arguments left NULL
-- keep their value.
CREATE FUNCTION meshhook_limits.set_pooler_sizing(name text, mode text, min_pool_size int DEFAULT NULL,
                                                  max_pool_size int DEFAULT NULL, resize_every interval DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  PERFORM meshhook_limits.require_admin_access('set pool sizing');
  IF mode IS NULL OR mode NOT IN ('off', 'dry_run', 'on') THEN
    RAISE EXCEPTION 'invalid sizing mode %', coalesce(quote_literal(mode), 'NULL') USING ERRCODE = '22023',
      HINT = 'off, dry_run (record what it would do) or on (apply it)';
  END IF;
  BEGIN
    UPDATE meshhook_limits.poolers p
       SET sizing = mode,
           min_pool_size = coalesce(set_pooler_sizing.min_pool_size, p.min_pool_size),
           max_pool_size = coalesce(set_pooler_sizing.max_pool_size, p.max_pool_size),
           resize_every = coalesce(set_pooler_sizing.resize_every, p.resize_every)
     WHERE p.name = set_pooler_sizing.name;
  EXCEPTION WHEN check_violation THEN
    RAISE EXCEPTION 'invalid pool sizing bounds' USING ERRCODE = '22023',
      HINT = 'min_pool_size >= 1, max_pool_size >= min_pool_size and at most 100000, resize_every from 1 second to 1 day';
  END;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'no pooler named %', quote_literal(name) USING ERRCODE = '42704',
      HINT = 'add it first with meshhook_limits.add_pooler(name, conninfo)';
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits.set_pooler_sizing(text, text, int, int, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.set_pooler_sizing(text, text, int, int, interval) TO meshhook_limits_admin;

-- Per pooler and pool, from the latest sample: clients, servers, pool size
-- and use, the longest wait, status (ok, warning, critical against
-- pooler_wait_warning/critical; down when the pooler did not answer), and
-- the pooler's transaction and query rates and average wait since the
-- sample before. Monitors only (others get no rows).
CREATE FUNCTION meshhook_limits.pooler_health()
RETURNS TABLE(pooler text, database text, user_name text, status text, clients_active int, clients_waiting int,
              servers_active int, servers_idle int, servers_used int, pool_size int, utilisation numeric,
              maxwait_seconds numeric, pool_mode text, transactions_per_second numeric, queries_per_second numeric,
              avg_wait_seconds numeric, sampled_at timestamptz, error text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._require_monitor('read pooler health');
  RETURN QUERY
  WITH l AS (SELECT * FROM meshhook_limits._latest_pooler_samples() WHERE meshhook_limits.can_monitor()),
  r AS (
    SELECT l.pooler, l.sampled_at, e.seconds,
           (l.xact_count - b.xact_count) / e.seconds AS tps, (l.query_count - b.query_count) / e.seconds AS qps
      FROM l
      CROSS JOIN LATERAL (SELECT s.* FROM meshhook_limits.pooler_samples s
                           WHERE s.pooler = l.pooler AND s.up AND s.sampled_at < l.sampled_at
                           ORDER BY s.sampled_at DESC LIMIT 1) b
      CROSS JOIN LATERAL (SELECT extract(epoch FROM l.sampled_at - b.sampled_at) AS seconds) e
     WHERE l.up AND e.seconds > 0 AND l.xact_count >= b.xact_count)
  SELECT l.pooler, x.database, x.user_name, CASE WHEN l.up THEN coalesce(x.status, 'ok') ELSE 'down' END,
         x.clients_active, x.clients_waiting, x.servers_active, x.servers_idle, x.servers_used, x.pool_size,
         round((x.servers_active + x.servers_used + x.servers_idle + x.servers_tested + x.servers_login)::numeric
               / nullif(x.pool_size, 0), 4),
         x.maxwait_seconds, x.pool_mode, round(r.tps, 3), round(r.qps, 3),
         round(l.avg_wait_us / 1000000.0, 6), l.sampled_at, l.error
    FROM l
    LEFT JOIN meshhook_limits.pooler_pool_samples x ON x.pooler = l.pooler AND x.sampled_at = l.sampled_at
    LEFT JOIN r ON r.pooler = l.pooler
   ORDER BY l.pooler, x.database, x.user_name;
END
$$;

-- What sizing would do now for each pooler (whether or not it is on).
CREATE FUNCTION meshhook_limits.pooler_recommendation()
RETURNS TABLE(pooler text, sizing text, current_size int, recommended_size int, min_pool_size int, max_pool_size int,
              server_cap int, pools int, reasoning text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._require_monitor('read pooler recommendations');
  RETURN QUERY
  SELECT p.name, p.sizing, a.current_size, a.recommended_size, p.min_pool_size, p.max_pool_size, a.server_cap, a.pools, a.reason
    FROM meshhook_limits.poolers p
    CROSS JOIN LATERAL meshhook_limits._pooler_size_advice(p, pg_catalog.now()) a
   WHERE meshhook_limits.can_monitor()
   ORDER BY p.name;
END
$$;

-- Alert metrics of the poolers, and two built-in rules on them.
ALTER TABLE meshhook_limits.alert_rules DROP CONSTRAINT alert_rules_metric_check;
ALTER TABLE meshhook_limits.alert_rules ADD CONSTRAINT alert_rules_metric_check CHECK (metric IN ('queue.queued', 'queue.oldest_age_seconds', 'queue.error_rate',
      'queue.failed_recent', 'pool.utilisation', 'pool.idle_in_transaction', 'pool.waiting', 'tenant.usage_ratio',
      'pooler.up', 'pooler.clients_waiting', 'pooler.maxwait_seconds', 'pooler.utilisation'));
ALTER TABLE meshhook_limits.builtin_alert_rules DROP CONSTRAINT alert_rules_metric_check;
ALTER TABLE meshhook_limits.builtin_alert_rules ADD CONSTRAINT alert_rules_metric_check CHECK (metric IN ('queue.queued', 'queue.oldest_age_seconds', 'queue.error_rate',
      'queue.failed_recent', 'pool.utilisation', 'pool.idle_in_transaction', 'pool.waiting', 'tenant.usage_ratio',
      'pooler.up', 'pooler.clients_waiting', 'pooler.maxwait_seconds', 'pooler.utilisation'));
INSERT INTO meshhook_limits.builtin_alert_rules (name, metric, threshold, resolve_threshold, for_duration, severity, description) VALUES
  ('pooler_wait', 'pooler.maxwait_seconds', 1, 0.2, '30 seconds', 'warning',
   'a client has waited more than 1 s for a server connection in a PgBouncer pool'),
  ('pooler_saturation', 'pooler.clients_waiting', 4, 0, '1 minute', 'critical',
   'more than 4 clients kept waiting for a server connection in a PgBouncer pool');

CREATE OR REPLACE FUNCTION meshhook_limits._series(p_metric text)
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
  ELSIF p_metric = 'pooler.up' THEN
    RETURN QUERY
      SELECT 'pooler:' || l.pooler, jsonb_build_object('pooler', l.pooler), NULL::uuid, l.up::int::numeric
        FROM meshhook_limits._latest_pooler_samples() l;
  ELSIF p_metric LIKE 'pooler.%' THEN
    RETURN QUERY
      SELECT 'pooler:' || x.pooler || ':' || x.database || ':' || x.user_name,
             jsonb_build_object('pooler', x.pooler, 'database', x.database, 'user', x.user_name), NULL::uuid,
             CASE p_metric WHEN 'pooler.clients_waiting' THEN x.clients_waiting::numeric
                           WHEN 'pooler.maxwait_seconds' THEN x.maxwait_seconds
                           ELSE round((x.servers_active + x.servers_idle + x.servers_used + x.servers_tested
                                       + x.servers_login)::numeric / nullif(x.pool_size, 0), 4) END
        FROM meshhook_limits._latest_pooler_samples() l
        JOIN meshhook_limits.pooler_pool_samples x ON x.pooler = l.pooler AND x.sampled_at = l.sampled_at
       WHERE l.up;
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

CREATE OR REPLACE FUNCTION meshhook_limits.set_alert_rule(name text, metric text DEFAULT NULL, threshold numeric DEFAULT NULL,
    comparison text DEFAULT NULL, for_duration interval DEFAULT NULL, severity text DEFAULT NULL,
    labels jsonb DEFAULT NULL, resolve_threshold numeric DEFAULT NULL, enabled boolean DEFAULT NULL,
    description text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  -- The metrics of alert_rules' CHECK, named in messages of their own.
  known_metrics constant text[] := ARRAY['queue.queued', 'queue.oldest_age_seconds', 'queue.error_rate',
    'queue.failed_recent', 'pool.utilisation', 'pool.idle_in_transaction', 'pool.waiting', 'tenant.usage_ratio',
    'pooler.up', 'pooler.clients_waiting', 'pooler.maxwait_seconds', 'pooler.utilisation'];
  r record;
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage alert rules');
  IF set_alert_rule.name IS NULL THEN
    RAISE EXCEPTION 'name must not be NULL' USING ERRCODE = '22023', HINT = 'name the rule to create or change';
  END IF;
  SELECT e.metric, e.comparison, e.threshold, e.resolve_threshold, e.for_duration, e.severity, e.labels, e.enabled,
         e.description
    INTO r FROM meshhook_limits.effective_alert_rules e WHERE e.name = set_alert_rule.name;
  IF NOT FOUND AND (set_alert_rule.metric IS NULL OR set_alert_rule.threshold IS NULL) THEN
    RAISE EXCEPTION 'alert rule % does not exist: a new rule needs a metric and a threshold',
      quote_literal(left(set_alert_rule.name, 80)) USING ERRCODE = '22023',
      HINT = 'set_alert_rule(name, metric, threshold, ...); metric is one of ' || array_to_string(known_metrics, ', ');
  END IF;
  r.metric := coalesce(set_alert_rule.metric, r.metric);
  r.comparison := coalesce(set_alert_rule.comparison, r.comparison, '>');
  r.threshold := coalesce(set_alert_rule.threshold, r.threshold);
  r.resolve_threshold := coalesce(set_alert_rule.resolve_threshold, r.resolve_threshold);
  r.for_duration := coalesce(set_alert_rule.for_duration, r.for_duration, interval '0');
  r.severity := coalesce(set_alert_rule.severity, r.severity, 'warning');
  r.labels := coalesce(set_alert_rule.labels, r.labels, '{}');
  r.enabled := coalesce(set_alert_rule.enabled, r.enabled, true);
  r.description := coalesce(set_alert_rule.description, r.description);
  IF NOT r.metric = ANY (known_metrics) THEN
    RAISE EXCEPTION 'unknown alert metric %', quote_literal(r.metric) USING ERRCODE = '22023',
      HINT = 'metric is one of ' || array_to_string(known_metrics, ', ');
  END IF;
  IF r.threshold = 'NaN' OR abs(r.threshold) > 1e18 THEN
    RAISE EXCEPTION 'threshold must be a number between -1e18 and 1e18' USING ERRCODE = '22023';
  END IF;
  IF r.resolve_threshold = 'NaN' OR abs(r.resolve_threshold) > 1e18 THEN
    RAISE EXCEPTION 'resolve_threshold must be NULL or a number between -1e18 and 1e18' USING ERRCODE = '22023';
  END IF;
  BEGIN
    INSERT INTO meshhook_limits.alert_rules AS a (name, metric, comparison, threshold, resolve_threshold,
        for_duration, severity, labels, enabled, description)
    VALUES (set_alert_rule.name, r.metric, r.comparison, r.threshold, r.resolve_threshold, r.for_duration,
            r.severity, r.labels, r.enabled, r.description)
    ON CONFLICT (name) DO UPDATE SET metric = EXCLUDED.metric, comparison = EXCLUDED.comparison,
      threshold = EXCLUDED.threshold, resolve_threshold = EXCLUDED.resolve_threshold,
      for_duration = EXCLUDED.for_duration, severity = EXCLUDED.severity, labels = EXCLUDED.labels,
      enabled = EXCLUDED.enabled, description = EXCLUDED.description;
  EXCEPTION WHEN check_violation OR not_null_violation THEN
    RAISE EXCEPTION 'invalid alert rule: %', SQLERRM USING ERRCODE = '22023',
      HINT = 'metric is one of ' || array_to_string(known_metrics, ', ') || '; comparison one of > >= < <=; '
             'severity info, warning or critical; for_duration >= 0';
  END;
END
$$;

-- metrics(): the pooler series.
CREATE OR REPLACE FUNCTION meshhook_limits._metrics_rows(p_tenant_labels boolean, p_max int, p_busiest text[])
RETURNS TABLE(name text, labels jsonb, value float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH
  tenants AS (
    SELECT x AS tenant_id
      FROM unnest(CASE WHEN p_tenant_labels
                       THEN meshhook_limits._active_tenants(GREATEST(p_max, 0), p_busiest::uuid[])
                       ELSE '{}'::uuid[] END) x),
  used AS (SELECT * FROM meshhook_limits._usage_ratios(ARRAY(SELECT tenant_id FROM tenants))),
  q AS (SELECT * FROM meshhook_limits._latest_queue_samples()),
  p AS (SELECT * FROM meshhook_limits.pool_samples ORDER BY sampled_at DESC LIMIT 1),
  pl AS (SELECT * FROM meshhook_limits._latest_pooler_samples()),
  pp AS (SELECT x.*, jsonb_build_object('pooler', x.pooler, 'database', x.database, 'user', x.user_name) AS l
           FROM meshhook_limits.pooler_pool_samples x JOIN pl ON pl.pooler = x.pooler AND pl.sampled_at = x.sampled_at
          WHERE pl.up)
  -- Tenants
  SELECT 'meshhook_limits_tenant_limit', jsonb_build_object('tenant_id', u.tenant_id, 'resource', u.resource),
         u.limit_value::float8 FROM used u
  UNION ALL
  SELECT 'meshhook_limits_tenant_usage_ratio', jsonb_build_object('tenant_id', u.tenant_id, 'resource', u.resource),
         (u.used / u.limit_value)::float8
    FROM used u WHERE u.used IS NOT NULL AND u.limit_value > 0
  UNION ALL
  SELECT 'meshhook_limits_tenant_storage_bytes', jsonb_build_object('tenant_id', s.tenant_id), s.bytes::float8
    FROM meshhook_limits.storage_totals s JOIN tenants t ON t.tenant_id = s.tenant_id
  -- Queues
  UNION ALL SELECT 'meshhook_limits_queue_queued', jsonb_build_object('source', q.source, 'queue', q.queue), q.queued FROM q
  UNION ALL SELECT 'meshhook_limits_queue_active', jsonb_build_object('source', q.source, 'queue', q.queue), q.active FROM q
  UNION ALL SELECT 'meshhook_limits_queue_failed_recent', jsonb_build_object('source', q.source, 'queue', q.queue), q.failed_recent FROM q
  UNION ALL SELECT 'meshhook_limits_queue_oldest_age_seconds', jsonb_build_object('source', q.source, 'queue', q.queue),
                   coalesce(extract(epoch FROM q.oldest_age), 0)::float8 FROM q
  UNION ALL SELECT 'meshhook_limits_queue_processing_p50_seconds', jsonb_build_object('source', q.source, 'queue', q.queue),
                   (q.p50_ms / 1000)::float8 FROM q WHERE q.p50_ms IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_queue_processing_p95_seconds', jsonb_build_object('source', q.source, 'queue', q.queue),
                   (q.p95_ms / 1000)::float8 FROM q WHERE q.p95_ms IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_queue_throughput_per_second', jsonb_build_object('source', q.source, 'queue', q.queue),
                   (q.throughput_per_min / 60)::float8 FROM q
  UNION ALL SELECT 'meshhook_limits_queue_error_ratio', jsonb_build_object('source', q.source, 'queue', q.queue),
                   q.error_rate::float8 FROM q WHERE q.error_rate IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_queue_status', jsonb_build_object('source', q.source, 'queue', q.queue, 'status', s.st),
                   (q.status = s.st)::int::float8 FROM q, unnest(ARRAY['ok', 'warning', 'critical']) s(st)
  UNION ALL SELECT 'meshhook_limits_queue_sampled_timestamp_seconds', '{}'::jsonb,
                   extract(epoch FROM max(q.sampled_at))::float8 FROM q HAVING count(*) > 0
  -- Pool
  UNION ALL SELECT 'meshhook_limits_pool_max_connections', '{}'::jsonb, p.max_connections FROM p
  UNION ALL SELECT 'meshhook_limits_pool_connections', jsonb_build_object('state', s.k), s.v
              FROM p, LATERAL (VALUES ('active', p.active), ('idle', p.idle),
                                      ('idle_in_transaction', p.idle_in_transaction), ('waiting', p.waiting),
                                      ('total', p.total)) s(k, v)
  UNION ALL SELECT 'meshhook_limits_pool_utilisation_ratio', '{}'::jsonb, p.utilisation::float8 FROM p
  UNION ALL SELECT 'meshhook_limits_pool_longest_transaction_seconds', '{}'::jsonb,
                   coalesce(extract(epoch FROM p.longest_transaction), 0)::float8 FROM p
  UNION ALL SELECT 'meshhook_limits_pool_status', jsonb_build_object('status', s.st), (p.status = s.st)::int::float8
              FROM p, unnest(ARRAY['ok', 'warning', 'critical']) s(st)
  UNION ALL SELECT 'meshhook_limits_pool_connections_by_application', jsonb_build_object('application', a.key),
                   a.value::text::float8 FROM p, jsonb_each(p.by_application) a
  UNION ALL SELECT 'meshhook_limits_pool_connections_by_role', jsonb_build_object('role', r.key),
                   r.value::text::float8 FROM p, jsonb_each(p.by_role) r
  -- PgBouncer
  UNION ALL SELECT 'meshhook_limits_pooler_up', jsonb_build_object('pooler', pl.pooler), pl.up::int::float8 FROM pl
  UNION ALL SELECT 'meshhook_limits_pooler_sampled_timestamp_seconds', jsonb_build_object('pooler', pl.pooler),
                   extract(epoch FROM pl.sampled_at)::float8 FROM pl
  UNION ALL SELECT 'meshhook_limits_pooler_default_pool_size', jsonb_build_object('pooler', pl.pooler),
                   pl.default_pool_size FROM pl WHERE pl.up AND pl.default_pool_size IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_transactions_total', jsonb_build_object('pooler', pl.pooler),
                   pl.xact_count FROM pl WHERE pl.up AND pl.xact_count IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_queries_total', jsonb_build_object('pooler', pl.pooler),
                   pl.query_count FROM pl WHERE pl.up AND pl.query_count IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_client_wait_seconds_total', jsonb_build_object('pooler', pl.pooler),
                   pl.wait_time_us / 1e6 FROM pl WHERE pl.up AND pl.wait_time_us IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_avg_wait_seconds', jsonb_build_object('pooler', pl.pooler),
                   pl.avg_wait_us / 1e6 FROM pl WHERE pl.up AND pl.avg_wait_us IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_clients_active', pp.l, pp.clients_active FROM pp
  UNION ALL SELECT 'meshhook_limits_pooler_clients_waiting', pp.l, pp.clients_waiting FROM pp
  UNION ALL SELECT 'meshhook_limits_pooler_maxwait_seconds', pp.l, pp.maxwait_seconds::float8 FROM pp
  UNION ALL SELECT 'meshhook_limits_pooler_server_connections', pp.l || jsonb_build_object('state', s.k), s.v
              FROM pp, LATERAL (VALUES ('active', pp.servers_active), ('idle', pp.servers_idle), ('used', pp.servers_used),
                                       ('tested', pp.servers_tested), ('login', pp.servers_login)) s(k, v)
  UNION ALL SELECT 'meshhook_limits_pooler_pool_size', pp.l, pp.pool_size FROM pp WHERE pp.pool_size IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_utilisation_ratio', pp.l,
                   ((pp.servers_active + pp.servers_idle + pp.servers_used + pp.servers_tested + pp.servers_login)::numeric
                    / pp.pool_size)::float8 FROM pp WHERE pp.pool_size > 0
  -- Alerts: every rule appears, with 0 when it has no series in that state.
  UNION ALL SELECT 'meshhook_limits_alerts', jsonb_build_object('rule', r.name, 'severity', r.severity, 'state', s.st),
                   (SELECT count(*) FROM meshhook_limits.alert_states a WHERE a.rule = r.name AND a.state = s.st)::float8
              FROM meshhook_limits.effective_alert_rules r, unnest(ARRAY['pending', 'firing']) s(st)
             WHERE r.enabled
  -- Worker
  UNION ALL SELECT 'meshhook_limits_worker_ticks_total', '{}'::jsonb, w.ticks::float8 FROM meshhook_limits.worker_state w
  UNION ALL SELECT 'meshhook_limits_worker_errors_total', '{}'::jsonb, w.errors::float8 FROM meshhook_limits.worker_state w
  UNION ALL SELECT 'meshhook_limits_worker_last_tick_duration_seconds', '{}'::jsonb, (w.last_tick_ms / 1000)::float8
              FROM meshhook_limits.worker_state w WHERE w.last_tick IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_worker_last_tick_timestamp_seconds', '{}'::jsonb, extract(epoch FROM w.last_tick)::float8
              FROM meshhook_limits.worker_state w WHERE w.last_tick IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_worker_queue_scan_duration_seconds', '{}'::jsonb, (w.queue_stats_ms / 1000)::float8
              FROM meshhook_limits.worker_state w WHERE w.queue_stats_at IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_worker_queue_scan_timestamp_seconds', '{}'::jsonb, extract(epoch FROM w.queue_stats_at)::float8
              FROM meshhook_limits.worker_state w WHERE w.queue_stats_at IS NOT NULL
$$;

-- Undoing what set_alert_rule and set_queue_thresholds did (issue 22).
-- Undo what set_alert_rule did. drop_alert_rule removes a rule of the
-- user's own (a built-in one is switched off with enabled => false);
-- reset_alert_rule puts a built-in rule back as shipped. True when a row
-- went; the rule's pending and firing series stop quietly at the next tick.
CREATE FUNCTION meshhook_limits.drop_alert_rule(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage alert rules');
  IF EXISTS (SELECT 1 FROM meshhook_limits.builtin_alert_rules b WHERE b.name = drop_alert_rule.name) THEN
    RAISE EXCEPTION 'alert rule % is built in and cannot be dropped', quote_literal(name) USING ERRCODE = '22023',
      HINT = 'switch it off with set_alert_rule(name, enabled => false), '
             'or undo your changes to it with reset_alert_rule(name)';
  END IF;
  DELETE FROM meshhook_limits.alert_rules r WHERE r.name = drop_alert_rule.name;
  RETURN FOUND;
END
$$;

CREATE FUNCTION meshhook_limits.reset_alert_rule(name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_variable
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage alert rules');
  IF NOT EXISTS (SELECT 1 FROM meshhook_limits.builtin_alert_rules b WHERE b.name = reset_alert_rule.name) THEN
    RAISE EXCEPTION 'no built-in alert rule %', coalesce(quote_literal(name), 'NULL') USING ERRCODE = '42704',
      HINT = 'built-in rules: ' || (SELECT string_agg(b.name, ', ' ORDER BY b.name) FROM meshhook_limits.builtin_alert_rules b)
             || '; remove a rule of your own with drop_alert_rule(name)';
  END IF;
  DELETE FROM meshhook_limits.alert_rules r WHERE r.name = reset_alert_rule.name;
  RETURN FOUND;
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

-- apply_session_limits warns outside a transaction block (issue 22).
CREATE FUNCTION meshhook_limits."_in_transaction_block"() RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_in_transaction_block_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._in_transaction_block() FROM PUBLIC;

-- No restart grace in a database whose extension is newer than the server's
-- start (issue 22). Called by a fresh install only: a database upgraded here
-- had the extension before, and its slots may predate the start.
CREATE FUNCTION meshhook_limits."_extension_created"() RETURNS void
STRICT VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_extension_created_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._extension_created() FROM PUBLIC;

-- Readers of health and pressure refuse non-monitors with 42501 instead of
-- answering no rows (issue 22).
CREATE FUNCTION meshhook_limits."_require_monitor"(
	"what" TEXT /* meshhook_limits::row::Utf8 */
) RETURNS void
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_require_monitor_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._require_monitor(text) FROM PUBLIC;

-- The tick says a skipped pgmq queue once per process, queue and cause (issue 22).
CREATE FUNCTION meshhook_limits."_queue_skip_is_new"(
	"queue_key" TEXT, /* &str */
	"sqlstate" TEXT /* &str */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_queue_skip_is_new_wrapper';
CREATE FUNCTION meshhook_limits."_queue_read"(
	"queue_key" TEXT /* &str */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_queue_read_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_skip_is_new(text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_read(text) FROM PUBLIC;
CREATE OR REPLACE FUNCTION meshhook_limits._sample_pgmq(p_at timestamptz, p_window interval, p_full boolean DEFAULT true)
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
CREATE OR REPLACE FUNCTION meshhook_limits.set_queue_thresholds(source text DEFAULT '*', queue text DEFAULT NULL,
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
CREATE OR REPLACE FUNCTION meshhook_limits.queue_health()
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
CREATE OR REPLACE FUNCTION meshhook_limits.pool_pressure()
RETURNS TABLE(max_connections int, total int, active int, idle int, idle_in_transaction int, waiting int,
              utilisation numeric, longest_transaction interval, status text, sampled_at timestamptz,
              by_application jsonb, by_role jsonb)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._require_monitor('read pool pressure');
  RETURN QUERY
  SELECT p.max_connections, p.total, p.active, p.idle, p.idle_in_transaction, p.waiting, p.utilisation,
         p.longest_transaction, p.status, p.sampled_at, p.by_application, p.by_role
    FROM meshhook_limits.pool_samples p
   WHERE meshhook_limits.can_monitor()
   ORDER BY p.sampled_at DESC LIMIT 1;
END
$$;
CREATE OR REPLACE FUNCTION meshhook_limits.pool_recommendation(lookback interval DEFAULT '1 hour')
RETURNS TABLE(recommended_pool_size int, observed_p95_active numeric, observed_max_total int,
              usable_connections int, samples bigint, reasoning text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._require_monitor('read pool recommendations');
  RETURN QUERY
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
    FROM s WHERE s.n > 0;
END
$$;
CREATE OR REPLACE FUNCTION meshhook_limits.apply_session_limits(tenant_id uuid)
RETURNS TABLE(setting text, value text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE r record;
BEGIN
  PERFORM meshhook_limits.require_tenant_access(apply_session_limits.tenant_id);
  IF NOT meshhook_limits._in_transaction_block() THEN
    RAISE WARNING 'apply_session_limits outside a transaction block: its settings end with this statement'
      USING ERRCODE = '25P01',
            HINT = 'call it after BEGIN, in the transaction the limits are for (PostgREST runs each request in one)';
  END IF;
  FOR r IN SELECT * FROM meshhook_limits._resolve(apply_session_limits.tenant_id, NULL) e
            WHERE e.resource IN ('execution_seconds', 'work_mem_bytes', 'temp_file_bytes') ORDER BY 1 LOOP
    setting := CASE r.resource WHEN 'execution_seconds' THEN 'statement_timeout'
                               WHEN 'work_mem_bytes' THEN 'work_mem' ELSE 'temp_file_limit' END;
    value := CASE r.resource
               WHEN 'execution_seconds' THEN GREATEST(1, LEAST(r.limit_value * 1000, 2147483647))::bigint || 'ms'
               WHEN 'work_mem_bytes' THEN GREATEST(64, LEAST(r.limit_value / 1024, 2147483647))::bigint || 'kB'
               -- temp_file_limit is a superuser setting: only ever lowered here.
               ELSE LEAST(r.limit_value / 1024, 2147483647,
                          coalesce(nullif((SELECT s.setting::numeric FROM pg_catalog.pg_settings s
                                            WHERE s.name = 'temp_file_limit'), -1), 'Infinity'))::bigint || 'kB' END;
    PERFORM pg_catalog.set_config(setting, value, true);
    RETURN NEXT;
  END LOOP;
END
$$;


-- What each public function and table is for (sql/comments.sql, whole).
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
