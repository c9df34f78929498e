-- meshhook_limits 0.1.0 → 0.2.0 (ALTER EXTENSION meshhook_limits UPDATE).
-- Hardening: definer code never runs code of less trusted roles (queue and
-- tracked tables are read as their owner; row sizes without casts; Realtime
-- only when it is the real one); storage counts that do not depend on
-- session settings, partitioned tables, recounts after schema changes.
-- tests/test_upgrade.py proves the result equals a fresh 0.2.0 install.

CREATE FUNCTION meshhook_limits."_read_as_owner"(
	"rel" oid, /* pg_sys :: Oid */
	"query" TEXT, /* & str */
	"at" timestamp with time zone DEFAULT NULL, /* Option < TimestampWithTimeZone > */
	"window" interval DEFAULT NULL /* Option < Interval > */
) RETURNS jsonb /* Option < JsonB > */
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_read_as_owner_wrapper';

CREATE FUNCTION meshhook_limits._row_bytes(record) RETURNS bigint
LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_row_bytes';
COMMENT ON FUNCTION meshhook_limits._row_bytes(record) IS
  'Bytes a row counts for storage quotas: the sum of its values'' uncompressed sizes, independent of session settings.';

CREATE FUNCTION meshhook_limits."_caller_has_privs_of"(
	"role" oid /* pg_sys :: Oid */
) RETURNS bool /* bool */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_caller_has_privs_of_wrapper';

-- Validation shared by set_limit and set_plan_limit. Raises 22023.
CREATE OR REPLACE FUNCTION meshhook_limits._validate_limit(p_resource text, p_limit numeric, p_warn numeric,
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
  builtin := EXISTS (SELECT 1 FROM meshhook_limits.builtin_resources b WHERE b.resource = p_resource)
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
CREATE OR REPLACE FUNCTION meshhook_limits.record_usage(tenant_id uuid, resource text, amount numeric,
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
-- Rate rules: the key's own and the tenant's, both enforced (src/rate.rs).
DROP FUNCTION meshhook_limits._rate_rule(uuid, text);
-- The rates a check of a key spends from: the key's own
-- (requests_per_second.<key>, when any scope sets it) and the tenant's
-- (requests_per_second, across all its keys). Burst defaults to one
-- second's worth. Always one row; NULL where no rule applies.
CREATE OR REPLACE FUNCTION meshhook_limits._rate_rules(p_tenant uuid, p_key text)
RETURNS TABLE(key_rate float8, key_burst float8, tenant_rate float8, tenant_burst float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT max(r.limit_value) FILTER (WHERE r.resource <> 'requests_per_second')::float8,
         max(coalesce(r.burst, GREATEST(r.limit_value, 1))) FILTER (WHERE r.resource <> 'requests_per_second')::float8,
         max(r.limit_value) FILTER (WHERE r.resource = 'requests_per_second')::float8,
         max(coalesce(r.burst, GREATEST(r.limit_value, 1))) FILTER (WHERE r.resource = 'requests_per_second')::float8
    FROM meshhook_limits._resolve(p_tenant, NULL) r
   WHERE r.resource IN ('requests_per_second.' || p_key, 'requests_per_second')
$$;
-- One row per tenant that took a fallback slot: a tenant's acquires
-- serialise on it (FOR UPDATE). Nobody else can read, let alone lock, it;
-- an advisory lock any role can take would let a role stall a tenant.
CREATE TABLE meshhook_limits.fallback_tenants (tenant_id uuid PRIMARY KEY);
ALTER TABLE meshhook_limits.fallback_tenants ENABLE ROW LEVEL SECURITY;

CREATE OR REPLACE FUNCTION meshhook_limits._fallback_lock(p_tenant uuid) RETURNS void
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
CREATE OR REPLACE FUNCTION meshhook_limits._fallback_reap(p_tenant uuid) RETURNS bigint
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
-- Supabase Realtime's realtime.send(jsonb, text, text, boolean), when it is
-- the real one: the function and its schema belong to a superuser or to
-- supabase_realtime_admin (who installs Realtime on Supabase), and no other
-- function named send sits beside it. A send created by anyone else (a role
-- with CREATE on the database, on a server without Realtime) is never
-- called: it would run as the definer of _emit.
CREATE OR REPLACE FUNCTION meshhook_limits._realtime_send_trusted() RETURNS boolean
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
CREATE OR REPLACE FUNCTION meshhook_limits._emit(p_event text, p_tenant uuid, p_resource text, p_value numeric,
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
CREATE OR REPLACE FUNCTION meshhook_limits.install_realtime_policy() RETURNS boolean
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
-- Apply per-tenant byte deltas of one statement on one table; refuse growth
-- past storage_bytes (53400), announce crossings of the warn ratio.
CREATE OR REPLACE FUNCTION meshhook_limits._storage_apply(p_schema name, p_table name, p_tenant uuid, p_delta bigint)
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
CREATE OR REPLACE FUNCTION meshhook_limits._tracked(p_relid oid, p_schema name, p_table name)
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
CREATE OR REPLACE FUNCTION meshhook_limits._storage_trigger() RETURNS trigger
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
CREATE OR REPLACE FUNCTION meshhook_limits._storage_count(p_relid oid, p_column name) RETURNS jsonb
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
  SELECT meshhook_limits._read_as_owner(p_relid, pg_catalog.format(
    'SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(''t'', s.t, ''b'', s.b)), ''[]'')
       FROM (SELECT x.%1$I AS t, pg_catalog.sum(meshhook_limits._row_bytes(x))::bigint AS b
               FROM %2$s x WHERE x.%1$I IS NOT NULL GROUP BY 1) s', p_column, p_relid::regclass))
$$;
-- Count a tracked table again from its rows (after a schema change that
-- changes row sizes, an attach or detach of a partition, a TRUNCATE of one
-- partition). Never refuses: the rows are already there.
CREATE OR REPLACE FUNCTION meshhook_limits._storage_recount(p_relid oid) RETURNS void
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
CREATE OR REPLACE FUNCTION meshhook_limits._storage_triggers(p_rel regclass, p_column name, p_create boolean)
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
CREATE OR REPLACE FUNCTION meshhook_limits.track_storage(tbl regclass, tenant_column name)
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
CREATE OR REPLACE FUNCTION meshhook_limits.untrack_storage(tbl regclass)
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
CREATE OR REPLACE FUNCTION meshhook_limits._storage_forget(p_schema name, p_table name, p_untrack boolean DEFAULT true)
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
CREATE OR REPLACE FUNCTION meshhook_limits._storage_on_drop() RETURNS event_trigger
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
CREATE OR REPLACE FUNCTION meshhook_limits._storage_follow_renames() RETURNS void
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
-- Renames of a tracked table (or its schema move) and of its tenant column
-- are followed; dropping or retyping the tenant column is refused; a tracked
-- table may not become a partition (writes through its new parent would not
-- count). New partitions of a tracked table get its triggers, and any ALTER
-- TABLE of a tracked table (a column with a default, a rewrite, an attached
-- or detached partition) counts it again.
CREATE OR REPLACE FUNCTION meshhook_limits._storage_on_alter() RETURNS event_trigger
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
DROP EVENT TRIGGER meshhook_limits_storage_alter;
CREATE EVENT TRIGGER meshhook_limits_storage_alter ON ddl_command_end
  WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'ALTER INDEX', 'ALTER SCHEMA', 'ALTER VIEW', 'ALTER SEQUENCE',
               'ALTER MATERIALIZED VIEW', 'ALTER FOREIGN TABLE')
  EXECUTE FUNCTION meshhook_limits._storage_on_alter();

-- ---------------------------------------------------------------------------
-- Session limits: hold a tenant's SQL to its limits with PostgreSQL's own
-- settings, for the current transaction only.
CREATE OR REPLACE FUNCTION meshhook_limits.apply_session_limits(tenant_id uuid)
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
-- Waiting jobs per pg-boss queue (states before 'active': created, retry),
-- read through pg-boss's own partial index job_i5 (... WHERE state <
-- 'active'), index-only: the cost follows the waiting jobs, not the table.
-- The planner is told so: on a fresh or bloated job table its statistics
-- lead it to a (parallel) sequential or bitmap scan of the whole heap, and a
-- plain index scan also marks the dead entries it meets, so the next tick
-- skips them. (The enum comparison, not a cast, matches the index predicate.)
CREATE OR REPLACE FUNCTION meshhook_limits._pgboss_waiting()
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
-- A sample that could not be taken (a locked or broken queue table) is not a
-- recovery: the queue's last sample stands, with its old sampled values.
CREATE OR REPLACE FUNCTION meshhook_limits._carry_queue_samples(p_at timestamptz, p_source text, p_queue text DEFAULT NULL)
RETURNS void LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
  INSERT INTO meshhook_limits.queue_samples
    (sampled_at, source, queue, queued, active, failed_recent, oldest_age, p50_ms, p95_ms, throughput_per_min,
     error_rate, status, stats_at)
  SELECT p_at, p.source, p.queue, p.queued, p.active, p.failed_recent, p.oldest_age, p.p50_ms, p.p95_ms,
         p.throughput_per_min, p.error_rate, p.status, p.stats_at
    FROM meshhook_limits._latest_queue_samples() p
   WHERE p.source = p_source AND (p_queue IS NULL OR p.queue = p_queue)
$$;
-- One sample of every pgmq queue in pgmq.meta: queued = visible, active =
-- read and still invisible, so queued + active = pgmq.metrics().queue_length.
-- p_full: also the archive's statistics of the window (p50/p95, throughput);
-- otherwise those are carried from the previous sample with their stats_at.
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
-- pending → firing after for_duration (alert.firing), firing → resolved once
-- the value is back past resolve_threshold (alert.resolved). A series that
-- disappears resolves too. One event per transition: no storms.
CREATE OR REPLACE FUNCTION meshhook_limits._evaluate_alerts(p_at timestamptz) RETURNS bigint
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
-- The worker records a failed tick (its role may be one that cannot write
-- the extension's tables: meshhook_limits.worker_role).
CREATE OR REPLACE FUNCTION meshhook_limits._record_tick_error(p_error text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  PERFORM meshhook_limits.require_admin_access('record a tick error');
  UPDATE meshhook_limits.worker_state SET errors = errors + 1, last_error = left(p_error, 1000);
END
$$;
-- Alert rules: admins manage them with plain DML through this function.
CREATE OR REPLACE FUNCTION meshhook_limits.set_alert_rule(name text, metric text, threshold numeric,
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
CREATE OR REPLACE FUNCTION meshhook_limits.set_queue_thresholds(source text DEFAULT '*', queue text DEFAULT NULL,
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
-- security_invoker: the caller's row-level security applies (tenants see none).
ALTER VIEW meshhook_limits.effective_alert_rules SET (security_invoker = true);

REVOKE EXECUTE ON FUNCTION meshhook_limits._read_as_owner(oid, text, timestamptz, interval) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._realtime_send_trusted() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_count(oid, name) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_recount(oid) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_triggers(regclass, name, boolean) FROM PUBLIC;

-- 0.1.0 counted a row as the length of its text form; count every tracked
-- table again as 0.2.0 does, so rows stored before the upgrade subtract
-- exactly what they add.
SELECT meshhook_limits._storage_recount(t.relid) FROM meshhook_limits.tracked_tables t WHERE t.relid IS NOT NULL;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_trigger() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._rate_rules(uuid, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._carry_queue_samples(timestamptz, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._record_tick_error(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits._record_tick_error(text) TO meshhook_limits_admin;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_follow_renames() FROM PUBLIC;

-- pg_dump carries events (and their ids) and alert states as well.
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.events', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.events_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.alert_states', '');

-- Every internal function is revoked from PUBLIC but the three definer
-- functions the C entry points call as the caller, and _row_bytes.
REVOKE EXECUTE ON FUNCTION meshhook_limits._limits_changed_trigger() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._validate_limit(text, numeric, numeric, interval, numeric) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._require_plan(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._status(numeric, numeric, numeric) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_on_alter() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._storage_on_drop() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._latest_queue_samples() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_status(text, text, bigint, interval, numeric) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pgboss(timestamptz, interval, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pgmq(timestamptz, interval, boolean) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pool(timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._compare(numeric, text, numeric) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._evaluate_alerts(timestamptz) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._series(text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._caller_has_privs_of(oid) FROM PUBLIC;

-- One window start for every meter.
CREATE OR REPLACE FUNCTION meshhook_limits._window_start(win interval, at timestamptz DEFAULT pg_catalog.now())
RETURNS timestamptz LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT pg_catalog.to_timestamp(pg_catalog.floor(extract(epoch FROM at) / extract(epoch FROM win))
                                 * extract(epoch FROM win))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._window_start(interval, timestamptz) FROM PUBLIC;
CREATE OR REPLACE FUNCTION meshhook_limits._usage_ratios(p_tenants uuid[])
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

-- One retry_after rule for both slot paths (src/slots/mod.rs).
CREATE FUNCTION meshhook_limits._retry_after(earliest_end timestamptz, now timestamptz) RETURNS interval
STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_retry_after_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._retry_after(timestamptz, timestamptz) FROM PUBLIC;
CREATE OR REPLACE FUNCTION meshhook_limits._fallback_acquire(p_tenant uuid, p_project uuid, p_run_id text, p_lease_micros bigint)
RETURNS TABLE(granted boolean, slot_id uuid, reason text, in_use bigint, limit_value bigint,
              deadline timestamptz, lease_expires_at timestamptz, retry_after interval)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  lim record; tc bigint; pc bigint; ends timestamptz; dl timestamptz; le timestamptz;
  now_ts timestamptz := pg_catalog.clock_timestamp();
  new_id uuid := pg_catalog.gen_random_uuid();
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
      NULL::timestamptz, meshhook_limits._retry_after(ends, now_ts);
    RETURN;
  END IF;
  IF p_project IS NOT NULL AND lim.project_cap IS NOT NULL AND pc >= lim.project_cap THEN
    SELECT min(LEAST(s.lease_expires_at, coalesce(s.deadline, 'infinity'))) INTO ends
      FROM meshhook_limits.fallback_slots s WHERE s.tenant_id = p_tenant AND s.project_id = p_project;
    RETURN QUERY SELECT false, NULL::uuid, 'project_limit'::text, pc, lim.project_cap, NULL::timestamptz,
      NULL::timestamptz, meshhook_limits._retry_after(ends, now_ts);
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


-- Issue 12: claiming jobs with their slots, fairly. Slots can carry a
-- concurrency key and a cost; concurrent_executions.<key>,
-- concurrent_executions_total and fair_share_weight are built in.
UPDATE meshhook_limits.builtin_resources
   SET enforced_by = 'acquire_execution_slot, claim_jobs',
       description = 'running executions at once; concurrent_executions.<key> for one concurrency key'
 WHERE resource = 'concurrent_executions';
INSERT INTO meshhook_limits.builtin_resources VALUES
  ('concurrent_executions_total', 'acquire_execution_slot, claim_jobs', 'running executions of all tenants together (global only)'),
  ('fair_share_weight', 'claim_jobs', 'a tenant''s share of contended capacity, relative to others (default 1)');

DROP FUNCTION meshhook_limits._slot_limits(uuid, uuid);
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

CREATE OR REPLACE FUNCTION meshhook_limits._validate_limit(p_resource text, p_limit numeric, p_warn numeric,
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

CREATE OR REPLACE FUNCTION meshhook_limits.set_limit(resource text, limit_value numeric, tenant_id uuid DEFAULT NULL,
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

CREATE OR REPLACE FUNCTION meshhook_limits.set_plan_limit(plan text, resource text, limit_value numeric,
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

CREATE FUNCTION meshhook_limits._claim_slot(
	"tenant_id" uuid, /* Option < Uuid > */
	"project_id" uuid, /* Option < Uuid > */
	"concurrency_key" TEXT, /* Option < & str > */
	"cost" INT, /* Option < i32 > */
	"lease" interval, /* Option < Interval > */
	"run_id" TEXT /* Option < & str > */
) RETURNS TABLE (
	"slot_id" uuid,  /* Option < Uuid > */
	"reason" TEXT,  /* Option < String > */
	"lease_expires_at" timestamp with time zone  /* Option < Ts > */
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_claim_slot_wrapper';

CREATE FUNCTION meshhook_limits._claim_shares(
	"tenants" uuid[] /* :: std :: option :: Option < Vec < Option < Uuid > > > */
) RETURNS TABLE (
	"tenant_id" uuid,  /* Uuid */
	"in_use" bigint,  /* i64 */
	"weight" double precision,  /* f64 */
	"has_room" bool  /* bool */
)
VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_claim_shares_wrapper';

CREATE FUNCTION meshhook_limits._claimed_slots() RETURNS TABLE (
	"slot_id" uuid,  /* Uuid */
	"binding_id" bigint,  /* i64 */
	"job_id" TEXT,  /* String */
	"acquired_at" timestamp with time zone,  /* Ts */
	"tenant_id" uuid,  /* Uuid */
	"cost" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_claimed_slots_wrapper';

CREATE FUNCTION meshhook_limits._renew_slots(
	"slot_ids" uuid[] /* :: std :: option :: Option < Vec < Option < Uuid > > > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_renew_slots_wrapper';

CREATE FUNCTION meshhook_limits._slot_counts(
	"tenant_id" uuid, /* Option < Uuid > */
	"project_id" uuid, /* Option < Uuid > */
	"concurrency_key" TEXT /* Option < & str > */
) RETURNS TABLE (
	"tenant_in_use" bigint,  /* i64 */
	"project_in_use" bigint,  /* i64 */
	"key_in_use" bigint,  /* i64 */
	"total_in_use" bigint  /* i64 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_slot_counts_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._claimed_slots() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._renew_slots(uuid[]) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION meshhook_limits._slot_counts(uuid, uuid, text) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._claim_ended()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', '_claim_ended_wrapper';
REVOKE EXECUTE ON FUNCTION meshhook_limits._claim_ended() FROM PUBLIC;

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

CREATE TABLE meshhook_limits.queue_bindings (
  id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
  source text NOT NULL CHECK (source IN ('pgboss', 'pgmq')),
  queue text NOT NULL,
  -- Paths into the job's JSON (pg-boss data, pgmq message), as text[] for #>>.
  tenant_path text[] NOT NULL,
  project_path text[],
  key_path text[],
  cost_path text[],
  -- The queue table and the index bind_queue created on it.
  relation regclass NOT NULL,
  index_name name NOT NULL,
  created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
  PRIMARY KEY (source, queue)
);
SELECT pg_catalog.pg_extension_config_dump('meshhook_limits.queue_bindings', '');
ALTER TABLE meshhook_limits.queue_bindings ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.queue_bindings FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.queue_bindings TO PUBLIC;

-- 'a.b.c' -> '{a,b,c}'; 22023 for anything else.
CREATE FUNCTION meshhook_limits._json_path(p_path text, p_what text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  IF p_path IS NULL THEN
    RETURN NULL;
  END IF;
  IF p_path !~ '^[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63}){0,7}$' THEN
    RAISE EXCEPTION 'invalid % %', p_what, quote_literal(left(p_path, 80))
      USING ERRCODE = '22023',
            HINT = 'a path is up to 8 dot-separated keys of letters, digits, _ and -, e.g. ''tenant_id'' or ''meta.tenant''';
  END IF;
  RETURN pg_catalog.string_to_array(p_path, '.');
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._json_path(text, text) FROM PUBLIC;

-- The table of a queue, checked: a plain or partitioned table whose JSON
-- column is jsonb (never a view or a type of someone else's). 22023 when
-- the queue system or the queue does not exist.
CREATE FUNCTION meshhook_limits._queue_relation(p_source text, p_queue text) RETURNS regclass
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  rel regclass;
  col text := CASE p_source WHEN 'pgboss' THEN 'data' ELSE 'message' END;
BEGIN
  IF p_source IS NULL OR p_source NOT IN ('pgboss', 'pgmq') THEN
    RAISE EXCEPTION 'unknown queue source %', coalesce(quote_literal(left(p_source, 40)), 'NULL')
      USING ERRCODE = '22023', HINT = 'source is ''pgboss'' or ''pgmq''';
  END IF;
  IF p_queue IS NULL OR p_queue = '' OR length(p_queue) > 200 THEN
    RAISE EXCEPTION 'queue must be a queue name' USING ERRCODE = '22023',
      HINT = 'pass the name the queue was created with (1 to 200 characters)';
  END IF;
  IF p_source = 'pgboss' THEN
    rel := pg_catalog.to_regclass('pgboss.job');
    IF rel IS NULL OR pg_catalog.to_regclass('pgboss.queue') IS NULL THEN
      RAISE EXCEPTION 'pg-boss is not installed in this database' USING ERRCODE = '22023',
        HINT = 'start pg-boss (version 11) against this database first';
    END IF;
    -- pgboss.queue is read as its owner: it is another role's table.
    IF NOT (meshhook_limits._read_as_owner(pg_catalog.to_regclass('pgboss.queue'),
              pg_catalog.format('SELECT pg_catalog.to_jsonb(EXISTS (SELECT 1 FROM pgboss.queue q WHERE q.name = %L))',
                                p_queue)))::text::boolean THEN
      RAISE EXCEPTION 'unknown pg-boss queue %', quote_literal(left(p_queue, 80)) USING ERRCODE = '22023',
        HINT = 'create it with boss.createQueue(name) first';
    END IF;
  ELSE
    IF pg_catalog.to_regclass('pgmq.meta') IS NULL THEN
      RAISE EXCEPTION 'pgmq is not installed in this database' USING ERRCODE = '22023',
        HINT = 'install pgmq (CREATE EXTENSION pgmq, or its SQL) and create the queue first';
    END IF;
    IF NOT (meshhook_limits._read_as_owner(pg_catalog.to_regclass('pgmq.meta'),
              pg_catalog.format('SELECT pg_catalog.to_jsonb(EXISTS (SELECT 1 FROM pgmq.meta m WHERE m.queue_name = %L))',
                                p_queue)))::text::boolean THEN
      RAISE EXCEPTION 'unknown pgmq queue %', quote_literal(left(p_queue, 80)) USING ERRCODE = '22023',
        HINT = 'create it with pgmq.create(name) first';
    END IF;
    rel := pg_catalog.to_regclass(pg_catalog.format('pgmq.%I', 'q_' || pg_catalog.lower(p_queue)));
    IF rel IS NULL THEN
      RAISE EXCEPTION 'pgmq queue % has no table', quote_literal(left(p_queue, 80)) USING ERRCODE = '22023';
    END IF;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = col AND NOT a.attisdropped
                  WHERE c.oid = rel AND c.relkind IN ('r', 'p') AND a.atttypid = 'pg_catalog.jsonb'::pg_catalog.regtype) THEN
    RAISE EXCEPTION '% is not a queue table meshhook_limits can claim from', rel USING ERRCODE = '22023',
      HINT = 'it must be a table with a jsonb column ' || col;
  END IF;
  RETURN rel;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._queue_relation(text, text) FROM PUBLIC;

-- The JSON text at a path of a job, as SQL (over the alias j, or none for
-- the index): the index expression and every query that must use the
-- index spell it the same way.
CREATE FUNCTION meshhook_limits._path_sql(p_source text, p_path text[], p_alias text DEFAULT 'j.') RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT CASE WHEN p_path IS NULL THEN 'NULL::text'
    ELSE pg_catalog.format('(%s%I OPERATOR(pg_catalog.#>>) %L::text[])', p_alias,
                           CASE p_source WHEN 'pgboss' THEN 'data' ELSE 'message' END, p_path) END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._path_sql(text, text[], text) FROM PUBLIC;

-- The tenant of a job as the claim index holds it: the text at the tenant
-- path, NULL when longer than 64 bytes (no tenant id is; and an index entry
-- has a size limit a job must not be able to break), in the "C" collation
-- (byte order: the database's own collation costs a strcoll per comparison
-- in every probe).
CREATE FUNCTION meshhook_limits._tenant_sql(p_source text, p_path text[], p_alias text DEFAULT 'j.') RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
  SELECT pg_catalog.format('((CASE WHEN pg_catalog.octet_length(%1$s) OPERATOR(pg_catalog.<=) 64 THEN %1$s END) COLLATE pg_catalog."C")',
                           meshhook_limits._path_sql(p_source, p_path, p_alias))
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._tenant_sql(text, text[], text) FROM PUBLIC;

CREATE FUNCTION meshhook_limits.bind_queue(source text, queue text, tenant_path text DEFAULT 'tenant_id',
    project_path text DEFAULT NULL, key_path text DEFAULT NULL, cost_path text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  rel regclass;
  tp text[]; pp text[]; kp text[]; cp text[];
  b meshhook_limits.queue_bindings;
  idx name;
  tenant_sql text;
BEGIN
  PERFORM meshhook_limits.require_admin_access('bind queues');
  rel := meshhook_limits._queue_relation(bind_queue.source, bind_queue.queue);
  IF bind_queue.tenant_path IS NULL THEN
    RAISE EXCEPTION 'tenant_path must not be NULL' USING ERRCODE = '22023';
  END IF;
  tp := meshhook_limits._json_path(bind_queue.tenant_path, 'tenant_path');
  pp := meshhook_limits._json_path(bind_queue.project_path, 'project_path');
  kp := meshhook_limits._json_path(bind_queue.key_path, 'key_path');
  cp := meshhook_limits._json_path(bind_queue.cost_path, 'cost_path');
  SELECT * INTO b FROM meshhook_limits.queue_bindings qb
   WHERE qb.source = bind_queue.source AND qb.queue = bind_queue.queue FOR UPDATE;
  IF FOUND THEN
    IF b.tenant_path = tp AND b.relation = rel THEN
      UPDATE meshhook_limits.queue_bindings qb SET project_path = pp, key_path = kp, cost_path = cp
       WHERE qb.id = b.id;
      RETURN;
    END IF;
    PERFORM meshhook_limits.unbind_queue(bind_queue.source, bind_queue.queue);
  END IF;
  INSERT INTO meshhook_limits.queue_bindings (source, queue, tenant_path, project_path, key_path, cost_path,
                                              relation, index_name)
  VALUES (bind_queue.source, bind_queue.queue, tp, pp, kp, cp, rel, '-')
  RETURNING * INTO b;
  idx := 'meshhook_claim_' || b.id;
  tenant_sql := meshhook_limits._tenant_sql(bind_queue.source, tp, '');
  -- The index orders each tenant's waiting jobs as the queue's own fetch
  -- does. Built in this transaction: writers of the queue wait meanwhile.
  -- The triggers end a claimed job's slot in the transaction that ends the
  -- job (_claim_ended: shared memory only, no SQL in the queue's statements).
  IF bind_queue.source = 'pgboss' THEN
    EXECUTE pg_catalog.format(
      'CREATE INDEX %I ON pgboss.job (%s, priority DESC, created_on, id) WHERE name = %L AND state OPERATOR(pg_catalog.<) %L::pgboss.job_state',
      idx, tenant_sql, bind_queue.queue, 'active');
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
    EXECUTE pg_catalog.format('CREATE INDEX %I ON %s (%s, msg_id)', idx, rel, tenant_sql);
    EXECUTE pg_catalog.format(
      'CREATE TRIGGER %I AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION meshhook_limits._claim_ended(%L, %L)',
      idx || '_deleted', rel, b.id, 'pgmq');
  END IF;
  UPDATE meshhook_limits.queue_bindings qb SET index_name = idx WHERE qb.id = b.id;
END
$$;
COMMENT ON FUNCTION meshhook_limits.bind_queue(text, text, text, text, text, text) IS
  'Admin: where a pg-boss or pgmq queue''s jobs name their tenant, project, concurrency key and cost; adds the claim index. See docs/claiming.md.';

CREATE FUNCTION meshhook_limits.unbind_queue(source text, queue text)
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
  'Admin: forget a queue binding and drop its claim index. Claimed jobs keep their slots until they end.';

-- The binding, for claim_jobs (which runs as its caller, an admin).
-- EXECUTE stays with PUBLIC, as for _claim_queries, _claim_slot and
-- _claim_shares: claim_jobs calls them as its caller, and each refuses any
-- caller but an admin.
CREATE FUNCTION meshhook_limits._queue_binding(p_source text, p_queue text)
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
  RETURN b;
END
$$;

-- The statements claim_jobs (src/claim.rs) runs for a binding, built once
-- per backend and binding and kept as prepared plans:
--   tenants: a skip scan over the claim index, one index probe per tenant
--            with waiting jobs: (tenant text, when its next job was queued);
--            and a row with a NULL tenant when jobs name no tenant;
--   head:    a tenant's next job in the queue's own order, locked, skipping
--            the jobs this call passed over or claimed ($1 tenant text,
--            $2 text[] job ids): (id, data, project, key, cost, gen, queued
--            at, whether its queue's policy allows one active job per key);
--   take:    what the queue's own fetch does to the jobs it takes, for the
--            call's claimed jobs at once (a job of a one-active policy at
--            once, so the next head sees it active) ($1 text[] job ids;
--            pgmq: $2 the visibility timeout).
-- Every path expression is spelt as in the index (_path_sql), so the planner
-- uses it.
CREATE FUNCTION meshhook_limits._claim_queries(p_binding bigint)
RETURNS TABLE(tenants_q text, head_q text, take_q text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  b meshhook_limits.queue_bindings;
  t_sql text; p_sql text; k_sql text; c_sql text;
  waiting text;   -- the queue's waiting jobs, as in the index predicate
  order_by text;  -- the queue's own order within a tenant
  at_sql text;    -- when a job was queued
  rel text;
BEGIN
  PERFORM meshhook_limits.require_admin_access('claim jobs');
  SELECT * INTO STRICT b FROM meshhook_limits.queue_bindings qb WHERE qb.id = p_binding;
  t_sql := meshhook_limits._tenant_sql(b.source, b.tenant_path);
  p_sql := meshhook_limits._path_sql(b.source, b.project_path);
  k_sql := meshhook_limits._path_sql(b.source, b.key_path);
  c_sql := meshhook_limits._path_sql(b.source, b.cost_path);
  IF b.source = 'pgboss' THEN
    rel := 'pgboss.job';
    waiting := pg_catalog.format('j.name = %L AND j.state < %L', b.queue, 'active');
    order_by := pg_catalog.format('%s, j.priority DESC, j.created_on, j.id', t_sql);
    at_sql := 'j.created_on';
  ELSE
    rel := b.relation::text;
    waiting := 'true';
    order_by := pg_catalog.format('%s, j.msg_id', t_sql);
    at_sql := 'j.enqueued_at';
  END IF;
  tenants_q := pg_catalog.format($q$
    WITH RECURSIVE t(tenant, at) AS (
      (SELECT %1$s, %5$s FROM %2$s j WHERE %3$s AND %1$s IS NOT NULL ORDER BY %4$s LIMIT 1)
      UNION ALL
      SELECT x.tenant, x.at FROM t, LATERAL (
        SELECT %1$s AS tenant, %5$s AS at FROM %2$s j WHERE %3$s AND %1$s > t.tenant ORDER BY %4$s LIMIT 1) x)
    SELECT tenant, at FROM t
    UNION ALL
    (SELECT NULL, %5$s FROM %2$s j WHERE %3$s AND %1$s IS NULL LIMIT 1) $q$,
    t_sql, rel, waiting, order_by, at_sql);
  IF b.source = 'pgboss' THEN
    -- Queues whose policy allows one active job per singleton key (pg-boss's
    -- unique indexes job_i2, job_i3, job_i6): a job whose key has one
    -- active is not taken, as boss.fetch() could not take it.
    head_q := pg_catalog.format($q$
      SELECT j.id::text AS id, j.data AS data, %1$s AS project, %2$s AS key, %3$s AS cost, NULL::text AS gen,
             j.created_on AS at, coalesce(j.policy IN ('singleton', 'stately', 'exclusive'), false) AS one_active
        FROM pgboss.job j
       WHERE %4$s AND %5$s = $1 AND j.start_after < pg_catalog.now() AND j.id::text <> ALL ($2)
         AND (j.policy IS NULL OR j.policy NOT IN ('singleton', 'stately', 'exclusive')
              OR NOT EXISTS (SELECT 1 FROM pgboss.job a
                              WHERE a.name = j.name AND a.state = 'active' AND a.policy = j.policy
                                AND coalesce(a.singleton_key, '') = coalesce(j.singleton_key, '')))
       ORDER BY %6$s LIMIT 1 FOR UPDATE OF j SKIP LOCKED $q$,
      p_sql, k_sql, c_sql, waiting, t_sql, order_by);
    -- What boss.fetch() does to a job it takes (pg-boss 11).
    take_q := pg_catalog.format($q$
      UPDATE pgboss.job j SET state = 'active', started_on = pg_catalog.now(),
             retry_count = CASE WHEN j.started_on IS NOT NULL THEN j.retry_count + 1 ELSE j.retry_count END
       WHERE j.name = %L AND j.id = ANY ($1::uuid[]) $q$, b.queue);
  ELSE
    head_q := pg_catalog.format($q$
      SELECT j.msg_id::text AS id, j.message AS data, %1$s AS project, %2$s AS key, %3$s AS cost,
             (j.read_ct + 1)::text AS gen, j.enqueued_at AS at, false AS one_active FROM %4$s j
       WHERE %5$s = $1 AND j.vt <= pg_catalog.clock_timestamp() AND j.msg_id::text <> ALL ($2)
       ORDER BY %6$s LIMIT 1 FOR UPDATE SKIP LOCKED $q$,
      p_sql, k_sql, c_sql, rel, t_sql, order_by);
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
    -- An unbound queue's claims end with their leases.
    CONTINUE WHEN NOT FOUND;
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
  RETURN ended;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._end_claims() FROM PUBLIC;

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

-- Per bound queue and tenant: waiting jobs, claimed (running) jobs, and what
-- blocks the tenant now (its own or the total limit; a job's project and key
-- limits are checked when it is claimed). Admins and monitors see every
-- tenant; a tenant sees its own rows.
CREATE FUNCTION meshhook_limits.explain_queues(tenant uuid DEFAULT NULL)
RETURNS TABLE(source text, queue text, tenant_id uuid, waiting bigint, running bigint, runnable bigint,
              blocked bigint, blocked_by text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
  me uuid := meshhook_limits.current_tenant();
  v_only uuid := explain_queues.tenant;
  b meshhook_limits.queue_bindings;
  t_sql text;
  w jsonb;
  r record;
  why text;
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
    BEGIN
      w := meshhook_limits._read_as_owner(b.relation, pg_catalog.format($q$
        SELECT coalesce(pg_catalog.jsonb_agg(x), '[]') FROM (
          SELECT %1$s AS tenant, count(*) AS waiting FROM %2$s j
           WHERE %3$s AND %1$s IS NOT NULL %4$s GROUP BY 1) x $q$,
        t_sql, CASE b.source WHEN 'pgboss' THEN 'pgboss.job' ELSE b.relation::text END,
        CASE b.source WHEN 'pgboss' THEN pg_catalog.format('j.name = %L AND j.state < ''active''', b.queue)
                      ELSE 'j.vt <= pg_catalog.clock_timestamp()' END,
        CASE WHEN v_only IS NOT NULL THEN pg_catalog.format('AND %s = %L', t_sql, v_only::text) ELSE '' END));
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'meshhook_limits: reading % queue % failed: %', b.source, b.queue, SQLERRM;
      CONTINUE;
    END;
    -- Tenants with waiting jobs, and tenants with claimed jobs running.
    FOR r IN SELECT coalesce(w.tenant_id, c.tenant_id) AS tenant, coalesce(w.waiting, 0) AS waiting,
                    coalesce(c.running, 0) AS running
               FROM (SELECT x.tenant::uuid AS tenant_id, x.waiting
                       FROM pg_catalog.jsonb_to_recordset(w) x(tenant text, waiting bigint)
                      WHERE x.tenant ~ '^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$') w
               FULL JOIN (SELECT s.tenant_id, sum(s.cost)::bigint AS running
                            FROM meshhook_limits._claimed_slots() s
                           WHERE s.binding_id = b.id AND (v_only IS NULL OR s.tenant_id = v_only)
                           GROUP BY s.tenant_id) c ON c.tenant_id = w.tenant_id
              ORDER BY 2 DESC, 1 LOOP
      SELECT e.resource INTO why FROM meshhook_limits.explain_admission(r.tenant) e
       WHERE e.blocking ORDER BY e.scope = 'total' LIMIT 1;
      source := b.source; queue := b.queue; tenant_id := r.tenant; waiting := r.waiting;
      running := r.running;
      runnable := CASE WHEN why IS NULL THEN r.waiting ELSE 0 END;
      blocked := r.waiting - runnable;
      blocked_by := why;
      RETURN NEXT;
      why := NULL;
    END LOOP;
  END LOOP;
END
$$;
COMMENT ON FUNCTION meshhook_limits.explain_queues(uuid) IS
  'Per bound queue and tenant: waiting, running (claimed), runnable and blocked jobs, and the limit that blocks. Admins see all tenants, a tenant its own.';

CREATE FUNCTION meshhook_limits.claim_jobs(
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
	"data" jsonb  /* Option < JsonB > */
)
VOLATILE PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'claim_jobs_wrapper';
COMMENT ON FUNCTION meshhook_limits.claim_jobs(text, text, integer, interval) IS
  'Claim up to batch jobs whose every limit has room, fairly across tenants, with their slots; the job is taken as the queue''s own fetch takes it. Runs as the caller (an admin worker). See docs/claiming.md.';

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
REVOKE EXECUTE ON FUNCTION meshhook_limits.tick() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION meshhook_limits.tick() TO meshhook_limits_admin;


-- acquire_execution_slot(..., wait => interval): wait for room.
DROP FUNCTION meshhook_limits.acquire_execution_slot(uuid, uuid, text, interval);
CREATE FUNCTION meshhook_limits.acquire_execution_slot(tenant_id uuid, project_id uuid DEFAULT NULL,
    run_id text DEFAULT NULL, lease interval DEFAULT NULL, wait interval DEFAULT NULL)
RETURNS TABLE(granted boolean, slot_id uuid, reason text, in_use bigint, limit_value bigint,
              deadline timestamptz, lease_expires_at timestamptz, retry_after interval)
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'meshhook_limits_acquire_execution_slot';
COMMENT ON FUNCTION meshhook_limits.acquire_execution_slot(uuid, uuid, text, interval, interval) IS
  'Take an execution slot for a tenant (and project), waiting up to wait for room; never raises for a refusal. SECURITY INVOKER: the caller must be the tenant or an admin.';
