#!/usr/bin/env bash
# What binding a queue costs its enqueuers (issue 20): jobs sent per second
# by W concurrent clients, each job its own transaction, into a bound queue
# next to an unbound one filled alike, in the same run, on pg-boss
# (boss.send, PGBOSS_MAJOR=12 by default) and pgmq (pgmq.send). A bound
# queue's jobs go into the binding's indexes too (pg-boss: three, pgmq: two;
# docs/claiming.md, "The index and the triggers").
#
#   bash benches/enqueue.sh                       # ~3 minutes
#   BENCH_ENQ_TENANTS=100000 bash benches/enqueue.sh
#
# BENCH_ENQ_TENANTS (10000): tenants the jobs are of, in turn
# BENCH_ENQ_BACKLOG (100000): jobs queued in each queue before the runs
# BENCH_ENQ_WORKERS (8), BENCH_ENQ_SECONDS (6), BENCH_ENQ_ROUNDS (3)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
CLUSTER=${BENCH_CLUSTER:-bench-enqueue}
DB=bench_enqueue
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-enqueue-results}
TENANTS=${BENCH_ENQ_TENANTS:-10000}
BACKLOG=${BENCH_ENQ_BACKLOG:-100000}
WORKERS=${BENCH_ENQ_WORKERS:-8}
SECONDS_=${BENCH_ENQ_SECONDS:-6}
ROUNDS=${BENCH_ENQ_ROUNDS:-3}
for v in TENANTS BACKLOG WORKERS SECONDS_ ROUNDS; do need_positive "$v" "${!v}"; done
export PGBOSS_MAJOR=${PGBOSS_MAJOR:-12}
pgmq_sql=$root/.cache/pgmq/pgmq.sql
[[ -f $pgmq_sql ]] || { echo "pgmq's SQL is not at $pgmq_sql; run bash scripts/install-queue-systems.sh" >&2; exit 2; }
boss_pkg=pg-boss; [[ $PGBOSS_MAJOR == 12 ]] && boss_pkg=pg-boss-12
[[ -f $root/tests/node/node_modules/$boss_pkg/package.json ]] \
  || { echo "pg-boss is not installed; run bash scripts/install-queue-systems.sh" >&2; exit 2; }
boss_version=$(node -p "require('$root/tests/node/node_modules/$boss_pkg/package.json').version")
need_so
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/results.md

start_cluster 'meshhook_limits.restart_grace = 0' "meshhook_limits.database = '$DB'"
bench_client_env
q() { qdb "$DB" "$1"; }
conn="host=$PGHOST port=$PGPORT user=postgres dbname=$DB"
load() { node "$here/claim_load.mjs" "$conn" "$@"; }
create_bench_db "$DB"
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$pgmq_sql" >"$OUT/pgmq-install.log" 2>&1
machine_info "$DB"

tenant_sql="('00000000-0000-4000-8000-' || lpad((1 + g % $TENANTS)::text, 12, '0'))"
for arm in plain bound; do
  load init --queue "e_$arm" >"$OUT/init-$arm.json"
  q "INSERT INTO pgboss.job (id, name, data)
     SELECT gen_random_uuid(), 'e_$arm', jsonb_build_object('tenant_id', $tenant_sql)
       FROM generate_series(1, $BACKLOG) g" >/dev/null
  q "SELECT pgmq.create('e_$arm')" >/dev/null
  q "SELECT count(*) FROM pgmq.send_batch('e_$arm', ARRAY(SELECT jsonb_build_object('tenant_id', $tenant_sql)
       FROM generate_series(1, $BACKLOG) g))" >/dev/null
done
q "SELECT meshhook_limits.bind_queue('pgboss', 'e_bound')" >/dev/null
q "SELECT meshhook_limits.bind_queue('pgmq', 'e_bound')" >/dev/null
q "VACUUM ANALYZE" >/dev/null

# run SOURCE ARM ROUND: jobs/s of one run
run() {
  local cmd=send; [[ $1 == pgmq ]] && cmd=pgmq-send
  load "$cmd" --queue "e_$2" --workers "$WORKERS" --tenants "$TENANTS" --seconds "$SECONDS_" --warmup 2 \
    >"$OUT/$1-$2-$3.json"
  node -p "JSON.parse(require('fs').readFileSync('$OUT/$1-$2-$3.json')).jobs_per_s"
}

rows=()
for source in pgboss pgmq; do
  plain=() bound=()
  for r in $(seq 1 "$ROUNDS"); do
    # Alternating, so that a drift of the machine falls on both arms.
    if (( r % 2 )); then plain+=("$(run "$source" plain "$r")"); bound+=("$(run "$source" bound "$r")")
    else bound+=("$(run "$source" bound "$r")"); plain+=("$(run "$source" plain "$r")"); fi
    echo "$source round $r: unbound ${plain[-1]}, bound ${bound[-1]} jobs/s" >&2
  done
  p=$(echo "${plain[*]}" | median) b=$(echo "${bound[*]}" | median)
  label=$source; [[ $source == pgboss ]] && label="pg-boss $boss_version \`boss.send\`"
  [[ $source == pgmq ]] && label="\`pgmq.send\`"
  rows+=("| $label | $p | $b | $(ratio "$b" "$p") | ${plain[*]} | ${bound[*]} |")
done

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "## Enqueue cost of a binding, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  report_machine "" "Node (pg-boss, pg)" "" "" "meshhook_limits.restart_grace=0, otherwise the defaults"
  echo
  echo "$WORKERS clients send one job each, no sleep, each its own transaction, ${SECONDS_} s after 2 s, $ROUNDS rounds"
  echo "(median; each round's in the last columns); jobs of $TENANTS tenants in turn; each queue holds $BACKLOG jobs first."
  echo
  echo "| sender | unbound, jobs/s | bound, jobs/s | bound / unbound | unbound, rounds | bound, rounds |"
  echo "| --- | ---: | ---: | ---: | --- | --- |"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT/results.md"
