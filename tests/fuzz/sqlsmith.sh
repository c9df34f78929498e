#!/usr/bin/env bash
# Random SQL against a server with meshhook_limits loaded, as a superuser and
# as a plain login role, for a bounded time; then the server must still be up,
# no backend may have crashed, and the plain role must not have become a
# superuser. Not part of `make test` (long); run by hand or in a soak job:
#   bash tests/fuzz/sqlsmith.sh [seconds per role, default 120]
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_ROLE=${1:-120}
command -v sqlsmith >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlsmith >/dev/null; }

name=sqlsmith
eval "$(bash scripts/pg.sh start $name "meshhook_limits.restart_grace = 0" "fsync = off" | tail -1)"
trap 'bash scripts/pg.sh destroy $name >/dev/null 2>&1 || true' EXIT
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$@"; }
psql -d postgres -c "DROP DATABASE IF EXISTS smith" -c "CREATE DATABASE smith"
psql -d smith <<'SQL'
CREATE EXTENSION meshhook_limits;
CREATE ROLE smith_user LOGIN;
GRANT CREATE ON SCHEMA public TO smith_user;
SELECT meshhook_limits.set_limit('concurrent_executions', 5);
SELECT meshhook_limits.set_limit('requests_per_second', 10);
SELECT meshhook_limits.set_limit('executions_per_day', 100, window_length => '1 day');
CREATE TABLE public.docs (tenant uuid, body text);
SELECT meshhook_limits.track_storage('public.docs', 'tenant');
SQL

log=/tmp/meshhook_limits/$name/server.log
before=$(grep -c "terminated by signal\|PANIC" "$log" || true)
for role in postgres smith_user; do
  echo "sqlsmith as $role for ${SECONDS_PER_ROLE}s"
  timeout "$SECONDS_PER_ROLE" sqlsmith --target="host=$PGHOST port=$PGPORT dbname=smith user=$role" \
    --max-queries=1000000 --verbose >/tmp/meshhook_limits/sqlsmith-$role.log 2>&1 || true
  tail -3 /tmp/meshhook_limits/sqlsmith-$role.log || true
done
after=$(grep -c "terminated by signal\|PANIC" "$log" || true)
super=$(psql -d smith -Atc "SELECT rolsuper FROM pg_roles WHERE rolname = 'smith_user'")
internal=$(cat /tmp/meshhook_limits/sqlsmith-*.log | grep -c "XX000" || true)
echo "crashes: $((after - before)); smith_user superuser: $super; XX000 reports in sqlsmith logs: $internal"
psql -d smith -c "SELECT 1" >/dev/null  # the server is up
[[ $((after - before)) == 0 && $super == f ]]
