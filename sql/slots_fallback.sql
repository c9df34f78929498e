-- meshhook_limits: Execution slots without preloading: rows of fallback_slots instead of the
-- shared-memory table, serialised per tenant on its row of fallback_tenants.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

-- Slots without shared_preload_libraries: the same contract on a table.
-- Slower (it writes WAL) but durable; the tenant's row of fallback_tenants
-- serialises admission, so the count and the insert cannot interleave.
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
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_lock(uuid) FROM PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_reap(uuid) FROM PUBLIC;

CREATE FUNCTION meshhook_limits._fallback_acquire(p_tenant uuid, p_project uuid, p_run_id text, p_lease_micros bigint)
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
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_acquire(uuid, uuid, text, bigint) FROM PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_heartbeat(uuid, bigint) FROM PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._fallback_release(uuid, bigint) FROM PUBLIC;
