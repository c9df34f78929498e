#!/usr/bin/env bash
# make demo: a throwaway server with meshhook_limits preloaded, three tenants
# on two plans, executions run against them (some refused), then what the
# extension shows. Run after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# restart_grace = 0: the demo acquires slots the moment the server is up.
eval "$(bash scripts/pg.sh start demo "meshhook_limits.restart_grace = 0")"
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
\echo
\echo effective limits of initech's project "reports" (most specific wins):
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
title "events (also sent with NOTIFY on channel meshhook_limits)"
q -c "SELECT event, tenant_id, resource, payload->>'value' AS value, payload->>'limit' AS limit, payload->>'reason' AS reason FROM meshhook_limits.events ORDER BY id"
title "slot table"
q -c "SELECT * FROM meshhook_limits.slot_stats()"

cat <<EOF2

Queue health (pg-boss, pgmq), pool pressure, alert rules and Prometheus
metrics are not built yet (issues 4 and 5); this demo shows limits, slots
and usage.

The demo server keeps running:
  psql -h $PGHOST -p $PGPORT -U postgres -d meshhook_demo
  make demo-stop          # stop it (scripts/pg.sh destroy demo removes it)
EOF2
