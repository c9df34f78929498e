-- Run once at image build (docker/Dockerfile) in database postgres, as postgres.
ALTER ROLE postgres PASSWORD :'postgres_password';
CREATE EXTENSION IF NOT EXISTS meshhook_limits;
-- The role both scrape paths use (docker/compose.yaml: metrics-http and
-- postgres-exporter). metrics(), queue_health(), pool_pressure() and the
-- per-tenant views answer administrators only; pg_monitor is for the
-- exporter's default pg_* metrics.
CREATE ROLE meshhook_metrics LOGIN PASSWORD :'metrics_password' IN ROLE meshhook_limits_monitor, pg_monitor;
