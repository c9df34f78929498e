#!/usr/bin/env bash
# Load test of the connection pooler (issue 21): MeshHook-like traffic through
# a real PgBouncer (transaction pooling) with a fixed small pool, next to the
# same traffic with the pool sized by the extension (set_pooler_sizing 'on'),
# in one run. Prints a markdown table.
#
#   bash benches/pooler.sh
#   BENCH_CLIENTS="100" BENCH_SECONDS=60 bash benches/pooler.sh
#
# Traffic: every pgbench client loops over jobs of 1,000 tenants: acquire an
# execution slot, the job's database work (a transaction of BENCH_WORK_MS ms:
# pg_sleep, like a query waiting on I/O), release the slot: three
# transactions per job, no think time. Clients are bounded (BENCH_CLIENTS).
#
# Arms, for each client count:
#   fixed  default_pool_size BENCH_POOL throughout (sizing off)
#   tuned  starts at BENCH_POOL; sizing on within [2, BENCH_MAX_POOL],
#          resize_every 5 s; the background worker ticks every second
# Reported per arm: jobs/s, client latency per job p50/p95 (pgbench's
# per-transaction log), the pooler's wait p95 and server connections used
# (the worker's samples of SHOW POOLS: maxwait, and servers in any state),
# and the pool size at the end.
#
# Environment:
#   BENCH_CLIENTS   client counts (default "50 100 200")
#   BENCH_SECONDS   seconds per arm (default 30)
#   BENCH_POOL      the fixed pool, and the tuned one's start (default 5)
#   BENCH_MAX_POOL  the tuned pool's max_pool_size (default 40)
#   BENCH_WORK_MS   database work per job (default 5)
#   BENCH_CLUSTER   throwaway cluster name (default bench-pooler)
#   BENCH_OUT       raw logs and results.md (default /tmp/meshhook_limits/bench-pooler-results)
# Exit status: 0 when every arm ran (targets are not tests), 1 when pgbench
# failed, 2 for a missing prerequisite.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
read -ra CLIENT_COUNTS <<<"${BENCH_CLIENTS:-50 100 200}"
DURATION=${BENCH_SECONDS:-30}
POOL=${BENCH_POOL:-5}
MAX_POOL=${BENCH_MAX_POOL:-40}
WORK_MS=${BENCH_WORK_MS:-5}
CLUSTER=${BENCH_CLUSTER:-bench-pooler}
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-pooler-results}
DB=bench
need_positive BENCH_SECONDS "$DURATION"
need_positive BENCH_POOL "$POOL"
need_positive BENCH_MAX_POOL "$MAX_POOL"
need_nonneg BENCH_WORK_MS "$WORK_MS"
for n in "${CLIENT_COUNTS[@]}"; do need_positive BENCH_CLIENTS "$n"; done
need_pgbench
need_so
command -v pgbouncer >/dev/null || { echo "pgbouncer is not installed (scripts/setup.sh installs it)" >&2; exit 2; }

rm -rf "$OUT"; mkdir -p "$OUT"; chmod 777 "$OUT"
start_cluster "max_connections = 300" "meshhook_limits.database = '$DB'" "meshhook_limits.sample_interval = '1s'" \
  "meshhook_limits.restart_grace = 0"
trap 'stop_cluster; "$root/scripts/pgbouncer.sh" stop "$CLUSTER" >/dev/null 2>&1 || true' EXIT
bench_client_env
eval "$("$root/scripts/pgbouncer.sh" start "$CLUSTER" "$PGPORT" "max_client_conn = 1000")"
qdb postgres "CREATE DATABASE $DB" >/dev/null
qdb "$DB" "CREATE EXTENSION dblink; CREATE EXTENSION meshhook_limits" >/dev/null
qdb "$DB" "SELECT meshhook_limits.add_pooler('bench', 'host=127.0.0.1 port=$PGBOUNCER_PORT dbname=pgbouncer user=postgres')" >/dev/null
admin() { "$PSQL" -X -qAt -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U postgres -d pgbouncer -c "$1"; }

cat >"$OUT/job.sql" <<SQL
\\set t random(1, 1000)
SELECT slot_id FROM meshhook_limits.acquire_execution_slot(('00000000-0000-4000-8000-' || lpad(:t::text, 12, '0'))::uuid, NULL, NULL, '1 minute') \\gset
SELECT pg_sleep($WORK_MS / 1000.0);
SELECT meshhook_limits.release_execution_slot(':slot_id'::uuid);
SQL

results="$OUT/results.md"
{
  echo "| clients | pool | jobs/s | p50 ms | p95 ms | pooler wait p95 ms | servers used mean / max | pool at end |"
  echo "|---|---|---|---|---|---|---|---|"
} >"$results"

for clients in "${CLIENT_COUNTS[@]}"; do
  for arm in fixed tuned; do
    admin "SET default_pool_size = $POOL" >/dev/null
    admin "RECONNECT" >/dev/null 2>&1 || true
    mode=off; [[ $arm == tuned ]] && mode=on
    qdb "$DB" "SELECT meshhook_limits.set_pooler_sizing('bench', '$mode', 2, $MAX_POOL, '5 seconds');
               UPDATE meshhook_limits.poolers SET resized_at = NULL" >/dev/null
    t0=$(qdb "$DB" "SELECT now()")
    log="$OUT/$arm-$clients"
    mkdir -p "$log"; chmod 777 "$log"
    (cd "$log" && "$PGBENCH" -n -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U postgres -c "$clients" -j 2 -T "$DURATION" \
        -f "$OUT/job.sql" -l "$DB" >"$log/pgbench.out" 2>&1) || { cat "$log/pgbench.out" >&2; exit 1; }
    t1=$(qdb "$DB" "SELECT now()")
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log/pgbench.out" | head -1)
    tps=$(printf "%.0f" "$tps")
    read -r p50 p95 < <(cat "$log"/pgbench_log.* | python3 -c '
import sys
lat = sorted(int(l.split()[2]) for l in sys.stdin if l.strip())
q = lambda f: lat[min(len(lat) - 1, int(f * len(lat)))] / 1000
print(f"{q(0.5):.1f} {q(0.95):.1f}")')
    read -r wait95 used_mean used_max < <(qdb "$DB" "
      SELECT round(1000 * percentile_cont(0.95) WITHIN GROUP (ORDER BY maxwait_seconds))::int,
             round(avg(servers_active + servers_idle + servers_used + servers_tested + servers_login), 1),
             max(servers_active + servers_idle + servers_used + servers_tested + servers_login)
        FROM meshhook_limits.pooler_pool_samples
       WHERE pooler = 'bench' AND database = '$DB' AND sampled_at BETWEEN '$t0' AND '$t1'" | tr '|' ' ')
    size=$(admin "SHOW CONFIG" | awk -F'|' '$1 == "default_pool_size" {print $2}')
    label="fixed $POOL"; [[ $arm == tuned ]] && label="tuned ($POOL → 2..$MAX_POOL)"
    echo "| $clients | $label | $tps | $p50 | $p95 | $wait95 | $used_mean / $used_max | $size |" | tee -a "$results"
    qdb "$DB" "SELECT meshhook_limits.set_pooler_sizing('bench', 'off')" >/dev/null
    # Let the clients' slots and PgBouncer's servers settle before the next arm.
    sleep 2
  done
done
echo
qdb "$DB" "SELECT to_char(created_at, 'HH24:MI:SS'), payload->>'before', payload->>'after', payload->>'why'
             FROM meshhook_limits.events WHERE event = 'pool.resized' ORDER BY id" | tee "$OUT/resizes.txt"
echo
echo "PostgreSQL 15, PgBouncer $(pgbouncer --version | head -1 | awk '{print $2}'), $(nproc) CPUs, library $so_sha; raw output in $OUT"
cat "$results"
