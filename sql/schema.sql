-- meshhook_limits: tables, policies and SQL-language functions.
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
  ('concurrent_executions', 'acquire_execution_slot', 'running executions at once'),
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

-- Every event that was NOTIFYed, since LISTEN does not survive transaction pooling.
CREATE TABLE meshhook_limits.events (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id uuid,
  event text NOT NULL,
  resource text,
  payload jsonb NOT NULL,
  created_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX events_tenant ON meshhook_limits.events (tenant_id, id);

SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.plans', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.tenant_plans', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.limits', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.usage_counters', '');
-- Events too (a restored database keeps what it sent, and its ids go on);
-- slots, rate buckets, samples and worker state describe a running server
-- and are not dumped.
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.events', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.events_id_seq', '');

-- Row-level security: tenants read their own rows, admins read everything,
-- nobody but the definer functions writes.
ALTER TABLE meshhook_limits.plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.tenant_plans ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.usage_counters ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.events ENABLE ROW LEVEL SECURITY;

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
CREATE POLICY admin_all ON meshhook_limits.usage_counters FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.usage_counters FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
CREATE POLICY admin_all ON meshhook_limits.events FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.events FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));

GRANT USAGE ON SCHEMA meshhook_limits TO PUBLIC;
GRANT SELECT ON meshhook_limits.plans, meshhook_limits.tenant_plans, meshhook_limits.limits,
  meshhook_limits.usage_counters, meshhook_limits.events, meshhook_limits.builtin_resources TO PUBLIC;

-- Any change to limits, plans or assignments invalidates the backends' caches.
CREATE FUNCTION meshhook_limits._limits_changed_trigger() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits._limits_changed();
  RETURN NULL;
END
$$;
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

-- What the slot path needs, in integer units.
CREATE FUNCTION meshhook_limits._slot_limits(p_tenant uuid, p_project uuid)
RETURNS TABLE(tenant_cap bigint, project_cap bigint, exec_micros bigint, memory_bytes bigint)
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
      WHERE r.resource = 'memory_bytes')
$$;

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
RETURNS void LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  builtin boolean;
BEGIN
  IF p_resource IS NULL OR p_resource !~ '^[a-z][a-z0-9_.-]{0,62}$' THEN
    RAISE EXCEPTION 'invalid resource name %', coalesce(quote_literal(left(p_resource, 80)), 'NULL')
      USING ERRCODE = '22023',
            HINT = 'resource names are 1-63 characters of a-z, 0-9, _, . and -, starting with a letter';
  END IF;
  builtin := p_resource IN ('concurrent_executions', 'execution_seconds', 'memory_bytes',
                            'storage_bytes', 'requests_per_second', 'work_mem_bytes', 'temp_file_bytes')
             OR p_resource LIKE 'requests_per_second.%';
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
  IF p_resource = 'concurrent_executions' AND p_limit <> trunc(p_limit) THEN
    RAISE EXCEPTION 'concurrent_executions must be a whole number, got %', p_limit
      USING ERRCODE = '22023';
  END IF;
  IF p_warn IS NULL OR p_warn = 'NaN' OR p_warn <= 0 OR p_warn > 1 THEN
    RAISE EXCEPTION 'warn_ratio must be in (0, 1], got %', coalesce(p_warn::text, 'NULL')
      USING ERRCODE = '22023', HINT = 'warn_ratio 0.8 warns at 80% of the limit';
  END IF;
  IF NOT builtin AND p_window IS NULL THEN
    RAISE EXCEPTION 'unknown resource "%" needs a window_length', p_resource
      USING ERRCODE = '22023',
            HINT = 'built-in resources are concurrent_executions, execution_seconds, memory_bytes, '
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

CREATE FUNCTION meshhook_limits.set_plan_limit(plan text, resource text, limit_value numeric,
    warn_ratio numeric DEFAULT 0.8, window_length interval DEFAULT NULL, burst numeric DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_admin_access('change limits');
  PERFORM meshhook_limits._require_plan(set_plan_limit.plan);
  PERFORM meshhook_limits._validate_limit(set_plan_limit.resource, set_plan_limit.limit_value,
      set_plan_limit.warn_ratio, set_plan_limit.window_length, set_plan_limit.burst);
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

-- Supabase Realtime's realtime.send(jsonb, text, text, boolean), when it is
-- the real one: the function and its schema belong to a superuser or to
-- supabase_realtime_admin (who installs Realtime on Supabase), and no other
-- function named send sits beside it. A send created by anyone else (a role
-- with CREATE on the database, on a server without Realtime) is never
-- called: it would run as the definer of _emit.
CREATE FUNCTION meshhook_limits._realtime_send_trusted() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT count(*) = 1 AND bool_and(
           p.oid = pg_catalog.to_regprocedure('realtime.send(jsonb,text,text,boolean)')
           AND (fo.rolsuper OR fo.rolname = 'supabase_realtime_admin')
           AND (so.rolsuper OR so.rolname = 'supabase_realtime_admin'))
    FROM pg_catalog.pg_proc p
    JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    JOIN pg_catalog.pg_roles fo ON fo.oid = p.proowner
    JOIN pg_catalog.pg_roles so ON so.oid = n.nspowner
   WHERE n.nspname = 'realtime' AND p.proname = 'send'
$$;

-- Record an event: keep it, NOTIFY it, and send it to Supabase Realtime where present.
CREATE FUNCTION meshhook_limits._emit(p_event text, p_tenant uuid, p_resource text, p_value numeric,
                                      p_limit numeric, p_extra jsonb DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  payload jsonb;
  event_id bigint;
  channel text := coalesce(nullif(current_setting('meshhook_limits.notify_channel', true), ''), 'meshhook_limits');
BEGIN
  -- At most 100 events per tenant per minute: one tenant's churn cannot
  -- flood the events table or the listeners. More are dropped.
  IF p_tenant IS NOT NULL AND (SELECT e.created_at > pg_catalog.now() - interval '1 minute'
                                 FROM meshhook_limits.events e WHERE e.tenant_id = p_tenant
                                ORDER BY e.id DESC OFFSET 99 LIMIT 1) THEN
    RETURN;
  END IF;
  payload := jsonb_build_object('event', p_event, 'tenant_id', p_tenant, 'resource', p_resource,
                                'value', p_value, 'limit', p_limit, 'at', pg_catalog.now());
  IF p_extra IS NOT NULL AND octet_length((payload || p_extra)::text) < 7900 THEN
    payload := p_extra || payload;
  END IF;
  -- NOTIFY takes at most 8000 bytes; an event never fails on its size.
  IF octet_length(payload::text) >= 7900 THEN
    payload := jsonb_build_object('event', p_event, 'tenant_id', p_tenant, 'resource', left(p_resource, 63),
                                  'at', pg_catalog.now(), 'truncated', true);
  END IF;
  INSERT INTO meshhook_limits.events (tenant_id, event, resource, payload)
  VALUES (p_tenant, p_event, p_resource, payload) RETURNING id INTO event_id;
  -- What is sent carries the id of its events row: anyone may pg_notify on
  -- the channel, but only a real event has that row (with that payload).
  payload := payload || jsonb_build_object('event_id', event_id);
  PERFORM pg_catalog.pg_notify(channel, payload::text);
  IF meshhook_limits._realtime_send_trusted() THEN
    EXECUTE 'SELECT realtime.send($1::jsonb, $2::text, $3::text, $4::boolean)'
      USING payload, p_event, 'meshhook_limits:' || coalesce(p_tenant::text, 'admin'), true;
  END IF;
END
$$;

-- Supabase Realtime authorises private topics by row-level security on
-- realtime.messages. This policy lets a tenant (authenticated, with its
-- tenant claim) receive meshhook_limits:<its tenant> and nothing else.
-- Run once where Realtime is installed (admin); false when it is not.
CREATE FUNCTION meshhook_limits.install_realtime_policy() RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM meshhook_limits.require_admin_access('install the Realtime policy');
  IF NOT meshhook_limits._realtime_send_trusted()
     OR pg_catalog.to_regclass('realtime.messages') IS NULL
     OR pg_catalog.to_regprocedure('realtime.topic()') IS NULL THEN
    RETURN false;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_policy p
                  WHERE p.polrelid = 'realtime.messages'::regclass AND p.polname = 'meshhook_limits_own_topic') THEN
    EXECUTE $p$CREATE POLICY meshhook_limits_own_topic ON realtime.messages FOR SELECT TO authenticated
      USING (realtime.topic() = 'meshhook_limits:' || (SELECT meshhook_limits.current_tenant())::text)$p$;
  END IF;
  RETURN true;
END
$$;

CREATE FUNCTION meshhook_limits._status(p_used numeric, p_limit numeric, p_warn numeric)
RETURNS text LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN p_limit IS NULL THEN 'ok'
              WHEN p_used > p_limit THEN 'exceeded'
              WHEN p_used >= p_limit * p_warn THEN 'warning'
              ELSE 'ok' END
$$;

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
    ws := to_timestamp(floor(extract(epoch FROM pg_catalog.now()) / extract(epoch FROM win))
                       * extract(epoch FROM win));
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

-- meshhook_limits._usage(tenant) is defined in monitor.sql on top of _usage_ratios.

CREATE FUNCTION meshhook_limits.usage(tenant_id uuid)
RETURNS TABLE(resource text, used numeric, limit_value numeric, ratio numeric, status text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  PERFORM meshhook_limits.require_tenant_read(usage.tenant_id);
  RETURN QUERY SELECT * FROM meshhook_limits._usage(usage.tenant_id);
END
$$;

-- ---------------------------------------------------------------------------
-- Slots without shared_preload_libraries: the same contract on a table.
-- Slower (it writes WAL) but durable; a per-tenant advisory lock serialises
-- admission, so the count and the insert cannot interleave.
CREATE TABLE meshhook_limits.fallback_slots (
  tenant_id uuid NOT NULL,
  slot_id uuid NOT NULL UNIQUE,
  project_id uuid,
  run_id text,
  acquired_at timestamptz NOT NULL,
  lease interval NOT NULL,
  lease_expires_at timestamptz NOT NULL,
  deadline timestamptz,
  memory_limit bigint,
  memory_peak bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, slot_id)
);
ALTER TABLE meshhook_limits.fallback_slots ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.fallback_slots FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.fallback_slots FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
GRANT SELECT ON meshhook_limits.fallback_slots TO PUBLIC;

-- One row per tenant that took a fallback slot: a tenant's acquires
-- serialise on it (FOR UPDATE). Nobody else can read, let alone lock, it;
-- an advisory lock any role can take would let a role stall a tenant.
CREATE TABLE meshhook_limits.fallback_tenants (tenant_id uuid PRIMARY KEY);
ALTER TABLE meshhook_limits.fallback_tenants ENABLE ROW LEVEL SECURITY;

CREATE FUNCTION meshhook_limits._fallback_lock(p_tenant uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'execution slots without shared_preload_libraries need READ COMMITTED transactions'
      USING ERRCODE = '55000',
            HINT = 'add meshhook_limits to shared_preload_libraries, or acquire slots outside REPEATABLE READ/SERIALIZABLE';
  END IF;
  INSERT INTO meshhook_limits.fallback_tenants (tenant_id) VALUES (p_tenant) ON CONFLICT DO NOTHING;
  PERFORM 1 FROM meshhook_limits.fallback_tenants f WHERE f.tenant_id = p_tenant FOR UPDATE;
END
$$;

-- Revoke expired rows (one tenant, or all with NULL) and announce each.
-- Rows another transaction holds (a late heartbeat or release) are left to
-- the next reap: a tenant's open transaction never stalls the reaper.
CREATE FUNCTION meshhook_limits._fallback_reap(p_tenant uuid) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE r record; n bigint := 0; now_ts timestamptz := pg_catalog.clock_timestamp();
BEGIN
  FOR r IN DELETE FROM meshhook_limits.fallback_slots s
            WHERE s.ctid = ANY (ARRAY(SELECT x.ctid FROM meshhook_limits.fallback_slots x
                                       WHERE (p_tenant IS NULL OR x.tenant_id = p_tenant)
                                         AND (x.lease_expires_at <= now_ts OR x.deadline <= now_ts)
                                       FOR UPDATE SKIP LOCKED))
           RETURNING s.*
  LOOP
    n := n + 1;
    PERFORM meshhook_limits._emit('slot.revoked', r.tenant_id,
      CASE WHEN r.deadline <= now_ts THEN 'execution_seconds' ELSE 'concurrent_executions' END, NULL, NULL,
      jsonb_build_object('slot_id', r.slot_id, 'run_id', coalesce(r.run_id, ''), 'project_id', r.project_id,
                         'reason', CASE WHEN r.deadline <= now_ts THEN 'deadline_exceeded' ELSE 'lease_expired' END));
  END LOOP;
  RETURN n;
END
$$;

CREATE FUNCTION meshhook_limits._fallback_acquire(p_tenant uuid, p_project uuid, p_run_id text, p_lease_micros bigint)
RETURNS TABLE(granted boolean, slot_id uuid, reason text, in_use bigint, limit_value bigint,
              deadline timestamptz, lease_expires_at timestamptz, retry_after interval)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  lim record; tc bigint; pc bigint; ends timestamptz; dl timestamptz; le timestamptz;
  now_ts timestamptz := pg_catalog.clock_timestamp();
  new_id uuid := pg_catalog.gen_random_uuid();
  max_wait interval := current_setting('meshhook_limits.retry_after_max')::interval;
BEGIN
  PERFORM meshhook_limits._fallback_lock(p_tenant);
  SELECT * INTO lim FROM meshhook_limits._slot_limits(p_tenant, p_project);
  PERFORM meshhook_limits._fallback_reap(p_tenant);
  SELECT count(*) INTO tc FROM meshhook_limits.fallback_slots s WHERE s.tenant_id = p_tenant;
  SELECT count(*) INTO pc FROM meshhook_limits.fallback_slots s
   WHERE s.tenant_id = p_tenant AND s.project_id = p_project;
  IF lim.tenant_cap IS NOT NULL AND tc >= lim.tenant_cap THEN
    SELECT min(LEAST(s.lease_expires_at, coalesce(s.deadline, 'infinity'))) INTO ends
      FROM meshhook_limits.fallback_slots s WHERE s.tenant_id = p_tenant;
    RETURN QUERY SELECT false, NULL::uuid, 'tenant_limit'::text, tc, lim.tenant_cap, NULL::timestamptz,
      NULL::timestamptz, LEAST(GREATEST(coalesce(ends - now_ts, max_wait), interval '10 ms'), max_wait);
    RETURN;
  END IF;
  IF p_project IS NOT NULL AND lim.project_cap IS NOT NULL AND pc >= lim.project_cap THEN
    SELECT min(LEAST(s.lease_expires_at, coalesce(s.deadline, 'infinity'))) INTO ends
      FROM meshhook_limits.fallback_slots s WHERE s.tenant_id = p_tenant AND s.project_id = p_project;
    RETURN QUERY SELECT false, NULL::uuid, 'project_limit'::text, pc, lim.project_cap, NULL::timestamptz,
      NULL::timestamptz, LEAST(GREATEST(coalesce(ends - now_ts, max_wait), interval '10 ms'), max_wait);
    RETURN;
  END IF;
  dl := now_ts + lim.exec_micros * interval '1 microsecond';
  le := LEAST(now_ts + p_lease_micros * interval '1 microsecond', coalesce(dl, 'infinity'));
  INSERT INTO meshhook_limits.fallback_slots (tenant_id, slot_id, project_id, run_id, acquired_at, lease,
                                              lease_expires_at, deadline, memory_limit)
  VALUES (p_tenant, new_id, p_project, nullif(p_run_id, ''), now_ts, p_lease_micros * interval '1 microsecond',
          le, dl, lim.memory_bytes);
  IF p_project IS NOT NULL AND lim.project_cap IS NOT NULL
     AND (lim.tenant_cap IS NULL OR lim.project_cap - pc < lim.tenant_cap - tc) THEN
    RETURN QUERY SELECT true, new_id, 'granted'::text, pc + 1, lim.project_cap, dl, le, NULL::interval;
  ELSE
    RETURN QUERY SELECT true, new_id, 'granted'::text, tc + 1, lim.tenant_cap, dl, le, NULL::interval;
  END IF;
END
$$;

CREATE FUNCTION meshhook_limits._fallback_heartbeat(p_slot uuid, p_memory bigint)
RETURNS TABLE(alive boolean, reason text, deadline timestamptz, lease_expires_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE s record; why text; now_ts timestamptz := pg_catalog.clock_timestamp();
BEGIN
  SELECT * INTO s FROM meshhook_limits.fallback_slots f WHERE f.slot_id = p_slot FOR UPDATE;
  IF NOT FOUND THEN
    RETURN QUERY SELECT false, 'not_found'::text, NULL::timestamptz, NULL::timestamptz;
    RETURN;
  END IF;
  PERFORM meshhook_limits.require_tenant_access(s.tenant_id);
  why := CASE WHEN s.deadline <= now_ts THEN 'deadline_exceeded'
              WHEN s.lease_expires_at <= now_ts THEN 'lease_expired'
              WHEN s.memory_limit IS NOT NULL AND p_memory > s.memory_limit THEN 'memory_exceeded' END;
  IF why IS NOT NULL THEN
    DELETE FROM meshhook_limits.fallback_slots f WHERE f.slot_id = p_slot;
    PERFORM meshhook_limits._emit('slot.revoked', s.tenant_id,
      CASE why WHEN 'memory_exceeded' THEN 'memory_bytes' WHEN 'deadline_exceeded' THEN 'execution_seconds'
               ELSE 'concurrent_executions' END,
      CASE WHEN why = 'memory_exceeded' THEN p_memory END, CASE WHEN why = 'memory_exceeded' THEN s.memory_limit END,
      jsonb_build_object('slot_id', s.slot_id, 'run_id', coalesce(s.run_id, ''), 'project_id', s.project_id, 'reason', why));
    RETURN QUERY SELECT false, why, s.deadline, NULL::timestamptz;
    RETURN;
  END IF;
  UPDATE meshhook_limits.fallback_slots f
     SET lease_expires_at = LEAST(now_ts + f.lease, coalesce(f.deadline, 'infinity')),
         memory_peak = GREATEST(f.memory_peak, coalesce(p_memory, 0))
   WHERE f.slot_id = p_slot
  RETURNING f.lease_expires_at INTO s.lease_expires_at;
  RETURN QUERY SELECT true, 'alive'::text, s.deadline, s.lease_expires_at;
END
$$;

CREATE FUNCTION meshhook_limits._fallback_release(p_slot uuid, p_memory bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE s record;
BEGIN
  SELECT * INTO s FROM meshhook_limits.fallback_slots f WHERE f.slot_id = p_slot FOR UPDATE;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM meshhook_limits.require_tenant_access(s.tenant_id);
  DELETE FROM meshhook_limits.fallback_slots f WHERE f.slot_id = p_slot;
  IF s.memory_limit IS NOT NULL AND p_memory > s.memory_limit THEN
    PERFORM meshhook_limits._emit('slot.revoked', s.tenant_id, 'memory_bytes', p_memory, s.memory_limit,
      jsonb_build_object('slot_id', s.slot_id, 'run_id', coalesce(s.run_id, ''), 'project_id', s.project_id,
                         'reason', 'memory_exceeded'));
  END IF;
  RETURN true;
END
$$;

-- ---------------------------------------------------------------------------
-- Rate limits (GCRA in Rust; see src/rate.rs).

-- The rates a check of a key spends from: the key's own
-- (requests_per_second.<key>, when any scope sets it) and the tenant's
-- (requests_per_second, across all its keys). Burst defaults to one
-- second's worth. Always one row; NULL where no rule applies.
CREATE FUNCTION meshhook_limits._rate_rules(p_tenant uuid, p_key text)
RETURNS TABLE(key_rate float8, key_burst float8, tenant_rate float8, tenant_burst float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT max(r.limit_value) FILTER (WHERE r.resource <> 'requests_per_second')::float8,
         max(coalesce(r.burst, GREATEST(r.limit_value, 1))) FILTER (WHERE r.resource <> 'requests_per_second')::float8,
         max(r.limit_value) FILTER (WHERE r.resource = 'requests_per_second')::float8,
         max(coalesce(r.burst, GREATEST(r.limit_value, 1))) FILTER (WHERE r.resource = 'requests_per_second')::float8
    FROM meshhook_limits._resolve(p_tenant, NULL) r
   WHERE r.resource IN ('requests_per_second.' || p_key, 'requests_per_second')
$$;

-- Rate state without shared_preload_libraries. Unlogged: not worth WAL, and
-- emptied by a crash like the shared-memory table.
CREATE UNLOGGED TABLE meshhook_limits.rate_state (
  tenant_id uuid NOT NULL,
  key text NOT NULL,
  tat bigint NOT NULL,
  paused_until bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, key)
);
ALTER TABLE meshhook_limits.rate_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.rate_state FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));

CREATE FUNCTION meshhook_limits._rate_state_lock(p_tenant uuid, p_key text, p_now bigint)
RETURNS TABLE(tat bigint, paused_until bigint)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
BEGIN
  INSERT INTO meshhook_limits.rate_state (tenant_id, key, tat) VALUES (p_tenant, p_key, p_now)
  ON CONFLICT DO NOTHING;
  RETURN QUERY SELECT s.tat, s.paused_until FROM meshhook_limits.rate_state s
                WHERE s.tenant_id = p_tenant AND s.key = p_key FOR UPDATE;
END
$$;

-- ---------------------------------------------------------------------------
-- Storage quotas: statement-level triggers with transition tables keep each
-- tenant's bytes in tracked tables. A tenant's total is one row, so writers
-- that grow the same tenant serialise on it and the check is exact.
CREATE TABLE meshhook_limits.tracked_tables (
  table_schema name NOT NULL,
  table_name name NOT NULL,
  tenant_column name NOT NULL,
  tracked_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  -- Identity in this cluster, to follow renames; refreshed from the names
  -- when it does not match (after pg_dump/restore).
  relid oid,
  tenant_attnum smallint,
  PRIMARY KEY (table_schema, table_name)
);
CREATE TABLE meshhook_limits.storage_usage (
  tenant_id uuid NOT NULL,
  table_schema name NOT NULL,
  table_name name NOT NULL,
  bytes bigint NOT NULL,
  PRIMARY KEY (tenant_id, table_schema, table_name)
);
CREATE TABLE meshhook_limits.storage_totals (
  tenant_id uuid PRIMARY KEY,
  bytes bigint NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.tracked_tables', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.storage_usage', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.storage_totals', '');
ALTER TABLE meshhook_limits.tracked_tables ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.storage_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE meshhook_limits.storage_totals ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.tracked_tables FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY admin_all ON meshhook_limits.storage_usage FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.storage_usage FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
CREATE POLICY admin_all ON meshhook_limits.storage_totals FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
CREATE POLICY own_rows ON meshhook_limits.storage_totals FOR SELECT USING (tenant_id = (SELECT meshhook_limits.current_tenant()));
GRANT SELECT ON meshhook_limits.tracked_tables, meshhook_limits.storage_usage, meshhook_limits.storage_totals TO PUBLIC;

-- Apply per-tenant byte deltas of one statement on one table; refuse growth
-- past storage_bytes (53400), announce crossings of the warn ratio.
CREATE FUNCTION meshhook_limits._storage_apply(p_schema name, p_table name, p_tenant uuid, p_delta bigint)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE lim record; new_total bigint; old_total bigint; thr numeric;
BEGIN
  IF p_tenant IS NULL OR p_delta = 0 THEN
    RETURN;
  END IF;
  INSERT INTO meshhook_limits.storage_totals AS s (tenant_id, bytes) VALUES (p_tenant, p_delta)
  ON CONFLICT (tenant_id) DO UPDATE SET bytes = GREATEST(s.bytes + EXCLUDED.bytes, 0)
  RETURNING s.bytes INTO new_total;
  old_total := new_total - p_delta;
  INSERT INTO meshhook_limits.storage_usage AS u (tenant_id, table_schema, table_name, bytes)
  VALUES (p_tenant, p_schema, p_table, p_delta)
  ON CONFLICT (tenant_id, table_schema, table_name) DO UPDATE SET bytes = GREATEST(u.bytes + EXCLUDED.bytes, 0);
  SELECT * INTO lim FROM meshhook_limits._resolve(p_tenant, NULL) r WHERE r.resource = 'storage_bytes';
  IF lim.limit_value IS NULL THEN
    RETURN;
  END IF;
  IF p_delta > 0 AND new_total > lim.limit_value THEN
    RAISE EXCEPTION 'tenant % would store % bytes, over its storage_bytes limit of % (% bytes in use)',
                    p_tenant, new_total, lim.limit_value, old_total
      USING ERRCODE = '53400',
            DETAIL = format('the statement adds %s bytes to %I.%I', p_delta, p_schema, p_table),
            HINT = 'delete data first, or ask an admin to raise storage_bytes';
  END IF;
  thr := lim.limit_value * lim.warn_ratio;
  IF old_total < thr AND new_total >= thr THEN
    PERFORM meshhook_limits._emit('limit.warning', p_tenant, 'storage_bytes', new_total, lim.limit_value, NULL);
  ELSIF old_total >= thr AND new_total < thr THEN
    PERFORM meshhook_limits._emit('limit.recovered', p_tenant, 'storage_bytes', new_total, lim.limit_value, NULL);
  END IF;
END
$$;

-- The tracked table a table's writes count against: itself, or the root of
-- its partition tree (partitions of a tracked partitioned table carry the
-- same triggers, since DML on a partition fires only the partition's own
-- statement triggers, and DML on the parent only the parent's).
CREATE FUNCTION meshhook_limits._tracked(p_relid oid, p_schema name, p_table name)
RETURNS meshhook_limits.tracked_tables
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE t meshhook_limits.tracked_tables; root oid;
BEGIN
  root := coalesce(pg_catalog.pg_partition_root(p_relid), p_relid);
  IF root <> p_relid THEN
    SELECT n.nspname, c.relname INTO p_schema, p_table
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = root;
  END IF;
  SELECT * INTO t FROM meshhook_limits.tracked_tables x WHERE x.relid = root;
  IF NOT FOUND THEN
    UPDATE meshhook_limits.tracked_tables x
       SET relid = root,
           tenant_attnum = (SELECT a.attnum FROM pg_catalog.pg_attribute a
                             WHERE a.attrelid = root AND a.attname = x.tenant_column AND NOT a.attisdropped)
     WHERE x.table_schema = p_schema AND x.table_name = p_table
    RETURNING x.* INTO t;
  END IF;
  RETURN t;
END
$$;

CREATE FUNCTION meshhook_limits._storage_trigger() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE tr meshhook_limits.tracked_tables; col text; d record; q text;
BEGIN
  tr := meshhook_limits._tracked(TG_RELID, TG_TABLE_SCHEMA, TG_TABLE_NAME);
  IF tr.table_name IS NULL THEN
    RETURN NULL;  -- untracked in between, or a partition detached from a tracked table
  END IF;
  IF TG_OP = 'TRUNCATE' THEN
    IF tr.relid = TG_RELID THEN
      PERFORM meshhook_limits._storage_forget(tr.table_schema, tr.table_name, false);
    ELSE
      PERFORM meshhook_limits._storage_recount(tr.relid);  -- one partition of it
    END IF;
    RETURN NULL;
  END IF;
  col := tr.tenant_column;
  -- A row's size is the sum of its values' sizes (_row_bytes): the same rows
  -- always add and subtract alike, whatever the session's settings, and no
  -- cast or output function of the table's types runs as the definer.
  q := CASE TG_OP
    WHEN 'INSERT' THEN format('SELECT %I AS t, sum(meshhook_limits._row_bytes(n))::bigint AS b FROM new_rows n GROUP BY 1', col)
    WHEN 'DELETE' THEN format('SELECT %I AS t, -sum(meshhook_limits._row_bytes(o))::bigint AS b FROM old_rows o GROUP BY 1', col)
    ELSE format('SELECT t, sum(b)::bigint AS b FROM (SELECT %1$I AS t, meshhook_limits._row_bytes(n) AS b FROM new_rows n '
                'UNION ALL SELECT %1$I, -meshhook_limits._row_bytes(o) FROM old_rows o) x GROUP BY 1', col)
  END;
  -- Tenants in a fixed order, so concurrent multi-tenant statements cannot deadlock.
  FOR d IN EXECUTE q || ' ORDER BY 1' LOOP
    PERFORM meshhook_limits._storage_apply(tr.table_schema, tr.table_name, d.t, d.b);
  END LOOP;
  RETURN NULL;
END
$$;

-- Bytes per tenant in a tracked table (all its partitions), counted as the
-- table's owner (see _read_as_owner): [{"t": tenant, "b": bytes}, ...].
CREATE FUNCTION meshhook_limits._storage_count(p_relid oid, p_column name) RETURNS jsonb
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
  SELECT meshhook_limits._read_as_owner(p_relid, pg_catalog.format(
    'SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(''t'', s.t, ''b'', s.b)), ''[]'')
       FROM (SELECT x.%1$I AS t, pg_catalog.sum(meshhook_limits._row_bytes(x))::bigint AS b
               FROM %2$s x WHERE x.%1$I IS NOT NULL GROUP BY 1) s', p_column, p_relid::regclass))
$$;

-- Count a tracked table again from its rows (after a schema change that
-- changes row sizes, an attach or detach of a partition, a TRUNCATE of one
-- partition). Never refuses: the rows are already there.
CREATE FUNCTION meshhook_limits._storage_recount(p_relid oid) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE tr meshhook_limits.tracked_tables; d record;
BEGIN
  SELECT * INTO tr FROM meshhook_limits.tracked_tables t WHERE t.relid = p_relid;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  PERFORM meshhook_limits._storage_forget(tr.table_schema, tr.table_name, false);
  FOR d IN SELECT (e->>'t')::uuid AS t, (e->>'b')::bigint AS b
             FROM pg_catalog.jsonb_array_elements(meshhook_limits._storage_count(p_relid, tr.tenant_column)) e
            ORDER BY 1 LOOP
    INSERT INTO meshhook_limits.storage_usage (tenant_id, table_schema, table_name, bytes)
    VALUES (d.t, tr.table_schema, tr.table_name, d.b);
    INSERT INTO meshhook_limits.storage_totals AS s (tenant_id, bytes) VALUES (d.t, d.b)
    ON CONFLICT (tenant_id) DO UPDATE SET bytes = s.bytes + EXCLUDED.bytes;
  END LOOP;
END
$$;

-- The storage triggers on one table (a tracked table, or a partition of one).
CREATE FUNCTION meshhook_limits._storage_triggers(p_rel regclass, p_column name, p_create boolean)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF NOT p_create THEN
    EXECUTE format('DROP TRIGGER IF EXISTS meshhook_limits_storage_ins ON %1$s;
                    DROP TRIGGER IF EXISTS meshhook_limits_storage_upd ON %1$s;
                    DROP TRIGGER IF EXISTS meshhook_limits_storage_del ON %1$s;
                    DROP TRIGGER IF EXISTS meshhook_limits_storage_trunc ON %1$s', p_rel);
    RETURN;
  END IF;
  IF EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g WHERE g.tgrelid = p_rel AND g.tgname = 'meshhook_limits_storage_ins') THEN
    RETURN;
  END IF;
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_ins AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_upd AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_del AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
  EXECUTE format('CREATE TRIGGER meshhook_limits_storage_trunc AFTER TRUNCATE ON %s '
                 'FOR EACH STATEMENT EXECUTE FUNCTION meshhook_limits._storage_trigger(%L)', p_rel, p_column);
END
$$;

CREATE FUNCTION meshhook_limits.track_storage(tbl regclass, tenant_column name)
RETURNS bigint LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE sch name; rel name; typ regtype; kind "char"; part boolean; counted bigint; m record;
BEGIN
  PERFORM meshhook_limits.require_admin_access('track storage');
  IF tbl IS NULL OR tenant_column IS NULL THEN
    RAISE EXCEPTION 'tbl and tenant_column must not be NULL' USING ERRCODE = '22023';
  END IF;
  SELECT n.nspname, c.relname, c.relkind, c.relispartition INTO sch, rel, kind, part
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
  IF kind NOT IN ('r', 'p') THEN
    RAISE EXCEPTION '% is not a table', tbl USING ERRCODE = '22023',
      HINT = 'track the tables behind a view instead';
  END IF;
  IF NOT meshhook_limits._caller_has_privs_of((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = tbl)) THEN
    RAISE EXCEPTION 'must be the owner of table % to track it', tbl USING ERRCODE = '42501',
      HINT = 'an admin tracks the tables it owns (or whose owner role it is a member of)';
  END IF;
  IF part THEN
    RAISE EXCEPTION '% is a partition', tbl USING ERRCODE = '22023',
      HINT = format('track its partitioned table %s: that counts writes through it and through every partition',
                    pg_catalog.pg_partition_root(tbl)::regclass);
  END IF;
  SELECT a.atttypid::regtype INTO typ FROM pg_catalog.pg_attribute a
   WHERE a.attrelid = tbl AND a.attname = tenant_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF typ IS NULL THEN
    RAISE EXCEPTION 'table % has no column %', tbl, quote_ident(tenant_column) USING ERRCODE = '22023';
  ELSIF typ <> 'uuid'::regtype THEN
    RAISE EXCEPTION 'column % of % is %, not uuid', quote_ident(tenant_column), tbl, typ USING ERRCODE = '22023',
      HINT = 'the tenant column holds tenant ids, which are uuids';
  END IF;
  IF EXISTS (SELECT 1 FROM meshhook_limits.tracked_tables t WHERE t.table_schema = sch AND t.table_name = rel) THEN
    RAISE EXCEPTION '% is already tracked', tbl USING ERRCODE = '22023', HINT = 'untrack_storage it first';
  END IF;
  -- No writer may slip between counting and the triggers.
  EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
  INSERT INTO meshhook_limits.tracked_tables (table_schema, table_name, tenant_column, relid, tenant_attnum)
  VALUES (sch, rel, tenant_column, tbl,
          (SELECT a.attnum FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl AND a.attname = tenant_column));
  FOR m IN SELECT p.relid FROM pg_catalog.pg_partition_tree(tbl) p UNION SELECT tbl LOOP
    PERFORM meshhook_limits._storage_triggers(m.relid, tenant_column, true);
  END LOOP;
  -- Existing rows count from now on; registration itself never refuses.
  PERFORM meshhook_limits._storage_recount(tbl);
  SELECT coalesce(sum(u.bytes), 0)::bigint INTO counted FROM meshhook_limits.storage_usage u
   WHERE u.table_schema = sch AND u.table_name = rel;
  RETURN counted;
END
$$;

CREATE FUNCTION meshhook_limits.untrack_storage(tbl regclass)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE sch name; rel name; m record;
BEGIN
  PERFORM meshhook_limits.require_admin_access('track storage');
  IF tbl IS NULL THEN
    RAISE EXCEPTION 'tbl must not be NULL' USING ERRCODE = '22023';
  END IF;
  SELECT n.nspname, c.relname INTO sch, rel
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
  IF NOT EXISTS (SELECT 1 FROM meshhook_limits.tracked_tables t
                  WHERE t.relid = tbl OR (t.table_schema = sch AND t.table_name = rel)) THEN
    RETURN false;
  END IF;
  IF NOT meshhook_limits._caller_has_privs_of((SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid = tbl)) THEN
    RAISE EXCEPTION 'must be the owner of table % to untrack it', tbl USING ERRCODE = '42501';
  END IF;
  EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', tbl);
  FOR m IN SELECT p.relid FROM pg_catalog.pg_partition_tree(tbl) p UNION SELECT tbl LOOP
    PERFORM meshhook_limits._storage_triggers(m.relid, NULL, false);
  END LOOP;
  PERFORM meshhook_limits._storage_forget(sch, rel);
  RETURN true;
END
$$;

-- Subtract a table's bytes from its tenants (TRUNCATE, untrack, DROP). A
-- total never goes below zero.
CREATE FUNCTION meshhook_limits._storage_forget(p_schema name, p_table name, p_untrack boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE d record;
BEGIN
  FOR d IN WITH gone AS (DELETE FROM meshhook_limits.storage_usage u
                          WHERE u.table_schema = p_schema AND u.table_name = p_table
                          RETURNING u.tenant_id, u.bytes)
           SELECT * FROM gone ORDER BY 1 LOOP
    UPDATE meshhook_limits.storage_totals s SET bytes = GREATEST(s.bytes - d.bytes, 0) WHERE s.tenant_id = d.tenant_id;
  END LOOP;
  IF p_untrack THEN
    DELETE FROM meshhook_limits.tracked_tables t WHERE t.table_schema = p_schema AND t.table_name = p_table;
  END IF;
END
$$;

-- A dropped tracked table stops counting.
CREATE FUNCTION meshhook_limits._storage_on_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE o record; t record;
BEGIN
  FOR o IN SELECT * FROM pg_catalog.pg_event_trigger_dropped_objects() x WHERE x.object_type = 'table' LOOP
    -- By identity (a table renamed in a way no trigger saw), else by name.
    FOR t IN SELECT tt.table_schema, tt.table_name FROM meshhook_limits.tracked_tables tt
              WHERE tt.relid = o.objid OR (tt.table_schema = o.schema_name AND tt.table_name = o.object_name) LOOP
      PERFORM meshhook_limits._storage_forget(t.table_schema, t.table_name);
    END LOOP;
  END LOOP;
END
$$;

-- Tracked tables whose name or schema changed (ALTER TABLE/INDEX ... RENAME,
-- SET SCHEMA, ALTER SCHEMA ... RENAME) are followed: the table is known by
-- its oid and by carrying this extension's trigger.
CREATE FUNCTION meshhook_limits._storage_follow_renames() RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE t record;
BEGIN
  FOR t IN SELECT tt.table_schema AS old_schema, tt.table_name AS old_name, n.nspname, c.relname, tt.relid
             FROM meshhook_limits.tracked_tables tt
             JOIN pg_catalog.pg_class c ON c.oid = tt.relid
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
            WHERE (n.nspname, c.relname) IS DISTINCT FROM (tt.table_schema, tt.table_name)
              AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                           WHERE g.tgrelid = tt.relid AND g.tgname = 'meshhook_limits_storage_ins') LOOP
    UPDATE meshhook_limits.storage_usage u SET table_schema = t.nspname, table_name = t.relname
     WHERE u.table_schema = t.old_schema AND u.table_name = t.old_name;
    UPDATE meshhook_limits.tracked_tables tt SET table_schema = t.nspname, table_name = t.relname
     WHERE tt.relid = t.relid;
  END LOOP;
END
$$;
CREATE EVENT TRIGGER meshhook_limits_storage_drop ON sql_drop
  EXECUTE FUNCTION meshhook_limits._storage_on_drop();

-- Renames of a tracked table (or its schema move) and of its tenant column
-- are followed; dropping or retyping the tenant column is refused; a tracked
-- table may not become a partition (writes through its new parent would not
-- count). New partitions of a tracked table get its triggers, and any ALTER
-- TABLE of a tracked table (a column with a default, a rewrite, an attached
-- or detached partition) counts it again.
CREATE FUNCTION meshhook_limits._storage_on_alter() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE c record; t record; cur record; col name; typ regtype; root oid; m record;
BEGIN
  PERFORM meshhook_limits._storage_follow_renames();
  SELECT tt.table_schema, tt.table_name INTO t
    FROM meshhook_limits.tracked_tables tt JOIN pg_catalog.pg_class r ON r.oid = tt.relid
   WHERE r.relispartition LIMIT 1;
  IF FOUND THEN
    RAISE EXCEPTION 'tracked table %.% cannot become a partition', quote_ident(t.table_schema), quote_ident(t.table_name)
      USING ERRCODE = '55000',
            HINT = 'run meshhook_limits.untrack_storage on it, attach it, then track_storage its partitioned table';
  END IF;
  FOR c IN SELECT DISTINCT x.objid, x.command_tag FROM pg_catalog.pg_event_trigger_ddl_commands() x
            WHERE x.object_type IN ('table', 'table column') LOOP
    root := coalesce(pg_catalog.pg_partition_root(c.objid), c.objid);
    SELECT * INTO t FROM meshhook_limits.tracked_tables tt WHERE tt.relid = root;
    CONTINUE WHEN NOT FOUND;
    IF root <> c.objid THEN
      PERFORM meshhook_limits._storage_triggers(c.objid::regclass, t.tenant_column, true);
      CONTINUE;
    END IF;
    SELECT n.nspname, r.relname INTO cur
      FROM pg_catalog.pg_class r JOIN pg_catalog.pg_namespace n ON n.oid = r.relnamespace WHERE r.oid = c.objid;
    SELECT a.attname, a.atttypid::regtype INTO col, typ FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = c.objid AND a.attnum = t.tenant_attnum AND NOT a.attisdropped;
    IF col IS NULL OR typ <> 'uuid'::regtype THEN
      RAISE EXCEPTION 'column % is the tenant column of tracked table %.%', quote_ident(t.tenant_column),
                      quote_ident(cur.nspname), quote_ident(cur.relname)
        USING ERRCODE = '55000', HINT = 'run meshhook_limits.untrack_storage on the table first';
    END IF;
    -- (The table's own renames were followed above, by _storage_follow_renames.)
    IF col IS DISTINCT FROM t.tenant_column THEN
      UPDATE meshhook_limits.tracked_tables tt SET tenant_column = col WHERE tt.relid = c.objid;
    END IF;
    IF c.command_tag = 'ALTER TABLE' THEN
      FOR m IN SELECT p.relid FROM pg_catalog.pg_partition_tree(root) p WHERE p.relid <> root LOOP
        PERFORM meshhook_limits._storage_triggers(m.relid, col, true);
      END LOOP;
      PERFORM meshhook_limits._storage_recount(root);
    END IF;
  END LOOP;
END
$$;
CREATE EVENT TRIGGER meshhook_limits_storage_alter ON ddl_command_end
  WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'ALTER INDEX', 'ALTER SCHEMA', 'ALTER VIEW', 'ALTER SEQUENCE',
               'ALTER MATERIALIZED VIEW', 'ALTER FOREIGN TABLE')
  EXECUTE FUNCTION meshhook_limits._storage_on_alter();

-- ---------------------------------------------------------------------------
-- Session limits: hold a tenant's SQL to its limits with PostgreSQL's own
-- settings, for the current transaction only.
CREATE FUNCTION meshhook_limits.apply_session_limits(tenant_id uuid)
RETURNS TABLE(setting text, value text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE r record;
BEGIN
  PERFORM meshhook_limits.require_tenant_access(apply_session_limits.tenant_id);
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
