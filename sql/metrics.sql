-- Rows of metrics() that come from tables: (metric name, labels, value).
-- Per-tenant series are bounded: the busiest tenants (live slots, passed in
-- from shared memory) first, then the most recently active, p_max in all.
-- Live slots per tenant are exported from shared memory (tenant_slots_live).
CREATE FUNCTION meshhook_limits._metrics_rows(p_tenant_labels boolean, p_max int, p_busiest text[])
RETURNS TABLE(name text, labels jsonb, value float8)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
  WITH
  tenants AS (
    SELECT x AS tenant_id
      FROM unnest(CASE WHEN p_tenant_labels
                       THEN meshhook_limits._active_tenants(GREATEST(p_max, 0), p_busiest::uuid[])
                       ELSE '{}'::uuid[] END) x),
  used AS (SELECT * FROM meshhook_limits._usage_ratios(ARRAY(SELECT tenant_id FROM tenants))),
  q AS (SELECT * FROM meshhook_limits._latest_queue_samples()),
  p AS (SELECT * FROM meshhook_limits.pool_samples ORDER BY sampled_at DESC LIMIT 1),
  pl AS (SELECT * FROM meshhook_limits._latest_pooler_samples()),
  pp AS (SELECT x.*, jsonb_build_object('pooler', x.pooler, 'database', x.database, 'user', x.user_name) AS l
           FROM meshhook_limits.pooler_pool_samples x JOIN pl ON pl.pooler = x.pooler AND pl.sampled_at = x.sampled_at
          WHERE pl.up)
  -- Tenants
  SELECT 'meshhook_limits_tenant_limit', jsonb_build_object('tenant_id', u.tenant_id, 'resource', u.resource),
         u.limit_value::float8 FROM used u
  UNION ALL
  SELECT 'meshhook_limits_tenant_usage_ratio', jsonb_build_object('tenant_id', u.tenant_id, 'resource', u.resource),
         (u.used / u.limit_value)::float8
    FROM used u WHERE u.used IS NOT NULL AND u.limit_value > 0
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
  -- PgBouncer
  UNION ALL SELECT 'meshhook_limits_pooler_up', jsonb_build_object('pooler', pl.pooler), pl.up::int::float8 FROM pl
  UNION ALL SELECT 'meshhook_limits_pooler_sampled_timestamp_seconds', jsonb_build_object('pooler', pl.pooler),
                   extract(epoch FROM pl.sampled_at)::float8 FROM pl
  UNION ALL SELECT 'meshhook_limits_pooler_default_pool_size', jsonb_build_object('pooler', pl.pooler),
                   pl.default_pool_size FROM pl WHERE pl.up AND pl.default_pool_size IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_transactions_total', jsonb_build_object('pooler', pl.pooler),
                   pl.xact_count FROM pl WHERE pl.up AND pl.xact_count IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_queries_total', jsonb_build_object('pooler', pl.pooler),
                   pl.query_count FROM pl WHERE pl.up AND pl.query_count IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_client_wait_seconds_total', jsonb_build_object('pooler', pl.pooler),
                   pl.wait_time_us / 1e6 FROM pl WHERE pl.up AND pl.wait_time_us IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_avg_wait_seconds', jsonb_build_object('pooler', pl.pooler),
                   pl.avg_wait_us / 1e6 FROM pl WHERE pl.up AND pl.avg_wait_us IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_clients_active', pp.l, pp.clients_active FROM pp
  UNION ALL SELECT 'meshhook_limits_pooler_clients_waiting', pp.l, pp.clients_waiting FROM pp
  UNION ALL SELECT 'meshhook_limits_pooler_maxwait_seconds', pp.l, pp.maxwait_seconds::float8 FROM pp
  UNION ALL SELECT 'meshhook_limits_pooler_server_connections', pp.l || jsonb_build_object('state', s.k), s.v
              FROM pp, LATERAL (VALUES ('active', pp.servers_active), ('idle', pp.servers_idle), ('used', pp.servers_used),
                                       ('tested', pp.servers_tested), ('login', pp.servers_login)) s(k, v)
  UNION ALL SELECT 'meshhook_limits_pooler_pool_size', pp.l, pp.pool_size FROM pp WHERE pp.pool_size IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_pooler_utilisation_ratio', pp.l,
                   ((pp.servers_active + pp.servers_idle + pp.servers_used + pp.servers_tested + pp.servers_login)::numeric
                    / pp.pool_size)::float8 FROM pp WHERE pp.pool_size > 0
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
  UNION ALL SELECT 'meshhook_limits_worker_queue_scan_duration_seconds', '{}'::jsonb, (w.queue_stats_ms / 1000)::float8
              FROM meshhook_limits.worker_state w WHERE w.queue_stats_at IS NOT NULL
  UNION ALL SELECT 'meshhook_limits_worker_queue_scan_timestamp_seconds', '{}'::jsonb, extract(epoch FROM w.queue_stats_at)::float8
              FROM meshhook_limits.worker_state w WHERE w.queue_stats_at IS NOT NULL
$$;
REVOKE EXECUTE ON FUNCTION meshhook_limits._metrics_rows(boolean, int, text[]) FROM PUBLIC;
