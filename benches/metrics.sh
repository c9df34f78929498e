#!/usr/bin/env bash
# Scrape time of SELECT meshhook_limits.metrics() with many tenants (target:
# under 100 ms at 10,000 tenants). On a throwaway cluster (scripts/pg.sh):
# N tenants, each with a concurrent_executions and a metered (api_calls,
# 1-hour window) limit and usage in the current window, plus live slots for
# some of them, queue and pool samples from a tick; then metrics() is timed
# 20 times (median, min, max as psql's \timing sees it: execution and
# transfer of the text, no connection set-up), with tenant labels on
# (metrics_max_tenants at its default, 500) and off.
# Autovacuum is off so that the first case is the state right after a bulk
# load or a restore, before any ANALYZE (timed BENCH_STALE_RUNS times); then
# ANALYZE, as autovacuum does within a minute or so, and the main cases;
# last, the same after assigning a plan to every 7th tenant (tenant_plans not
# empty) and ANALYZE.
# With BENCH_EXPLAIN=1, or when a median is over the target, prints where the
# time goes: the plans of _metrics_rows() and of the statements inside it
# (auto_explain, nested), without and with statistics.
#
#   bash benches/metrics.sh
#   BENCH_TENANTS=1000 bash benches/metrics.sh
#
# Environment:
#   BENCH_TENANTS   tenants (default 10000)
#   BENCH_SLOTS     tenants holding one live slot (default 500)
#   BENCH_RUNS      timed scrapes per case (default 20)
#   BENCH_STALE_RUNS  timed scrapes before ANALYZE (default 5)
#   BENCH_CLUSTER   cluster name for scripts/pg.sh (default bench-metrics)
#   BENCH_EXPLAIN   1: always print the plans
# Exit status: 0 when it ran (a benchmark is not a test), 1 when something
# broke, 2 for a missing prerequisite.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TENANTS=${BENCH_TENANTS:-10000}
SLOTS=${BENCH_SLOTS:-500}
RUNS=${BENCH_RUNS:-20}
STALE_RUNS=${BENCH_STALE_RUNS:-5}
CLUSTER=${BENCH_CLUSTER:-bench-metrics}
TARGET_MS=100
DB=bench

[[ -f $SO ]] || { echo "extension not installed: bash scripts/setup.sh" >&2; exit 2; }
for v in TENANTS SLOTS RUNS STALE_RUNS; do [[ ${!v} =~ ^[0-9]+$ ]] || { echo "BENCH_$v must be an integer" >&2; exit 2; }; done

start_cluster "meshhook_limits.restart_grace = 0" "fsync = off" "autovacuum = off"
trap destroy_cluster EXIT
psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }
psql -d postgres -c "CREATE DATABASE $DB"

tenant="('00000000-0000-0000-0000-' || lpad(n::text, 12, '0'))::uuid"
t0=$(date +%s.%N)
psql -d $DB >/dev/null <<SQL
CREATE EXTENSION meshhook_limits;
SELECT count(meshhook_limits.set_limit('concurrent_executions', 5, $tenant)) FROM generate_series(1, $TENANTS) n;
SELECT count(meshhook_limits.set_limit('api_calls', 1000, $tenant, window_length => '1 hour'))
  FROM generate_series(1, $TENANTS) n;
SQL
# Usage in bulk, in chunks of 1000 tenants per transaction (amounts 0..699:
# no warning or exceeded events, which would dominate the set-up).
for ((lo = 1; lo <= TENANTS; lo += 1000)); do
  hi=$((lo + 999 < TENANTS ? lo + 999 : TENANTS))
  psql -d $DB -c "SELECT count(*) FROM generate_series($lo, $hi) n,
                    meshhook_limits.record_usage($tenant, 'api_calls', n % 700)" >/dev/null
done
granted=$(psql -d $DB -At -c "SELECT count(*) FILTER (WHERE granted) FROM generate_series(1, $SLOTS) n,
                                 meshhook_limits.acquire_execution_slot($tenant, NULL, 'bench', '1 hour')")
psql -d $DB -c "SELECT meshhook_limits.tick()" >/dev/null
t1=$(date +%s.%N)
[[ $granted == "$SLOTS" ]] || { echo "only $granted of $SLOTS slots granted" >&2; exit 1; }

# One psql session per case: \timing of each scrape, median of RUNS.
time_case() {  # $1: SET statements run first, $2: scrapes
  { echo "$1"; echo '\timing on'; for ((i = 0; i < $2; i++)); do echo 'SELECT length(meshhook_limits.metrics());'; done; } \
    | psql -d $DB -At | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | sort -n \
    | awk '{a[NR] = $1} END {if (NR == 0) exit 1; m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2;
                             printf "%.1f %.1f %.1f\n", m, a[1], a[NR]}'
}
shape() {  # bytes, series and tenant labels of one scrape
  psql -d $DB -At -c "$1" -c "SELECT meshhook_limits.metrics()" \
    | awk '/^#/ {next} NF {s++; b += length($0) + 1} /tenant_id="/ {match($0, /tenant_id="[^"]*"/); t[substr($0, RSTART, RLENGTH)] = 1}
           END {n = 0; for (k in t) n++; printf "%d %d %d\n", b, s, n}'
}
explain() {
  { echo "SET client_min_messages = log;"
    auto_explain_sql 0 analyze nested_statements timing
    cat <<'SQL'
SET auto_explain.log_format = text;
SELECT count(*) FROM meshhook_limits._metrics_rows(true, current_setting('meshhook_limits.metrics_max_tenants')::int,
  ARRAY(SELECT DISTINCT tenant_id::text FROM meshhook_limits.slots() WHERE state = 'live'));
SQL
  } | psql -d $DB 2>&1
}
over() { awk -v m="$1" -v t=$TARGET_MS 'BEGIN {exit !(m > t)}'; }

read -r stale_med stale_min stale_max < <(time_case "" "$STALE_RUNS")
stale_plan=""
if [[ ${BENCH_EXPLAIN:-0} == 1 ]] || over "$stale_med"; then stale_plan=$(explain); fi
psql -d $DB -c "ANALYZE" >/dev/null
psql -d $DB -c "SELECT length(meshhook_limits.metrics())" >/dev/null   # warm the caches
read -r on_med on_min on_max < <(time_case "" "$RUNS")
read -r on_bytes on_series on_tenants < <(shape "SET client_min_messages = warning")
read -r off_med off_min off_max < <(time_case "SET meshhook_limits.metrics_tenant_labels = off;" "$RUNS")
read -r off_bytes off_series off_tenants < <(shape "SET meshhook_limits.metrics_tenant_labels = off")
max_tenants=$(psql -d $DB -At -c "SHOW meshhook_limits.metrics_max_tenants")
on_plan=""
if [[ ${BENCH_EXPLAIN:-0} == 1 ]] || over "$on_med"; then on_plan=$(explain); fi
# The same with tenant_plans not empty: every 7th tenant on a plan, ANALYZE.
psql -d $DB >/dev/null <<SQL
SELECT meshhook_limits.create_plan('pro');
SELECT meshhook_limits.set_plan_limit('pro', 'api_calls', 5000, window_length => '1 hour');
SELECT count(meshhook_limits.assign_plan($tenant, 'pro')) FROM generate_series(1, $TENANTS, 7) n;
ANALYZE;
SQL
read -r plan_med plan_min plan_max < <(time_case "" "$RUNS")

cat <<EOF

## metrics() scrape time, $TENANTS tenants
$(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); $("$PG_BIN/postgres" --version); set-up $(printf '%.0f' "$(echo "$t1 - $t0" | bc)") s.
$TENANTS tenants with 2 limits and usage each, $SLOTS with a live slot; median of $RUNS scrapes (min-max).

| case | median ms | min-max ms | series | tenant labels | bytes |
| --- | ---: | ---: | ---: | ---: | ---: |
| tenant labels on (metrics_max_tenants = $max_tenants) | $on_med | $on_min-$on_max | $on_series | $on_tenants | $on_bytes |
| tenant labels off | $off_med | $off_min-$off_max | $off_series | $off_tenants | $off_bytes |
| tenant labels on, before any ANALYZE ($STALE_RUNS scrapes) | $stale_med | $stale_min-$stale_max | $on_series | $on_tenants | $on_bytes |
| tenant labels on, every 7th tenant on a plan, after ANALYZE | $plan_med | $plan_min-$plan_max | | | |
EOF

if [[ -n $stale_plan ]]; then
  echo
  echo "### Where the time goes before ANALYZE (over ${TARGET_MS} ms or BENCH_EXPLAIN=1)"
  echo "$stale_plan"
fi
if [[ -n $on_plan ]]; then
  echo
  echo "### Where the time goes after ANALYZE, no plans (over ${TARGET_MS} ms or BENCH_EXPLAIN=1)"
  echo "$on_plan"
fi
