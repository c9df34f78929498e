-- Rows of metrics() that come from tables: (metric name, labels, value).
-- Per-tenant series are bounded: the busiest tenants (live slots, passed in
-- from shared memory) first, then the most recently active, p_max in all.
CREATE FUNCTION meshhook_limits._metrics_rows(p_tenant_labels boolean, p_max int, p_busiest text[])
RETURNS TABLE(name text, labels jsonb, value float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH
  nil AS (SELECT '00000000-0000-0000-0000-000000000000'::uuid AS id),
  candidates AS (
    SELECT x.tenant_id, min(x.prio) AS prio, max(x.seen) AS seen FROM (
      SELECT b::uuid AS tenant_id, 0 AS prio, pg_catalog.now() AS seen FROM unnest(p_busiest) b
      UNION ALL
      SELECT u.tenant_id, 1, max(u.updated_at) FROM meshhook_limits.usage_counters u
       WHERE u.updated_at > pg_catalog.now() - interval '1 day' GROUP BY u.tenant_id
      UNION ALL
      SELECT s.tenant_id, 1, pg_catalog.now() - interval '1 day' FROM meshhook_limits.storage_totals s WHERE s.bytes > 0
    ) x GROUP BY x.tenant_id),
  tenants AS (
    SELECT c.tenant_id FROM candidates c WHERE p_tenant_labels
     ORDER BY c.prio, c.seen DESC, c.tenant_id LIMIT GREATEST(p_max, 0)),
  eff AS (
    SELECT DISTINCT ON (t.tenant_id, l.resource) t.tenant_id, l.resource, l.limit_value, l.window_length
      FROM tenants t
      LEFT JOIN meshhook_limits.tenant_plans tp ON tp.tenant_id = t.tenant_id
      JOIN meshhook_limits.limits l
        ON (l.tenant_id = t.tenant_id AND l.project_id IS NULL) OR l.plan = tp.plan
        OR (l.plan IS NULL AND l.tenant_id IS NULL)
     ORDER BY t.tenant_id, l.resource,
              CASE WHEN l.tenant_id IS NOT NULL THEN 1 WHEN l.plan IS NOT NULL THEN 2 ELSE 3 END),
  used AS (
    SELECT e.tenant_id, e.resource, e.limit_value,
           CASE
             WHEN e.resource = 'storage_bytes' THEN
               coalesce((SELECT st.bytes FROM meshhook_limits.storage_totals st WHERE st.tenant_id = e.tenant_id), 0)
             WHEN e.window_length IS NOT NULL THEN
               coalesce((SELECT u.used FROM meshhook_limits.usage_counters u, nil
                          WHERE u.tenant_id = e.tenant_id AND u.resource = e.resource AND u.project_id = nil.id
                            AND u.window_start = to_timestamp(floor(extract(epoch FROM pg_catalog.now())
                                 / extract(epoch FROM e.window_length)) * extract(epoch FROM e.window_length))), 0)
             WHEN e.resource = 'memory_bytes' THEN
               (SELECT u.used FROM meshhook_limits.usage_counters u, nil
                 WHERE u.tenant_id = e.tenant_id AND u.resource = e.resource AND u.project_id = nil.id)
           END AS used
      FROM eff e),
  q AS (SELECT * FROM meshhook_limits._latest_queue_samples()),
  p AS (SELECT * FROM meshhook_limits.pool_samples ORDER BY sampled_at DESC LIMIT 1)
  -- Tenants
  SELECT 'meshhook_limits_tenant_limit', jsonb_build_object('tenant_id', e.tenant_id, 'resource', e.resource),
         e.limit_value::float8 FROM eff e
  UNION ALL
  SELECT 'meshhook_limits_tenant_usage_ratio', jsonb_build_object('tenant_id', u.tenant_id, 'resource', u.resource),
         (u.used / u.limit_value)::float8
    FROM used u WHERE u.used IS NOT NULL AND u.limit_value > 0 AND u.resource <> 'concurrent_executions'
  UNION ALL
  SELECT 'meshhook_limits_tenant_storage_bytes', jsonb_build_object('tenant_id', s.tenant_id), s.bytes::float8
    FROM meshhook_limits.storage_totals s JOIN tenants t ON t.tenant_id = s.tenant_id
  -- Queues
  UNION ALL SELECT 'meshhook_limits_queue_queued', jsonb_build_object('source', q.source, 'queue', q.queue), q.queued FROM q
  UNION ALL SELECT 'meshhook_limits_queue_active', jsonb_build_object('source', q.source, 'queue', q.queue), q.active FROM q
  UNION ALL SELECT 'meshhook_limits_queue_failed_recent', jsonb_build_object('source', q.source, 'queue', q.queue), q.failed_recent FROM q
  UNION ALL SELECT 'meshhook_limits_queue_oldest_age_seconds', jsonb_build_object('source', q.source, 'queue', q.queue),
                   coalesce(extract(epoch FROM q.oldest_age), 0)::float8 FROM q
  UNION ALL SELECT 'meshhook_limits_queue_processing_p50_seconds', jsonb_build_object('source', q.source, 'queue', q.queue),
                   (q.p50_ms / 1000)::float8 FROM q WHERE q.p50_ms IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_queue_processing_p95_seconds', jsonb_build_object('source', q.source, 'queue', q.queue),
                   (q.p95_ms / 1000)::float8 FROM q WHERE q.p95_ms IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_queue_throughput_per_second', jsonb_build_object('source', q.source, 'queue', q.queue),
                   (q.throughput_per_min / 60)::float8 FROM q
  UNION ALL SELECT 'meshhook_limits_queue_error_ratio', jsonb_build_object('source', q.source, 'queue', q.queue),
                   q.error_rate::float8 FROM q WHERE q.error_rate IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_queue_status', jsonb_build_object('source', q.source, 'queue', q.queue, 'status', s.st),
                   (q.status = s.st)::int::float8 FROM q, unnest(ARRAY['ok', 'warning', 'critical']) s(st)
  UNION ALL SELECT 'meshhook_limits_queue_sampled_timestamp_seconds', '{}'::jsonb,
                   extract(epoch FROM max(q.sampled_at))::float8 FROM q HAVING count(*) > 0
  -- Pool
  UNION ALL SELECT 'meshhook_limits_pool_max_connections', '{}'::jsonb, p.max_connections FROM p
  UNION ALL SELECT 'meshhook_limits_pool_connections', jsonb_build_object('state', s.k), s.v
              FROM p, LATERAL (VALUES ('active', p.active), ('idle', p.idle),
                                      ('idle_in_transaction', p.idle_in_transaction), ('waiting', p.waiting),
                                      ('total', p.total)) s(k, v)
  UNION ALL SELECT 'meshhook_limits_pool_utilisation_ratio', '{}'::jsonb, p.utilisation::float8 FROM p
  UNION ALL SELECT 'meshhook_limits_pool_longest_transaction_seconds', '{}'::jsonb,
                   coalesce(extract(epoch FROM p.longest_transaction), 0)::float8 FROM p
  UNION ALL SELECT 'meshhook_limits_pool_status', jsonb_build_object('status', s.st), (p.status = s.st)::int::float8
              FROM p, unnest(ARRAY['ok', 'warning', 'critical']) s(st)
  UNION ALL SELECT 'meshhook_limits_pool_connections_by_application', jsonb_build_object('application', a.key),
                   a.value::text::float8 FROM p, jsonb_each(p.by_application) a
  UNION ALL SELECT 'meshhook_limits_pool_connections_by_role', jsonb_build_object('role', r.key),
                   r.value::text::float8 FROM p, jsonb_each(p.by_role) r
  -- Alerts: every rule appears, with 0 when it has no series in that state.
  UNION ALL SELECT 'meshhook_limits_alerts', jsonb_build_object('rule', r.name, 'severity', r.severity, 'state', s.st),
                   (SELECT count(*) FROM meshhook_limits.alert_states a WHERE a.rule = r.name AND a.state = s.st)::float8
              FROM meshhook_limits.effective_alert_rules r, unnest(ARRAY['pending', 'firing']) s(st)
             WHERE r.enabled
  -- Worker
  UNION ALL SELECT 'meshhook_limits_worker_ticks_total', '{}'::jsonb, w.ticks::float8 FROM meshhook_limits.worker_state w
  UNION ALL SELECT 'meshhook_limits_worker_errors_total', '{}'::jsonb, w.errors::float8 FROM meshhook_limits.worker_state w
  UNION ALL SELECT 'meshhook_limits_worker_last_tick_duration_seconds', '{}'::jsonb, (w.last_tick_ms / 1000)::float8
              FROM meshhook_limits.worker_state w WHERE w.last_tick IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_worker_last_tick_timestamp_seconds', '{}'::jsonb, extract(epoch FROM w.last_tick)::float8
              FROM meshhook_limits.worker_state w WHERE w.last_tick IS NOT NULL
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._metrics_rows(boolean, int, text[]) FROM PUBLIC;
