-- meshhook_limits: Pool pressure: samples of the server's connections and a pool size to act on.
-- Everything is schema-qualified; SECURITY DEFINER functions pin search_path.

CREATE TABLE meshhook_limits.pool_samples (
  sampled_at timestamptz PRIMARY KEY,
  max_connections int NOT NULL,
  total int NOT NULL,
  active int NOT NULL,
  idle int NOT NULL,
  idle_in_transaction int NOT NULL,
  waiting int NOT NULL,
  utilisation numeric NOT NULL,
  longest_transaction interval,
  status text NOT NULL,
  by_application jsonb NOT NULL,
  by_role jsonb NOT NULL
);
ALTER TABLE meshhook_limits.pool_samples ENABLE ROW LEVEL SECURITY;
CREATE POLICY admin_all ON meshhook_limits.pool_samples FOR SELECT USING ((SELECT meshhook_limits.can_monitor()));
GRANT SELECT ON meshhook_limits.pool_samples TO PUBLIC;

CREATE FUNCTION meshhook_limits._sample_pool(p_at timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  usable int := current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int;
  warn numeric := current_setting('meshhook_limits.pool_warning')::numeric;
  crit numeric := current_setting('meshhook_limits.pool_critical')::numeric;
  crit_for interval := current_setting('meshhook_limits.pool_critical_for')::interval;
  s record; st text; held boolean;
BEGIN
  SELECT count(*)::int AS total,
         count(*) FILTER (WHERE a.state = 'active')::int AS active,
         count(*) FILTER (WHERE a.state = 'idle')::int AS idle,
         count(*) FILTER (WHERE a.state LIKE 'idle in transaction%')::int AS iit,
         count(*) FILTER (WHERE a.wait_event_type = 'Lock')::int AS waiting,
         max(p_at - a.xact_start) AS longest,
         coalesce((SELECT jsonb_object_agg(k, c) FROM (SELECT coalesce(nullif(b.application_name, ''), '(none)') k, count(*) c
                    FROM pg_catalog.pg_stat_activity b WHERE b.backend_type = 'client backend' GROUP BY 1) x), '{}') AS by_app,
         coalesce((SELECT jsonb_object_agg(k, c) FROM (SELECT coalesce(b.usename::text, '(none)') k, count(*) c
                    FROM pg_catalog.pg_stat_activity b WHERE b.backend_type = 'client backend' GROUP BY 1) x), '{}') AS by_role
    INTO s
    FROM pg_catalog.pg_stat_activity a
   WHERE a.backend_type = 'client backend';
  -- Critical only once utilisation has stayed at or above the critical
  -- threshold for crit_for (every sample of that span, and the span covered).
  held := s.total::numeric / GREATEST(usable, 1) >= crit
      AND EXISTS (SELECT 1 FROM meshhook_limits.pool_samples p WHERE p.sampled_at <= p_at - crit_for)
      AND NOT EXISTS (SELECT 1 FROM meshhook_limits.pool_samples p
                       WHERE p.sampled_at > p_at - crit_for AND p.utilisation < crit);
  st := CASE WHEN held THEN 'critical'
             WHEN s.total::numeric / GREATEST(usable, 1) >= warn THEN 'warning' ELSE 'ok' END;
  INSERT INTO meshhook_limits.pool_samples
  VALUES (p_at, usable, s.total, s.active, s.idle, s.iit, s.waiting,
          round(s.total::numeric / GREATEST(usable, 1), 4), s.longest, st, s.by_app, s.by_role)
  ON CONFLICT (sampled_at) DO NOTHING;
END
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._sample_pool(timestamptz) FROM PUBLIC;

CREATE FUNCTION meshhook_limits.pool_pressure()
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

-- A pool size a DBA can act on: enough for the busiest moments seen (p95 of
-- active sessions over the look-back, plus 25% headroom), never more than
-- 80% of the usable connections so admin and replication sessions still fit.
CREATE FUNCTION meshhook_limits.pool_recommendation(lookback interval DEFAULT '1 hour')
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
