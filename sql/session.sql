-- meshhook_limits: Session limits: statement_timeout, work_mem and temp_file_limit from a
-- tenant's limits.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

-- Session limits: hold a tenant's SQL to its limits with PostgreSQL's own
-- settings, for the current transaction only.
CREATE FUNCTION meshhook_limits.apply_session_limits(tenant_id uuid)
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
