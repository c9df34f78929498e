-- meshhook_limits: why a tenant's jobs are or are not claimed: explain_admission and
-- explain_queues (claiming as a whole: sql/claim.sql).

CREATE FUNCTION meshhook_limits.explain_admission(tenant_id uuid, project_id uuid DEFAULT NULL,
    concurrency_key text DEFAULT NULL)
RETURNS TABLE(resource text, scope text, limit_value numeric, in_use bigint, source text, blocking boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  u record;
  lim numeric;
  src text;
  ceiling numeric := current_setting('meshhook_limits.tenant_slot_ceiling')::numeric;
BEGIN
  PERFORM meshhook_limits.require_tenant_read(explain_admission.tenant_id);
  IF pg_catalog.octet_length(explain_admission.concurrency_key) NOT BETWEEN 1 AND 200 THEN
    RAISE EXCEPTION 'a concurrency key must be 1 to 200 bytes long' USING ERRCODE = '22023',
      HINT = 'pass the key as jobs name it, or NULL';
  END IF;
  SELECT * INTO u FROM meshhook_limits._slot_counts(explain_admission.tenant_id, explain_admission.project_id,
                                                    explain_admission.concurrency_key);
  SELECT r.limit_value, r.source INTO lim, src FROM meshhook_limits._resolve(explain_admission.tenant_id, NULL) r
   WHERE r.resource = 'concurrent_executions';
  IF lim IS NULL OR lim > ceiling THEN
    lim := ceiling; src := 'server';   -- meshhook_limits.tenant_slot_ceiling
  END IF;
  RETURN QUERY SELECT 'concurrent_executions', 'tenant', lim, u.tenant_in_use, src, u.tenant_in_use + 1 > lim;
  IF explain_admission.project_id IS NOT NULL THEN
    SELECT l.limit_value INTO lim FROM meshhook_limits.limits l
     WHERE l.resource = 'concurrent_executions' AND l.tenant_id = explain_admission.tenant_id
       AND l.project_id = explain_admission.project_id;
    RETURN QUERY SELECT 'concurrent_executions', 'project', lim, u.project_in_use,
                        CASE WHEN lim IS NOT NULL THEN 'project' END, coalesce(u.project_in_use + 1 > lim, false);
  END IF;
  IF explain_admission.concurrency_key IS NOT NULL THEN
    lim := NULL; src := NULL;
    SELECT r.limit_value, r.source INTO lim, src
      FROM meshhook_limits._resolve(explain_admission.tenant_id, explain_admission.project_id) r
     WHERE r.resource = 'concurrent_executions.' || explain_admission.concurrency_key;
    RETURN QUERY SELECT 'concurrent_executions.' || explain_admission.concurrency_key, 'key', lim, u.key_in_use,
                        src, coalesce(u.key_in_use + 1 > lim, false);
  END IF;
  SELECT l.limit_value INTO lim FROM meshhook_limits.limits l
   WHERE l.resource = 'concurrent_executions_total' AND l.tenant_id IS NULL AND l.plan IS NULL;
  -- Every tenant's running slots together: for monitors; a tenant learns
  -- only whether the total blocks it.
  RETURN QUERY SELECT 'concurrent_executions_total', 'total', lim,
                      CASE WHEN meshhook_limits.can_monitor() THEN u.total_in_use END,
                      CASE WHEN lim IS NOT NULL THEN 'global' END, coalesce(u.total_in_use + 1 > lim, false);
  lim := 1; src := 'default';
  SELECT r.limit_value, r.source INTO lim, src FROM meshhook_limits._resolve(explain_admission.tenant_id, NULL) r
   WHERE r.resource = 'fair_share_weight';
  RETURN QUERY SELECT 'fair_share_weight', 'tenant', coalesce(lim, 1), NULL::bigint, coalesce(src, 'default'), false;
END
$$;
COMMENT ON FUNCTION meshhook_limits.explain_admission(uuid, uuid, text) IS
  'Every limit a slot of this tenant (project, key) is admitted under, what is in use, where the limit comes from, and which blocks a job of cost 1 now.';

-- Per bound queue and tenant (however its jobs spell its id): what
-- claim_jobs would do with its waiting jobs now. waiting = deferred (not due
-- yet, or held by a pg-boss 12 flow's dependencies) + invalid (a project,
-- key or cost claim_jobs never accepts) + blocked (held back by a limit:
-- the tenant's, the total, or their concurrency key's) + runnable; running
-- = the cost of its claimed jobs. blocked_by names the limit. Admins and
-- monitors see every tenant; a tenant sees its own rows.
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

