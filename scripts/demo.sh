#!/usr/bin/env bash
# make demo: a throwaway server with meshhook_limits preloaded, three tenants
# on two plans, executions run against them (some refused), then what the
# extension shows. Run after scripts/setup.sh. PG=17 (make demo PG=17) runs it
# on another PostgreSQL (see scripts/pgenv.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pgenv.sh
bash scripts/install-queue-systems.sh
# A demo server of another version than asked for is replaced.
demo_data=/tmp/meshhook_limits/demo/data
if [[ -f $demo_data/PG_VERSION && $(cat "$demo_data/PG_VERSION") != "$PG_MAJOR" ]]; then
  bash scripts/pg.sh destroy demo
fi
# The background worker ticks in the demo database. No restart grace: the
# extension is created in a fresh database after the server started.
eval "$(bash scripts/pg.sh start demo "meshhook_limits.database = 'meshhook_demo'")"
export PATH="$PG_BIN:$PATH"
printf 'PostgreSQL %s\n' "$(psql -X -Atc 'SHOW server_version' -d postgres)"
psql -X -q -d postgres -c "DROP DATABASE IF EXISTS meshhook_demo WITH (FORCE)" -c "CREATE DATABASE meshhook_demo"
export PGDATABASE=meshhook_demo
q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
title() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

ACME=a0000000-0000-4000-8000-000000000001     # plan pro
GLOBEX=b0000000-0000-4000-8000-000000000002   # plan free
INITECH=c0000000-0000-4000-8000-000000000003  # plan free, project limit
REPORTS=d0000000-0000-4000-8000-000000000004  # initech's project

title "configuration: global defaults, plans free and pro, three tenants"
q -v acme=$ACME -v globex=$GLOBEX -v initech=$INITECH -v reports=$REPORTS <<'SQL'
\o /dev/null
CREATE EXTENSION meshhook_limits;
SELECT meshhook_limits.set_limit('concurrent_executions', 5);
SELECT meshhook_limits.set_limit('execution_seconds', 900);
SELECT meshhook_limits.set_limit('executions_per_day', 1000, window_length => '1 day');
SELECT meshhook_limits.create_plan('free', 'hobby projects');
SELECT meshhook_limits.set_plan_limit('free', 'concurrent_executions', 2);
SELECT meshhook_limits.set_plan_limit('free', 'executions_per_day', 10, 0.8, '1 day');
SELECT meshhook_limits.set_plan_limit('free', 'memory_bytes', 268435456);
SELECT meshhook_limits.create_plan('pro', 'teams');
SELECT meshhook_limits.set_plan_limit('pro', 'concurrent_executions', 20);
SELECT meshhook_limits.assign_plan(:'acme', 'pro');
SELECT meshhook_limits.assign_plan(:'globex', 'free');
SELECT meshhook_limits.assign_plan(:'initech', 'free');
SELECT meshhook_limits.set_limit('concurrent_executions', 3, :'initech');          -- tenant override
SELECT meshhook_limits.set_limit('concurrent_executions', 1, :'initech', :'reports'); -- one project
\o
\echo 'effective limits of initech''s project "reports" (most specific wins):'
SELECT resource, limit_value, window_length, source
  FROM meshhook_limits.effective_limits(:'initech', :'reports');
SQL

title "executions: each tenant tries to start 4 runs at once"
q -v acme=$ACME -v globex=$GLOBEX -v initech=$INITECH -v reports=$REPORTS <<'SQL'
CREATE TEMP TABLE attempts AS
SELECT t.name, n, s.*
  FROM (VALUES ('acme', :'acme'::uuid, NULL::uuid), ('globex', :'globex'::uuid, NULL),
               ('initech/reports', :'initech'::uuid, :'reports'::uuid)) t(name, id, project),
       generate_series(1, 4) n,
       LATERAL meshhook_limits.acquire_execution_slot(t.id, t.project, t.name || '-run-' || n) s;
SELECT name, n, granted, reason, in_use, limit_value, retry_after FROM attempts ORDER BY name, n;
-- Every started run is metered.
SELECT count(*) AS runs_metered FROM attempts a,
       LATERAL meshhook_limits.record_usage(
         CASE a.name WHEN 'acme' THEN :'acme'::uuid WHEN 'globex' THEN :'globex'::uuid ELSE :'initech'::uuid END,
         'executions_per_day', 1) WHERE a.granted;
-- globex had a busy day: 7 more runs → crosses 80 % of its 10 per day.
SELECT status, used, limit_value FROM meshhook_limits.record_usage(:'globex', 'executions_per_day', 7);
-- One acme run reports 300 MB against the free plan's 256 MB? acme is pro
-- (no memory limit); globex's first run reports too much memory and is revoked.
SELECT h.* FROM attempts a, LATERAL meshhook_limits.heartbeat_execution_slot(a.slot_id, 300000000) h
 WHERE a.name = 'globex' AND a.n = 1;
-- acme's runs finish.
SELECT count(*) FILTER (WHERE meshhook_limits.release_execution_slot(slot_id)) AS released
  FROM attempts WHERE name = 'acme' AND granted;
SQL

title "live slots"
q -c "SELECT tenant_id, project_id, run_id, state, lease_expires_at, deadline FROM meshhook_limits.slots() ORDER BY run_id"
title "usage of globex (plan free)"
q -c "SELECT * FROM meshhook_limits.usage('$GLOBEX')"

title "rate limit: acme may call its webhook endpoint 5/s with a burst of 3"
q -v acme=$ACME <<'SQL'
SELECT meshhook_limits.set_limit('requests_per_second', 5, :'acme', burst => 3) \g /dev/null
SELECT n, r.* FROM generate_series(1, 5) n, LATERAL meshhook_limits.check_rate_limit(:'acme', 'webhooks', 1 + 0 * n) r;
SQL

title "storage quota: globex may store 4 kB in tracked tables"
q -v globex=$GLOBEX <<'SQL'
CREATE TABLE workflow_runs (id bigint GENERATED ALWAYS AS IDENTITY, tenant_id uuid NOT NULL, output text);
SELECT meshhook_limits.track_storage('workflow_runs', 'tenant_id') AS bytes_counted;
SELECT meshhook_limits.set_limit('storage_bytes', 4096, :'globex') \g /dev/null
INSERT INTO workflow_runs (tenant_id, output) SELECT :'globex', repeat('x', 300) FROM generate_series(1, 10);
\set ON_ERROR_STOP 0
\set SHOW_CONTEXT never
\echo a statement that would exceed the quota is refused (53400):
INSERT INTO workflow_runs (tenant_id, output) SELECT :'globex', repeat('y', 300) FROM generate_series(1, 5);
\set ON_ERROR_STOP 1
SELECT * FROM meshhook_limits.storage_totals;
SQL

title "claiming: a noisy tenant's 400 jobs, then 3 quiet tenants' 20 each, 4 workers (pg-boss)"
node scripts/demo/claim-fairness.mjs "$PGHOST" "$PGPORT" meshhook_demo

title "queues: pg-boss (npm) and pgmq (crate SQL) with traffic"
node scripts/demo/queue-traffic.mjs "$PGHOST" "$PGPORT" meshhook_demo
q -f .cache/pgmq/pgmq.sql >/dev/null
q <<'SQL'
SELECT pgmq.create('webhook_retries') \g /dev/null
SELECT count(*) AS sent FROM pgmq.send_batch('webhook_retries', array_fill('{"attempt": 1}'::jsonb, ARRAY[30]));
SELECT count(*) AS read_and_invisible FROM pgmq.read('webhook_retries', 60, 5);
SELECT count(*) FILTER (WHERE a) AS archived FROM pgmq.read('webhook_retries', 0, 4) r,
       LATERAL pgmq.archive('webhook_retries', r.msg_id) a;
-- An alert the demo can see fire: more than 100 jobs waiting in any queue.
SELECT meshhook_limits.set_alert_rule('demo_backlog', 'queue.queued', 100, for_duration => '0',
                                      severity => 'warning', resolve_threshold => 80) \g /dev/null
SQL
# Some connections for the pool to show: idle, and idle in a transaction.
for i in 1 2 3; do psql -X -q -c "SELECT pg_sleep(6)" >/dev/null 2>&1 & done
psql -X -q -c "BEGIN; SELECT pg_sleep(6); COMMIT" >/dev/null 2>&1 &
# PgBouncer in front of the server (transaction pooling, a pool of 2),
# sampled by the worker through dblink, with pool sizing in dry run; 12
# clients through it, each transaction 20 ms on the server: most wait.
bash scripts/pgbouncer.sh stop demo
eval "$(bash scripts/pgbouncer.sh start demo "$PGPORT")"
q -v port="$PGBOUNCER_PORT" >/dev/null <<'SQL'
CREATE EXTENSION IF NOT EXISTS dblink;
SELECT meshhook_limits.add_pooler('demo', 'host=127.0.0.1 port=' || :'port' || ' dbname=pgbouncer user=postgres');
SELECT meshhook_limits.set_pooler_sizing('demo', 'dry_run', 2, 10, '5 seconds');
SQL
pgbench -n -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U postgres -c 12 -T 20 -f <(echo 'SELECT pg_sleep(0.02);') \
  meshhook_demo >/dev/null 2>&1 &
# Wait for two ticks of the background worker (it connects within ~5 s of
# the demo database being created).
before=$(q -Atc "SELECT ticks FROM meshhook_limits.worker_state")
for _ in $(seq 1 100); do
  now=$(q -Atc "SELECT ticks FROM meshhook_limits.worker_state")
  (( now >= before + 2 )) && break
  sleep 0.2
done
title "queue health (sampled by the background worker every second)"
q -c "SELECT source, queue, queued, active, failed_recent, oldest_age, p50_ms, throughput_per_min, error_rate, status FROM meshhook_limits.queue_health()"
title "pool pressure"
q -c "SELECT max_connections, total, active, idle, idle_in_transaction, waiting, utilisation, longest_transaction, status, by_application FROM meshhook_limits.pool_pressure()"
q -P format=wrapped -P columns=100 -c "SELECT recommended_pool_size, observed_p95_active, reasoning FROM meshhook_limits.pool_recommendation()"
# Sizing looks back 5 s before it proposes anything.
for _ in $(seq 1 100); do
  [[ $(q -Atc "SELECT count(*) FROM meshhook_limits.events WHERE event = 'pool.resize_proposed'") -gt 0 ]] && break
  sleep 0.2
done
title "connection pooler: PgBouncer's pools, sampled through its admin console"
q -c "SELECT pooler, database, status, clients_active, clients_waiting, servers_active, pool_size, maxwait_seconds, transactions_per_second FROM meshhook_limits.pooler_health()"
q -c "SELECT payload->>'before' AS pool_size, payload->>'after' AS proposed, payload->>'why' AS why FROM meshhook_limits.events WHERE event = 'pool.resize_proposed' ORDER BY id LIMIT 1"
title "alerts"
q -c "SELECT rule, series, state, value, since FROM meshhook_limits.alert_states ORDER BY rule, series"
title "events (also sent with NOTIFY on channel meshhook_limits)"
q -c "SELECT event, tenant_id, resource, payload->>'value' AS value, payload->>'limit' AS limit, coalesce(payload->>'reason', payload->>'rule') AS why FROM meshhook_limits.events ORDER BY id"
title "metrics() for Prometheus (first lines of $(q -Atc "SELECT count(*) FROM regexp_split_to_table(meshhook_limits.metrics(), E'\\n') l WHERE l NOT LIKE '#%' AND l <> ''") samples)"
q -Atc "SELECT meshhook_limits.metrics()" | grep -E '^meshhook_limits_(slot_|tenant_slots|queue_queued|pool_utilisation|alerts.*firing|rate_limit_decisions)' | head -20
wait

cat <<EOF2

The demo server keeps running (the worker keeps sampling):
  $PG_BIN/psql -h $PGHOST -p $PGPORT -U postgres -d meshhook_demo
  LISTEN meshhook_limits;  -- in psql, to watch events arrive
  make demo-stop           # stop it and its PgBouncer (scripts/pg.sh destroy demo removes it)
EOF2
