-- meshhook_limits: Limits and plans: the extension's roles, the tables of limits, plans and
-- plan assignments with their row-level security, resolution (project →
-- tenant → plan → global) and the admin functions that change them.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.


DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'meshhook_limits_admin') THEN
    CREATE ROLE meshhook_limits_admin NOLOGIN;
  END IF;
  -- Read-only: metrics, queue health, pool pressure, every tenant's usage.
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'meshhook_limits_monitor') THEN
    CREATE ROLE meshhook_limits_monitor NOLOGIN;
  END IF;
END
$$;

-- Resources with a fixed meaning; any other name is a meter with a window.
CREATE TABLE meshhook_limits.builtin_resources (
  resource text PRIMARY KEY,
  enforced_by text NOT NULL,
  description text NOT NULL
);
INSERT INTO meshhook_limits.builtin_resources VALUES
  ('concurrent_executions', 'acquire_execution_slot, claim_jobs', 'running executions at once; concurrent_executions.<key> for one concurrency key'),
  ('concurrent_executions_total', 'acquire_execution_slot, claim_jobs', 'running executions of all tenants together (global only)'),
  ('fair_share_weight', 'claim_jobs', 'a tenant''s share of contended capacity, relative to others (default 1)'),
  ('execution_seconds', 'slot deadline, revoked by the reaper', 'wall-clock limit of one execution'),
  ('memory_bytes', 'heartbeat_execution_slot, release_execution_slot, record_usage', 'peak memory of one execution'),
  ('storage_bytes', 'track_storage triggers, record_usage', 'bytes a tenant stores'),
  ('requests_per_second', 'check_rate_limit', 'request rate, with burst; requests_per_second.<key> for one key'),
  ('work_mem_bytes', 'apply_session_limits', 'work_mem of a tenant''s statements'),
  ('temp_file_bytes', 'apply_session_limits', 'temp_file_limit of a tenant''s statements');

CREATE TABLE meshhook_limits.plans (
  plan text PRIMARY KEY CHECK (plan ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$'),
  description text,
  created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE TABLE meshhook_limits.tenant_plans (
  tenant_id uuid PRIMARY KEY,
  plan text NOT NULL REFERENCES meshhook_limits.plans (plan) ON UPDATE CASCADE,
  assigned_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- One row per configured limit. Scope: global (no plan, tenant, project),
-- plan, tenant, or project (tenant and project).
CREATE TABLE meshhook_limits.limits (
  resource text NOT NULL CHECK (resource ~ '^[a-z][a-z0-9_.-]{0,62}$'),
  plan text REFERENCES meshhook_limits.plans (plan) ON UPDATE CASCADE ON DELETE CASCADE,
  tenant_id uuid,
  project_id uuid,
  limit_value numeric NOT NULL CHECK (limit_value >= 0 AND limit_value < 'Infinity'),
  warn_ratio numeric NOT NULL DEFAULT 0.8 CHECK (warn_ratio > 0 AND warn_ratio <= 1),
  window_length interval CHECK (window_length > interval '0'),
  burst numeric CHECK (burst >= 0 AND burst < 'Infinity'),
  updated_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  CHECK (plan IS NULL OR (tenant_id IS NULL AND project_id IS NULL)),
  CHECK (project_id IS NULL OR tenant_id IS NOT NULL)
);
CREATE UNIQUE INDEX limits_scope_key ON meshhook_limits.limits (
  tenant_id, project_id, plan, resource) NULLS NOT DISTINCT;
CREATE INDEX limits_resource ON meshhook_limits.limits (resource);
CREATE INDEX limits_plan ON meshhook_limits.limits (plan, resource) WHERE plan IS NOT NULL;
CREATE INDEX limits_global ON meshhook_limits.limits (resource) WHERE tenant_id IS NULL AND plan IS NULL;

SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.plans', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.tenant_plans', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.limits', '');

-- Row-level security: tenants read their own rows, admins read everything,
-- nobody but the definer functions writes.
ALTER TABLE meshhook_limits.plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.tenant_plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.limits ENABLE ROW LEVEL SECURITY;

CREATE POLICY admin_all ON meshhook_limits.plans FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_plan ON meshhook_limits.plans FOR SELECT USING (
  plan = (SELECT tp.plan FROM meshhook_limits.tenant_plans tp
           WHERE tp.tenant_id = (SELECT meshhook_limits.current_tenant())));
CREATE POLICY admin_all ON meshhook_limits.tenant_plans FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.tenant_plans FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
CREATE POLICY admin_all ON meshhook_limits.limits FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.limits FOR SELECT USING (
  (SELECT meshhook_limits.current_tenant()) IS NOT NULL AND (
    tenant_id = (SELECT meshhook_limits.current_tenant())
    OR (tenant_id IS NULL AND plan IS NULL)
    OR plan = (SELECT tp.plan FROM meshhook_limits.tenant_plans tp
                WHERE tp.tenant_id = (SELECT meshhook_limits.current_tenant()))));

GRANT USAGE ON SCHEMA meshhook_limits TO PUBLIC;
GRANT SELECT ON meshhook_limits.plans TO PUBLIC;
GRANT SELECT ON meshhook_limits.tenant_plans TO PUBLIC;
GRANT SELECT ON meshhook_limits.limits TO PUBLIC;
GRANT SELECT ON meshhook_limits.builtin_resources TO PUBLIC;

-- Any change to limits, plans or assignments invalidates the backends' caches.
CREATE FUNCTION meshhook_limits._limits_changed_trigger() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._limits_changed();
  RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._limits_changed_trigger() FROM PUBLIC;
CREATE TRIGGER limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON meshhook_limits.limits
  FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._limits_changed_trigger();
CREATE TRIGGER limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON meshhook_limits.plans
  FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._limits_changed_trigger();
CREATE TRIGGER limits_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON meshhook_limits.tenant_plans
  FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._limits_changed_trigger();

-- Resolution without identity checks: project → tenant → plan → global.
CREATE FUNCTION meshhook_limits._resolve(p_tenant uuid, p_project uuid)
RETURNS TABLE(resource text, limit_value numeric, warn_ratio numeric, window_length interval,
              burst numeric, source text)
LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
  -- One equality lookup per level (index scans), most specific first.
  SELECT DISTINCT ON (x.resource) x.resource, x.limit_value, x.warn_ratio, x.window_length, x.burst, x.source
    FROM (
      SELECT l.resource, l.limit_value, l.warn_ratio, l.window_length, l.burst, 'project' AS source, 0 AS rank
        FROM meshhook_limits.limits l WHERE l.tenant_id = p_tenant AND l.project_id = p_project
      UNION ALL
      SELECT l.resource, l.limit_value, l.warn_ratio, l.window_length, l.burst, 'tenant', 1
        FROM meshhook_limits.limits l WHERE l.tenant_id = p_tenant AND l.project_id IS NULL
      UNION ALL
      SELECT l.resource, l.limit_value, l.warn_ratio, l.window_length, l.burst, 'plan', 2
        FROM meshhook_limits.tenant_plans tp JOIN meshhook_limits.limits l ON l.plan = tp.plan
       WHERE tp.tenant_id = p_tenant
      UNION ALL
      SELECT l.resource, l.limit_value, l.warn_ratio, l.window_length, l.burst, 'global', 3
        FROM meshhook_limits.limits l WHERE l.tenant_id IS NULL AND l.plan IS NULL) x
   ORDER BY x.resource, x.rank
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._resolve(uuid, uuid) FROM PUBLIC;

-- What the slot path needs, in integer units: the tenant's and the
-- project's concurrent_executions, the key's concurrent_executions.<key>
-- (resolved like any limit, counted per tenant), the database's
-- concurrent_executions_total, and the tenant's fair_share_weight.
CREATE FUNCTION meshhook_limits._slot_limits(p_tenant uuid, p_project uuid, p_key text DEFAULT NULL)
RETURNS TABLE(tenant_cap bigint, project_cap bigint, exec_micros bigint, memory_bytes bigint,
              key_cap bigint, total_cap bigint, weight float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT
    (SELECT LEAST(pg_catalog.floor(r.limit_value), 9e18)::bigint FROM meshhook_limits._resolve(p_tenant, NULL) r
      WHERE r.resource = 'concurrent_executions'),
    (SELECT LEAST(pg_catalog.floor(l.limit_value), 9e18)::bigint FROM meshhook_limits.limits l
      WHERE l.resource = 'concurrent_executions' AND l.tenant_id = p_tenant
        AND l.project_id = p_project),
    (SELECT LEAST(r.limit_value * 1000000, 9e18)::bigint FROM meshhook_limits._resolve(p_tenant, p_project) r
      WHERE r.resource = 'execution_seconds'),
    (SELECT LEAST(r.limit_value, 9e18)::bigint FROM meshhook_limits._resolve(p_tenant, p_project) r
      WHERE r.resource = 'memory_bytes'),
    (SELECT LEAST(pg_catalog.floor(r.limit_value), 9e18)::bigint FROM meshhook_limits._resolve(p_tenant, p_project) r
      WHERE p_key IS NOT NULL AND r.resource = 'concurrent_executions.' || p_key),
    (SELECT LEAST(pg_catalog.floor(l.limit_value), 9e18)::bigint FROM meshhook_limits.limits l
      WHERE l.resource = 'concurrent_executions_total' AND l.tenant_id IS NULL AND l.plan IS NULL),
    (SELECT r.limit_value::float8 FROM meshhook_limits._resolve(p_tenant, NULL) r
      WHERE r.resource = 'fair_share_weight')
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._slot_limits(uuid, uuid, text) FROM PUBLIC;

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

CREATE FUNCTION meshhook_limits.effective_limits(tenant_id uuid, project_id uuid DEFAULT NULL)
RETURNS TABLE(resource text, limit_value numeric, warn_ratio numeric, window_length interval,
              burst numeric, source text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_tenant_read(effective_limits.tenant_id);
  RETURN QUERY SELECT * FROM meshhook_limits._resolve(effective_limits.tenant_id, effective_limits.project_id);
END
$$;

-- Validation shared by set_limit and set_plan_limit. Raises 22023.
CREATE FUNCTION meshhook_limits._validate_limit(p_resource text, p_limit numeric, p_warn numeric,
                                                p_window interval, p_burst numeric)
RETURNS void LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  builtin boolean;
BEGIN
  IF p_resource IS NULL OR p_resource !~ '^[a-z][a-z0-9_.-]{0,62}$' THEN
    RAISE EXCEPTION 'invalid resource name %', coalesce(quote_literal(left(p_resource, 80)), 'NULL')
      USING ERRCODE = '22023',
            HINT = 'resource names are 1-63 characters of a-z, 0-9, _, . and -, starting with a letter';
  END IF;
  IF p_resource LIKE '%.' THEN
    RAISE EXCEPTION 'resource % names no key after its dot', quote_literal(p_resource)
      USING ERRCODE = '22023', HINT = 'name the key, e.g. concurrent_executions.openai or requests_per_second.webhooks';
  END IF;
  builtin := EXISTS (SELECT 1 FROM meshhook_limits.builtin_resources b WHERE b.resource = p_resource)
             OR p_resource LIKE 'requests_per_second.%'
             OR p_resource LIKE 'concurrent_executions.%';
  IF p_limit IS NULL OR p_limit = 'NaN' OR p_limit < 0 OR p_limit = 'Infinity' THEN
    RAISE EXCEPTION 'limit_value must be a finite number >= 0, got %', coalesce(left(p_limit::text, 40), 'NULL')
      USING ERRCODE = '22023', HINT = 'use clear_limit to remove a limit';
  END IF;
  -- Bounded, so every reader (metrics, alerts, the slot and rate paths)
  -- can take any stored limit.
  IF p_limit > 1e18 THEN
    RAISE EXCEPTION 'limit_value must be at most 1e18, got %', left(p_limit::text, 40)
      USING ERRCODE = '22023', HINT = 'use clear_limit for no limit at all';
  END IF;
  IF p_limit > 0 AND p_limit < 1e-9 THEN
    RAISE EXCEPTION 'limit_value must be 0 or at least 1e-9, got %', left(p_limit::text, 40)
      USING ERRCODE = '22023';
  END IF;
  IF (p_resource = 'requests_per_second' OR p_resource LIKE 'requests_per_second.%')
     AND p_limit > 0 AND p_limit < 0.000001 THEN
    RAISE EXCEPTION 'a request rate must be 0 or at least 0.000001 per second, got %', p_limit
      USING ERRCODE = '22023', HINT = 'a rate of 0 refuses every request';
  END IF;
  IF (p_resource = 'concurrent_executions' OR p_resource LIKE 'concurrent_executions.%'
      OR p_resource = 'concurrent_executions_total') AND p_limit <> trunc(p_limit) THEN
    RAISE EXCEPTION '% must be a whole number, got %', p_resource, p_limit
      USING ERRCODE = '22023';
  END IF;
  IF p_resource = 'fair_share_weight' AND (p_limit < 0.001 OR p_limit > 1000000) THEN
    RAISE EXCEPTION 'fair_share_weight must be between 0.001 and 1000000, got %', p_limit
      USING ERRCODE = '22023', HINT = 'weights are relative: 2 gets twice the share of 1 (the default)';
  END IF;
  IF p_warn IS NULL OR p_warn = 'NaN' OR p_warn <= 0 OR p_warn > 1 THEN
    RAISE EXCEPTION 'warn_ratio must be in (0, 1], got %', coalesce(p_warn::text, 'NULL')
      USING ERRCODE = '22023', HINT = 'warn_ratio 0.8 warns at 80% of the limit';
  END IF;
  IF NOT builtin AND p_window IS NULL THEN
    RAISE EXCEPTION 'unknown resource "%" needs a window_length', p_resource
      USING ERRCODE = '22023',
            HINT = 'built-in resources are concurrent_executions[.key], concurrent_executions_total, '
                   'fair_share_weight, execution_seconds, memory_bytes, '
                   'storage_bytes, requests_per_second[.key], work_mem_bytes and temp_file_bytes; any other name is a meter summed over '
                   'window_length, e.g. window_length => ''1 day''';
  END IF;
  IF builtin AND p_window IS NOT NULL THEN
    RAISE EXCEPTION 'window_length does not apply to %', p_resource
      USING ERRCODE = '22023', HINT = 'window_length is for metered resources only';
  END IF;
  IF p_window IS NOT NULL AND (p_window <= interval '0' OR p_window > interval '366 days') THEN
    RAISE EXCEPTION 'window_length must be between 1 microsecond and 366 days, got %', p_window
      USING ERRCODE = '22023';
  END IF;
  IF p_burst IS NOT NULL AND p_resource <> 'requests_per_second' AND p_resource NOT LIKE 'requests_per_second.%' THEN
    RAISE EXCEPTION 'burst applies to requests_per_second only' USING ERRCODE = '22023';
  END IF;
  IF p_burst IS NOT NULL AND (p_burst = 'NaN' OR p_burst < 0 OR p_burst > 1e18 OR (p_burst > 0 AND p_burst < 1e-9)) THEN
    RAISE EXCEPTION 'burst must be a number between 0 and 1e18, got %', left(p_burst::text, 40) USING ERRCODE = '22023';
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._validate_limit(text, numeric, numeric, interval, numeric) FROM PUBLIC;

CREATE FUNCTION meshhook_limits.set_limit(resource text, limit_value numeric, tenant_id uuid DEFAULT NULL,
    project_id uuid DEFAULT NULL, warn_ratio numeric DEFAULT 0.8, window_length interval DEFAULT NULL,
    burst numeric DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_admin_access('change limits');
  PERFORM meshhook_limits._validate_limit(set_limit.resource, set_limit.limit_value, set_limit.warn_ratio,
                                          set_limit.window_length, set_limit.burst);
  IF set_limit.project_id IS NOT NULL AND set_limit.tenant_id IS NULL THEN
    RAISE EXCEPTION 'a project limit needs its tenant_id' USING ERRCODE = '22023',
      HINT = 'pass tenant_id together with project_id';
  END IF;
  IF set_limit.resource = 'concurrent_executions_total' AND set_limit.tenant_id IS NOT NULL THEN
    RAISE EXCEPTION 'concurrent_executions_total is global only' USING ERRCODE = '22023',
      HINT = 'it counts all tenants together; use concurrent_executions for one tenant';
  END IF;
  INSERT INTO meshhook_limits.limits AS l (resource, tenant_id, project_id, limit_value, warn_ratio,
                                           window_length, burst)
  VALUES (set_limit.resource, set_limit.tenant_id, set_limit.project_id, set_limit.limit_value,
          set_limit.warn_ratio, set_limit.window_length, set_limit.burst)
  ON CONFLICT (tenant_id, project_id, plan, resource) DO UPDATE
    SET limit_value = EXCLUDED.limit_value, warn_ratio = EXCLUDED.warn_ratio,
        window_length = EXCLUDED.window_length, burst = EXCLUDED.burst, updated_at = pg_catalog.now();
END
$$;

CREATE FUNCTION meshhook_limits.clear_limit(resource text, tenant_id uuid DEFAULT NULL, project_id uuid DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE n bigint;
BEGIN
  PERFORM meshhook_limits.require_admin_access('change limits');
  IF clear_limit.project_id IS NOT NULL AND clear_limit.tenant_id IS NULL THEN
    RAISE EXCEPTION 'a project limit needs its tenant_id' USING ERRCODE = '22023';
  END IF;
  DELETE FROM meshhook_limits.limits l
   WHERE l.resource = clear_limit.resource AND l.plan IS NULL
     AND l.tenant_id IS NOT DISTINCT FROM clear_limit.tenant_id
     AND l.project_id IS NOT DISTINCT FROM clear_limit.project_id;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n > 0;
END
$$;

CREATE FUNCTION meshhook_limits.create_plan(plan text, description text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage plans');
  IF create_plan.plan IS NULL OR create_plan.plan !~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$' THEN
    RAISE EXCEPTION 'invalid plan name %', coalesce(quote_literal(left(create_plan.plan, 80)), 'NULL')
      USING ERRCODE = '22023', HINT = 'plan names are 1-63 characters of letters, digits, _ . and -';
  END IF;
  INSERT INTO meshhook_limits.plans AS p (plan, description) VALUES (create_plan.plan, create_plan.description)
  ON CONFLICT (plan) DO UPDATE SET description = EXCLUDED.description;
END
$$;

CREATE FUNCTION meshhook_limits.drop_plan(plan text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE n bigint;
BEGIN
  PERFORM meshhook_limits.require_admin_access('manage plans');
  IF EXISTS (SELECT 1 FROM meshhook_limits.tenant_plans tp WHERE tp.plan = drop_plan.plan) THEN
    RAISE EXCEPTION 'plan % is still assigned to tenants', quote_literal(drop_plan.plan)
      USING ERRCODE = '55006', HINT = 'assign those tenants another plan first';
  END IF;
  DELETE FROM meshhook_limits.plans p WHERE p.plan = drop_plan.plan;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n > 0;
END
$$;

CREATE FUNCTION meshhook_limits._require_plan(p_plan text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  IF p_plan IS NULL OR NOT EXISTS (SELECT 1 FROM meshhook_limits.plans p WHERE p.plan = p_plan) THEN
    RAISE EXCEPTION 'unknown plan %', coalesce(quote_literal(left(p_plan, 80)), 'NULL')
      USING ERRCODE = '22023', HINT = 'create it first with meshhook_limits.create_plan(name)';
  END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._require_plan(text) FROM PUBLIC;

CREATE FUNCTION meshhook_limits.set_plan_limit(plan text, resource text, limit_value numeric,
    warn_ratio numeric DEFAULT 0.8, window_length interval DEFAULT NULL, burst numeric DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_admin_access('change limits');
  PERFORM meshhook_limits._require_plan(set_plan_limit.plan);
  PERFORM meshhook_limits._validate_limit(set_plan_limit.resource, set_plan_limit.limit_value,
      set_plan_limit.warn_ratio, set_plan_limit.window_length, set_plan_limit.burst);
  IF set_plan_limit.resource = 'concurrent_executions_total' THEN
    RAISE EXCEPTION 'concurrent_executions_total is global only' USING ERRCODE = '22023',
      HINT = 'it counts all tenants together; use concurrent_executions for a plan';
  END IF;
  INSERT INTO meshhook_limits.limits AS l (resource, plan, limit_value, warn_ratio, window_length, burst)
  VALUES (set_plan_limit.resource, set_plan_limit.plan, set_plan_limit.limit_value, set_plan_limit.warn_ratio,
          set_plan_limit.window_length, set_plan_limit.burst)
  ON CONFLICT (tenant_id, project_id, plan, resource) DO UPDATE
    SET limit_value = EXCLUDED.limit_value, warn_ratio = EXCLUDED.warn_ratio,
        window_length = EXCLUDED.window_length, burst = EXCLUDED.burst, updated_at = pg_catalog.now();
END
$$;

CREATE FUNCTION meshhook_limits.clear_plan_limit(plan text, resource text)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE n bigint;
BEGIN
  PERFORM meshhook_limits.require_admin_access('change limits');
  DELETE FROM meshhook_limits.limits l WHERE l.plan = clear_plan_limit.plan AND l.resource = clear_plan_limit.resource;
  GET DIAGNOSTICS n = ROW_COUNT;
  RETURN n > 0;
END
$$;

CREATE FUNCTION meshhook_limits.assign_plan(tenant_id uuid, plan text)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_admin_access('assign plans');
  IF assign_plan.tenant_id IS NULL THEN
    RAISE EXCEPTION 'tenant_id must not be NULL' USING ERRCODE = '22023';
  END IF;
  IF assign_plan.plan IS NULL THEN
    DELETE FROM meshhook_limits.tenant_plans tp WHERE tp.tenant_id = assign_plan.tenant_id;
    RETURN;
  END IF;
  PERFORM meshhook_limits._require_plan(assign_plan.plan);
  INSERT INTO meshhook_limits.tenant_plans AS tp (tenant_id, plan) VALUES (assign_plan.tenant_id, assign_plan.plan)
  ON CONFLICT ON CONSTRAINT tenant_plans_pkey DO UPDATE SET plan = EXCLUDED.plan, assigned_at = pg_catalog.now();
END
$$;
