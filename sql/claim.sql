-- meshhook_limits: claiming jobs from pg-boss and pgmq with their slots, fairly.
--
-- bind_queue says where a queue's jobs name their tenant, project,
-- concurrency key and cost, and adds an index on the queue table that
-- orders each tenant's waiting jobs as the queue's own fetch does.
-- claim_jobs walks that index one tenant at a time (a skip scan: its cost
-- follows the tenants with waiting jobs, not the backlog), serves the tenant
-- furthest below its fair_share_weight's share of claimed cost first
-- (start-time fair queuing, src/slots/fair.rs), takes each job's
-- slot (_claim_slot: tenant, project, key and total limits at once) and
-- marks the job taken exactly as boss.fetch() or pgmq.read() would. Jobs
-- whose limits have no room are not touched. The slot's run id is
-- claim/<binding id>/<job id>[/<read_ct>]; a trigger on the queue table
-- ends it in the transaction that ends the job (_claim_ended), and the
-- tick ends what no trigger sees (_end_claims). docs/claiming.md has the
-- algorithm and its bounds.

--
-- The files: claim_bindings.sql (the tables, path and key expressions, the
-- claim indexes), claim_bind.sql (bind_queue, unbind_queue, the
-- sender-tenant trigger), this file (the statements claim_jobs runs, the
-- tick's ending of claimed jobs, the rebuild after a restart), and
-- claim_explain.sql (explain_admission, explain_queues).

-- The statements claim_jobs (src/claim/mod.rs) runs for a binding, built once
-- per backend and binding and kept as prepared plans:
--   tenants: a skip scan over the _due index, one index probe per tenant
--            with waiting jobs, in chunks ($1 text: the tenants after this
--            one, '' from the first; $2 integer: at most so many): (tenant
--            text, when its first job is due, whether that is now); and,
--            in the first chunk, a row with a NULL tenant when jobs name no
--            tenant;
--   head:    a tenant's next job in the queue's own order, locked,
--            skipping the jobs this call passed over or claimed ($1 tenant
--            text, $2 text[] job ids): (id, data, project, key, cost, gen,
--            queued at, whether its queue's policy allows one active job per
--            key, retry count);
--   take:    what the queue's own fetch does to the jobs it takes, for the
--            call's claimed jobs at once (a job of a one-active policy at
--            once, so the next head sees it active) ($1 text[] job ids;
--            pgmq: $2 the visibility timeout);
--   due:     the first $1 jobs due (integer), from the queue's own index
--            on when jobs are due, grouped by tenant: (tenant text, when
--            its first job is due, how many of the jobs read are its); NULL
--            when the queue has no such index. A new pass reads these
--            instead of scanning when few jobs are due (src/claim/queue.rs).
-- Every path expression is spelt as in the index (_path_sql), so the planner
-- uses it.
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

-- The tick's part: end the slots of claimed jobs that have ended, and keep
-- the others' leases. pg-boss: the job is no longer active, or was fetched
-- again after the claim (completed, failed, cancelled, expired by pg-boss's
-- maintenance, retried, deleted). pgmq: the message is gone (archived,
-- deleted), visible again (vt passed: the worker crashed or overran) or read
-- again. The queue tables are read as their owner (_read_as_owner).
CREATE FUNCTION meshhook_limits._end_claims() RETURNS integer
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
REVOKE EXECUTE ON FUNCTION meshhook_limits._end_claims() FROM PUBLIC;

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
