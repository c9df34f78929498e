#!/usr/bin/env bash
# Side-by-side pgbench run: SELECT 1 floor, a hand-written PL/pgSQL counter,
# and meshhook_limits.acquire/release_execution_slot, with 100 tenants and
# with one hot tenant. Prints a markdown table of tps and ratios.
#
#   bash benches/run.sh                 (what `make bench` runs)
#   BENCH_SECONDS=30 bash benches/run.sh
#
# Environment:
#   BENCH_SECONDS   measured seconds per case (default 15)
#   BENCH_WARMUP    warm-up seconds before each case, discarded (default 3)
#   BENCH_CLUSTER   name of the throwaway cluster for scripts/pg.sh (default bench)
#   BENCH_OUT       directory for raw pgbench logs and results.md
#                   (default /tmp/meshhook_limits/bench-results)
#
# Exit status: 0 when every case ran cleanly, whether targets were met or not
# (a benchmark is not a test); 1 when something broke: pgbench errors or
# aborted clients, failed transactions, leaked slots, unexpected refusals.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
PG_BIN=/usr/lib/postgresql/15/bin
PGBENCH=$PG_BIN/pgbench
PSQL=$PG_BIN/psql
DURATION=${BENCH_SECONDS:-15}
WARMUP=${BENCH_WARMUP:-3}
CLUSTER=${BENCH_CLUSTER:-bench}
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-results}
CLIENTS=16
THREADS=2
MODE=prepared # the scripts bind :slot_id as a parameter ($1), as drivers do
DB=bench
HOT_LIMIT=1000

[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_SECONDS must be a positive integer" >&2; exit 2; }
[[ $WARMUP =~ ^[0-9]+$ ]] || { echo "BENCH_WARMUP must be a non-negative integer" >&2; exit 2; }
[[ -x $PGBENCH ]] || { echo "pgbench not found at $PGBENCH" >&2; exit 2; }
SO=/usr/lib/postgresql/15/lib/meshhook_limits.so
[[ -f $SO ]] || { echo "meshhook_limits is not installed; run make install first" >&2; exit 2; }
# Reinstalling the library while the cluster runs invalidates the run (and
# can crash backends that have it mapped); notice it.
so_stamp() { stat -L -c '%i %s %Y' "$SO"; }
so_before=$(so_stamp)
so_sha=$(sha256sum "$SO" | cut -c1-12)

mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/results.md

# --- cluster ---------------------------------------------------------------
# restart_grace = 0: slots are otherwise refused for a lease after start-up.
# The extra conf lines only apply when the cluster is created, hence destroy.
"$root/scripts/pg.sh" destroy "$CLUSTER" >/dev/null 2>&1 || true
stop_cluster() { "$root/scripts/pg.sh" stop "$CLUSTER" >/dev/null 2>&1 || true; }
trap stop_cluster EXIT
eval "$("$root/scripts/pg.sh" start "$CLUSTER" 'meshhook_limits.restart_grace = 0')"
unset PGDATABASE PGOPTIONS PGSERVICE
export PGAPPNAME=meshhook_limits_bench

q() { "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$DB" -c "$1"; }
"$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" >/dev/null
q "CREATE EXTENSION meshhook_limits" >/dev/null
# Global default; both scenarios (100 tenants, one hot tenant) sit far below it.
q "SELECT meshhook_limits.set_limit('concurrent_executions', $HOT_LIMIT)" >/dev/null
PGOPTIONS='-c client_min_messages=warning' "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$here/handwritten.sql" >/dev/null
q "VACUUM ANALYZE" >/dev/null

# --- machine and settings ----------------------------------------------------
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
mem_gib=$(awk '/^MemTotal/ {printf "%.1f", $2/1048576}' /proc/meminfo)
pg_version=$(q "SELECT version()")
data_fs=$(df -T "$PGDATA" | awk 'NR==2 {print $2 " on " $1}')
settings=$(q "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name)
                FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method',
                  'full_page_writes', 'shared_buffers', 'max_connections', 'commit_delay',
                  'wal_level', 'meshhook_limits.restart_grace')")

ext_version=$(q "SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'")
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
server_log=$(dirname "$PGDATA")/server.log

# --- running a case ----------------------------------------------------------
broken=()
rows=()     # key|scenario|case|stmts|tps|latency|other CPU
declare -A TPS

run_pgbench() { # log tenants script seconds
  "$PGBENCH" -n -M "$MODE" -c "$CLIENTS" -j "$THREADS" -T "$4" -D tenants="$2" \
    -f "$here/pgbench/$3" "$DB" >"$1" 2>&1
}

# CPU accounting, to tell how much of the machine something else used while a
# case ran (this machine may be shared with builds and tests). All in seconds.
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)
# Busy time of the whole machine (user, nice, system, irq, softirq, steal).
cpu_busy() { awk -v hz="$HZ" '/^cpu / { print ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
# CPU of the cluster: the postmaster, its exited children (backends of
# finished pgbench runs are reaped into cutime/cstime) and its live children.
cluster_cpu() {
  local pm; pm=$(head -1 "$PGDATA/postmaster.pid")
  { cat "/proc/$pm/stat"; for c in $(pgrep -P "$pm"); do cat "/proc/$c/stat" 2>/dev/null || true; done; } |
    awk -v hz="$HZ" '{ sub(/^.*\) /, ""); t += $12 + $13 + $14 + $15 } END { print t / hz }'
}
# CPU of this shell's finished children (pgbench), from the `times` builtin.
# Sets CHILD_CPU; call it directly, not in $(...), which would run `times` in a subshell.
children_cpu() {
  times >"$OUT/.times"
  CHILD_CPU=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { m = $i; sub(/m.*/, "", m); s = $i; sub(/^[0-9]+m/, "", s); sub(/s$/, "", s); t += m * 60 + s } print t }' "$OUT/.times")
}
now_s() { date +%s.%N; }

field() { sed -n "$2" "$1" | head -1; }

# After a crash the postmaster reinitialises; wait for it before going on.
wait_ready() { "$PG_BIN/pg_isready" -q -t 60 -d "$DB" || true; }

# run_case KEY SCENARIO CASE SCRIPT TENANTS STMTS
run_case() {
  local key=$1 scenario=$2 label=$3 script=$4 tenants=$5 stmts=$6
  local log="$OUT/$key.log" rc=0 name="$scenario / $label"
  printf '  %-40s ' "$name" >&2
  if [[ $script == handwritten.sql ]]; then
    { q "TRUNCATE handwritten.slot; UPDATE handwritten.quota SET in_use = 0" \
        && q "VACUUM ANALYZE handwritten.quota, handwritten.slot"; } >/dev/null \
      || broken+=("$name: could not reset the hand-written tables")
  fi
  q "CHECKPOINT" >/dev/null 2>&1 || true
  if (( WARMUP > 0 )); then
    run_pgbench "$OUT/$key.warmup.log" "$tenants" "$script" "$WARMUP" || rc=$?
    if (( rc != 0 )); then
      broken+=("$name: warm-up pgbench exited $rc: $(grep -m1 -i error "$OUT/$key.warmup.log" || true) (see $OUT/$key.warmup.log)")
      wait_ready
    fi
  fi
  local before=""
  if [[ $script == extension.sql ]]; then
    before=$(q "SELECT grants || ' ' || refusals FROM meshhook_limits.slot_stats()" 2>/dev/null) || before=""
  fi

  rc=0
  local t0 b0 c0 k0 t1 b1 c1 k1 other
  t0=$(now_s); b0=$(cpu_busy); c0=$(cluster_cpu); children_cpu; k0=$CHILD_CPU
  run_pgbench "$log" "$tenants" "$script" "$DURATION" || rc=$?
  sleep 0.3 # let the postmaster reap the backends
  t1=$(now_s); b1=$(cpu_busy); c1=$(cluster_cpu); children_cpu; k1=$CHILD_CPU
  # Share of the machine's CPU capacity used by anything but this benchmark.
  other=$(awk -v t="$(awk -v a="$t1" -v b="$t0" 'BEGIN { print a - b }')" \
              -v busy="$(awk -v a="$b1" -v b="$b0" 'BEGIN { print a - b }')" \
              -v ours="$(awk -v a="$c1" -v b="$c0" -v x="$k1" -v y="$k0" 'BEGIN { print a - b + x - y }')" \
              -v n="$NCPU" 'BEGIN { o = busy - ours; if (o < 0) o = 0; printf "%.0f%%", 100 * o / (n * t) }')
  local tps lat processed failed
  tps=$(field "$log" 's/^tps = \([0-9.]*\) .*/\1/p')
  lat=$(field "$log" 's/^latency average = \([0-9.]*\) ms.*/\1/p')
  processed=$(field "$log" 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  failed=$(field "$log" 's/^number of failed transactions: \([0-9]*\).*/\1/p')
  local check="pgbench rc=$rc, processed=${processed:-?}, failed=${failed:-?}"
  if (( rc != 0 )) || grep -qiE 'aborted|error' "$log" || [[ -z $tps || ${failed:-1} != 0 ]]; then
    broken+=("$name: pgbench failed ($check): $(grep -m1 -i error "$log" || true) (see $log)")
    wait_ready
  fi

  local stats
  if [[ $script == extension.sql ]]; then
    if stats=$(q "SELECT live || ' ' || grants || ' ' || refusals FROM meshhook_limits.slot_stats()" 2>/dev/null) && [[ -n $before ]]; then
      local live grants refusals g0 r0
      read -r live grants refusals <<<"$stats"
      read -r g0 r0 <<<"$before"
      local dg=$((grants - g0)) dr=$((refusals - r0))
      check+=", slot_stats: live=$live, grants+$dg, refusals+$dr"
      (( live == 0 )) || broken+=("$name: $live slot(s) still live after the run (leak)")
      (( dr == 0 )) || broken+=("$name: $dr acquisition(s) refused in a scenario that never reaches its limit")
      [[ $dg == "${processed:-x}" ]] || check+=" (grants != processed)"
    else
      broken+=("$name: could not read meshhook_limits.slot_stats() around the run")
    fi
  elif [[ $script == handwritten.sql ]]; then
    if stats=$(q "SELECT (SELECT count(*) FROM handwritten.slot) || ' ' || (SELECT sum(in_use) FROM handwritten.quota)" 2>/dev/null); then
      local held in_use
      read -r held in_use <<<"$stats"
      check+=", hand-written: slot rows=$held, sum(in_use)=$in_use"
      [[ $held == 0 && $in_use == 0 ]] || broken+=("$name: hand-written counter left $held slot rows, in_use=$in_use")
    else
      broken+=("$name: could not read the hand-written tables after the run")
    fi
  fi
  echo "tps=${tps:-n/a}  ($check, other CPU $other)" >&2
  TPS[$key]=${tps:-0}
  rows+=("$key|$scenario|$label|$stmts|${tps:-0}|${lat:-0}|$other")
}

total=$(( 6 * (DURATION + WARMUP) ))
echo "meshhook_limits benchmark: 6 cases x (${WARMUP}s warm-up + ${DURATION}s), ~${total}s of pgbench" >&2
run_case floor_start "floor"         "SELECT 1 (start)"       select1.sql     1   1
run_case hw_100      "100 tenants"   "hand-written counter"   handwritten.sql 100 2
run_case ext_100     "100 tenants"   "meshhook_limits"        extension.sql   100 2
run_case hw_hot      "1 hot tenant"  "hand-written counter"   handwritten.sql 1   2
run_case ext_hot     "1 hot tenant"  "meshhook_limits"        extension.sql   1   2
run_case floor_end   "floor"         "SELECT 1 (end)"         select1.sql     1   1

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
[[ $(so_stamp) == "$so_before" ]] \
  || broken+=("$SO was replaced during the run (a build or install ran meanwhile); numbers are not trustworthy")
while IFS= read -r line; do
  broken+=("server log: $line")
done < <(grep -E 'terminated by signal|PANIC|server process .* exited with' "$server_log" 2>/dev/null || true)

# --- report ------------------------------------------------------------------
calc() { awk "BEGIN { printf \"%.${1}f\", $2 }"; }
floor=$(calc 1 "(${TPS[floor_start]} + ${TPS[floor_end]}) / 2")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
drift=$(awk -v a="${TPS[floor_start]}" -v b="${TPS[floor_end]}" 'BEGIN { if (a > 0) printf "%+.1f%%", (b - a) / a * 100; else printf "n/a" }')

report() {
  echo "## meshhook_limits: execution slots vs a hand-written counter"
  echo
  echo "- run: $(date -u +'%Y-%m-%d %H:%M UTC'), ${CLIENTS} clients, ${THREADS} pgbench threads, ${DURATION} s per case after ${WARMUP} s warm-up, \`pgbench -M $MODE\`"
  echo "- machine: $(nproc) CPUs ($cpu_model), ${mem_gib} GiB RAM, data directory on $data_fs, pgbench and server on the same machine"
  echo "- server: $pg_version; meshhook_limits $ext_version (.so sha256 $so_sha…)"
  echo "- load average (1/5/15 min) at start: $load_start; at end: $load_end"
  echo "- settings: $settings"
  echo
  echo "| scenario | case | statements per pgbench txn | tps | latency ms | × SELECT 1 floor | ext / hand-written | other CPU |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  local r key scenario label stmts tps lat other vs_floor vs_hw
  for r in "${rows[@]}"; do
    IFS='|' read -r key scenario label stmts tps lat other <<<"$r"
    vs_floor=$(ratio "$tps" "$floor")
    vs_hw=""
    case $key in
      ext_100) vs_hw="$(ratio "$tps" "${TPS[hw_100]}")×" ;;
      ext_hot) vs_hw="$(ratio "$tps" "${TPS[hw_hot]}")×" ;;
    esac
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$scenario" "$label" "$stmts" "$(calc 0 "$tps")" "$lat" "$vs_floor" "$vs_hw" "$other"
  done
  echo
  echo "SELECT 1 floor = mean of the two floor runs = $(calc 0 "$floor") tps (drift start → end: $drift)."
  echo
  echo "other CPU = share of the machine's CPU used by processes outside this benchmark"
  echo "(neither the cluster nor pgbench) while the case ran; above a few % the numbers are noisy."
  echo
  echo "A pgbench transaction of the slot cases is two statements, each its own"
  echo "autocommit transaction (acquire, then release), against one statement for"
  echo "SELECT 1. The tps and ratios above count acquire+release pairs, not statements."
  echo
  echo "### Targets"
  echo
  target() { # label value threshold
    local verdict
    verdict=$(awk -v v="$2" -v t="$3" 'BEGIN { print (v != "n/a" && v + 0 >= t + 0) ? "PASS" : "MISS" }')
    echo "- $verdict: $1: $2 (target ≥ $3)"
  }
  target "ext / hand-written, 100 tenants" "$(ratio "${TPS[ext_100]}" "${TPS[hw_100]}")" 3
  target "ext / hand-written, 1 hot tenant" "$(ratio "${TPS[ext_hot]}" "${TPS[hw_hot]}")" 5
  target "ext / SELECT 1 floor, 100 tenants" "$(ratio "${TPS[ext_100]}" "$floor")" 0.25
  target "ext / SELECT 1 floor, 1 hot tenant" "$(ratio "${TPS[ext_hot]}" "$floor")" 0.25
  echo
  echo "### Checks"
  echo
  if (( ${#broken[@]} == 0 )); then
    echo "- OK: no pgbench errors or failed transactions; after every meshhook_limits case"
    echo "  slot_stats().live = 0 and no acquisition was refused; the hand-written"
    echo "  counter ended every case at in_use = 0 with no slot rows."
  else
    local b
    for b in "${broken[@]}"; do echo "- BROKEN: $b"; done
  fi
}

echo >&2
report | tee "$OUT/results.md"
echo >&2
echo "raw pgbench output and results.md: $OUT" >&2
(( ${#broken[@]} == 0 ))
