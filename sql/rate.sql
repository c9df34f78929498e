-- meshhook_limits: Rate limits: the rules in force for a tenant and key, and the table
-- fallback of the token buckets when the library is not preloaded.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._rate_rules(uuid, text) FROM PUBLIC;

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
REVOKE EXECUTE ON FUNCTION meshhook_limits._rate_state_lock(uuid, text, bigint) FROM PUBLIC;
