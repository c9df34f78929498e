-- meshhook_limits: Usage metering: counters per tenant, resource, project and window, the
-- status they are in (ok, warning, exceeded), and usage against limits for
-- many tenants at once (metrics and alerts).
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

-- Metered usage: one row per tenant, resource, project (the nil uuid is the
-- tenant's total) and window.
CREATE TABLE meshhook_limits.usage_counters (
  tenant_id uuid NOT NULL,
  resource text NOT NULL,
  project_id uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
  window_start timestamptz NOT NULL,
  used numeric NOT NULL DEFAULT 0,
  status text NOT NULL DEFAULT 'ok' CHECK (status IN ('ok', 'warning', 'exceeded')),
  prev_status text NOT NULL DEFAULT 'ok',
  updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (tenant_id, resource, project_id, window_start)
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.usage_counters', '');
ALTER TABLE meshhook_limits.usage_counters ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.usage_counters FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.usage_counters FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
GRANT SELECT ON meshhook_limits.usage_counters TO PUBLIC;

-- The start of the window of length `win` that `at` falls in: windows are
-- aligned to the Unix epoch, so every meter of one length rolls over at once.
-- No SET clause, so that the planner inlines it (names are qualified).
CREATE FUNCTION meshhook_limits._window_start(win interval, at timestamptz DEFAULT pg_catalog.now())
RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT pg_catalog.to_timestamp(pg_catalog.floor(extract(epoch FROM at) / extract(epoch FROM win))
                                 * extract(epoch FROM win))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._window_start(interval, timestamptz) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._status(p_used numeric, p_limit numeric, p_warn numeric)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN p_limit IS NULL THEN 'ok'
              WHEN p_used > p_limit THEN 'exceeded'
              WHEN p_used >= p_limit * p_warn THEN 'warning'
              ELSE 'ok' END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._status(numeric, numeric, numeric) FROM PUBLIC;

-- Add to one meter row (a gauge replaces its value) and announce a change of
-- status: edge-triggered, one event per transition.
CREATE FUNCTION meshhook_limits._meter(p_tenant uuid, p_resource text, p_project uuid, p_window timestamptz,
    p_amount numeric, p_gauge boolean, p_limit numeric, p_warn numeric, p_extra jsonb,
    OUT used numeric, OUT status text)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE prev text;
BEGIN
  INSERT INTO meshhook_limits.usage_counters AS u (tenant_id, resource, project_id, window_start, used, status, prev_status)
  VALUES (p_tenant, p_resource, p_project, p_window, p_amount, meshhook_limits._status(p_amount, p_limit, p_warn), 'ok')
  ON CONFLICT (tenant_id, resource, project_id, window_start) DO UPDATE
    SET used = CASE WHEN p_gauge THEN EXCLUDED.used ELSE u.used + EXCLUDED.used END,
        status = meshhook_limits._status(CASE WHEN p_gauge THEN EXCLUDED.used ELSE u.used + EXCLUDED.used END,
                                         p_limit, p_warn),
        prev_status = u.status, updated_at = pg_catalog.now()
  RETURNING u.used, u.status, u.prev_status INTO used, status, prev;
  IF status <> prev THEN
    PERFORM meshhook_limits._emit(CASE status WHEN 'ok' THEN 'limit.recovered' WHEN 'warning' THEN 'limit.warning'
                                              ELSE 'limit.exceeded' END,
                                  p_tenant, p_resource, used, p_limit, p_extra);
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._meter(uuid, text, uuid, timestamptz, numeric, boolean, numeric, numeric, jsonb) FROM PUBLIC;

CREATE FUNCTION meshhook_limits.record_usage(tenant_id uuid, resource text, amount numeric,
                                             project_id uuid DEFAULT NULL)
RETURNS TABLE(status text, used numeric, limit_value numeric, window_start timestamptz)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  t uuid := record_usage.tenant_id;
  r text := record_usage.resource;
  gauge boolean;
  eff record;
  proj record;
  win interval;
  ws timestamptz;
  nil uuid := '00000000-0000-0000-0000-000000000000';
  row_t record;
  row_p record;
  rank_t int;
  rank_p int;
BEGIN
  PERFORM meshhook_limits.require_tenant_access(t);
  IF r IS NULL OR r !~ '^[a-z][a-z0-9_.-]{0,62}$' THEN
    RAISE EXCEPTION 'invalid resource name %', coalesce(quote_literal(left(r, 80)), 'NULL')
      USING ERRCODE = '22023',
            HINT = 'resource names are 1-63 characters of a-z, 0-9, _, . and -, starting with a letter';
  END IF;
  IF amount IS NULL OR amount = 'NaN' OR amount < 0 OR amount > 1e18 OR (amount > 0 AND amount < 1e-9) THEN
    RAISE EXCEPTION 'amount must be 0 or a number between 1e-9 and 1e18, got %', coalesce(left(amount::text, 40), 'NULL')
      USING ERRCODE = '22023', HINT = 'usage only grows; report what was used, not a correction';
  END IF;
  IF r IN ('concurrent_executions', 'execution_seconds', 'requests_per_second') THEN
    RAISE EXCEPTION '% is not metered with record_usage', r USING ERRCODE = '22023',
      HINT = 'concurrent executions and execution time are enforced by the slot functions, request rates by check_rate_limit';
  END IF;
  gauge := r IN ('memory_bytes', 'storage_bytes');
  SELECT * INTO eff FROM meshhook_limits._resolve(t, NULL) e WHERE e.resource = r;
  IF record_usage.project_id IS NOT NULL THEN
    SELECT l.limit_value, l.warn_ratio INTO proj FROM meshhook_limits.limits l
     WHERE l.resource = r AND l.tenant_id = t AND l.project_id = record_usage.project_id;
  END IF;
  IF gauge THEN
    -- A gauge keeps one row (its latest reading); updated_at says when.
    ws := 'epoch'::timestamptz;
  ELSE
    win := coalesce(eff.window_length,
                    (SELECT min(l.window_length) FROM meshhook_limits.limits l WHERE l.resource = r));
    IF win IS NULL THEN
      RAISE EXCEPTION 'unknown resource "%"', r USING ERRCODE = '22023',
        HINT = 'define it first: meshhook_limits.set_limit(resource, limit_value, window_length => ''1 day'')';
    END IF;
    ws := meshhook_limits._window_start(win);
  END IF;

  -- At most 1000 projects per tenant, resource and window: random project
  -- ids cannot grow usage_counters without bound.
  IF record_usage.project_id IS NOT NULL
     AND NOT EXISTS (SELECT 1 FROM meshhook_limits.usage_counters u
                      WHERE u.tenant_id = t AND u.resource = r AND u.project_id = record_usage.project_id
                        AND u.window_start = ws)
     AND (SELECT count(*) FROM (SELECT 1 FROM meshhook_limits.usage_counters u
                                 WHERE u.tenant_id = t AND u.resource = r AND u.window_start = ws
                                 LIMIT 1001) x) > 1000 THEN
    RAISE EXCEPTION 'tenant already meters % in 1000 projects in this window', r
      USING ERRCODE = '53400', HINT = 'meter per project only for real projects; the tenant total needs no project_id';
  END IF;
  row_t := meshhook_limits._meter(t, r, nil, ws, amount, gauge, eff.limit_value, eff.warn_ratio, NULL);
  status := row_t.status; used := row_t.used; limit_value := eff.limit_value; window_start := ws;
  IF record_usage.project_id IS NOT NULL THEN
    row_p := meshhook_limits._meter(t, r, record_usage.project_id, ws, amount, gauge, proj.limit_value, proj.warn_ratio,
                                    jsonb_build_object('project_id', record_usage.project_id));
    rank_t := CASE row_t.status WHEN 'exceeded' THEN 2 WHEN 'warning' THEN 1 ELSE 0 END;
    rank_p := CASE row_p.status WHEN 'exceeded' THEN 2 WHEN 'warning' THEN 1 ELSE 0 END;
    IF rank_p > rank_t THEN
      status := row_p.status; used := row_p.used; limit_value := proj.limit_value;
    END IF;
  END IF;
  RETURN NEXT;
END
$$;

-- meshhook_limits._usage(tenant), further down, is built on _usage_ratios.

CREATE FUNCTION meshhook_limits.usage(tenant_id uuid)
RETURNS TABLE(resource text, used numeric, limit_value numeric, ratio numeric, status text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_tenant_read(usage.tenant_id);
  RETURN QUERY SELECT * FROM meshhook_limits._usage(usage.tenant_id);
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
REVOKE EXECUTE ON FUNCTION meshhook_limits._active_tenants(int, uuid[]) FROM PUBLIC;

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
                          AND u.window_start = meshhook_limits._window_start(e.window_length)), 0)
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
REVOKE EXECUTE ON FUNCTION meshhook_limits._usage_ratios(uuid[]) FROM PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._usage(uuid) FROM PUBLIC;
