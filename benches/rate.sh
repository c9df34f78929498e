#!/usr/bin/env bash
# Side-by-side pgbench run for rate limits: SELECT 1 floor, a hand-written
# PL/pgSQL token bucket in a table, and meshhook_limits.check_rate_limit
# (GCRA in shared memory), with 100 keys and with one hot key. Prints a
# markdown table of tps and ratios.
#
#   bash benches/rate.sh
#   BENCH_SECONDS=30 bash benches/rate.sh
#
# Environment:
#   BENCH_SECONDS   measured seconds per case (default 15)
#   BENCH_WARMUP    warm-up seconds before each case, discarded (default 3)
#   BENCH_CLUSTER   name of the throwaway cluster for scripts/pg.sh (default bench-rate)
#   BENCH_OUT       directory for raw pgbench logs and results.md
#                   (default /tmp/meshhook_limits/bench-rate-results)
#
# Exit status: 0 when every case ran cleanly, whether targets were met or not
# (a benchmark is not a test); 1 when something broke: pgbench errors or
# aborted clients, failed transactions, refused requests in a scenario that
# never reaches its limit, a crashed backend, the library replaced mid-run;
# 2 for a missing prerequisite.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
PG_BIN=/usr/lib/postgresql/15/bin
PGBENCH=$PG_BIN/pgbench
PSQL=$PG_BIN/psql
DURATION=${BENCH_SECONDS:-15}
WARMUP=${BENCH_WARMUP:-3}
CLUSTER=${BENCH_CLUSTER:-bench-rate}
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-rate-results}
CLIENTS=16
THREADS=2
MODE=prepared
DB=bench
RATE=1e6   # requests per second and burst: never reached by 16 clients
CASES=6

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
# restart_grace = 0 as in run.sh; worker = off so no background tick runs
# beside the measured statements. The extra conf lines only apply when the
# cluster is created, hence destroy.
"$root/scripts/pg.sh" destroy "$CLUSTER" >/dev/null 2>&1 || true
stop_cluster() { "$root/scripts/pg.sh" stop "$CLUSTER" >/dev/null 2>&1 || true; }
trap stop_cluster EXIT
eval "$("$root/scripts/pg.sh" start "$CLUSTER" 'meshhook_limits.restart_grace = 0' 'meshhook_limits.worker = off')"
unset PGDATABASE PGOPTIONS PGSERVICE
export PGAPPNAME=meshhook_limits_bench

q() { "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$DB" -c "$1"; }
"$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE $DB" >/dev/null
q "CREATE EXTENSION meshhook_limits" >/dev/null
# Global default for every tenant and key; neither scenario comes near it.
q "SELECT meshhook_limits.set_limit('requests_per_second', $RATE, burst => $RATE)" >/dev/null
PGOPTIONS='-c client_min_messages=warning' "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$here/handwritten_rate.sql" >/dev/null
q "VACUUM ANALYZE" >/dev/null
# The same rule both ways: the extension must resolve 1e6/s, burst 1e6.
rule=$(q "SELECT rate || ' ' || burst FROM meshhook_limits._rate_rule('00000000-0000-0000-0000-000000000001', 'upstream-1')")
[[ $rule == "1000000 1000000" ]] || { echo "unexpected rate rule for the benchmark keys: '$rule'" >&2; exit 1; }

# --- machine and settings ----------------------------------------------------
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
[[ -n $cpu_model ]] || cpu_model=$(uname -m)
mem_gib=$(awk '/^MemTotal/ {printf "%.1f", $2/1048576}' /proc/meminfo)
pg_version=$(q "SELECT version()")
data_fs=$(df -T "$PGDATA" | awk 'NR==2 {print $2 " on " $1}')
settings=$(q "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name)
                FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit', 'wal_sync_method',
                  'full_page_writes', 'shared_buffers', 'max_connections', 'commit_delay',
                  'wal_level', 'meshhook_limits.restart_grace', 'meshhook_limits.worker')")
ext_version=$(q "SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'")
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
server_log=$(dirname "$PGDATA")/server.log

# --- running a case ----------------------------------------------------------
broken=()
rows=()     # key|scenario|case|tps|latency|other CPU
declare -A TPS

run_pgbench() { # log keys script seconds
  "$PGBENCH" -n -M "$MODE" -c "$CLIENTS" -j "$THREADS" -T "$4" -D keys="$2" \
    -f "$here/pgbench/$3" "$DB" >"$1" 2>&1
}

# CPU accounting, as in run.sh: how much of the machine something else used
# while a case ran. All in seconds.
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)
cpu_busy() { awk -v hz="$HZ" '/^cpu / { print ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
cluster_cpu() {
  local pm; pm=$(head -1 "$PGDATA/postmaster.pid")
  { cat "/proc/$pm/stat"; for c in $(pgrep -P "$pm"); do cat "/proc/$c/stat" 2>/dev/null || true; done; } |
    awk -v hz="$HZ" '{ sub(/^.*\) /, ""); t += $12 + $13 + $14 + $15 } END { print t / hz }'
}
# Sets CHILD_CPU; call it directly, not in $(...).
children_cpu() {
  times >"$OUT/.times"
  CHILD_CPU=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { m = $i; sub(/m.*/, "", m); s = $i; sub(/^[0-9]+m/, "", s); sub(/s$/, "", s); t += m * 60 + s } print t }' "$OUT/.times")
}
now_s() { date +%s.%N; }
field() { sed -n "$2" "$1" | head -1; }
wait_ready() { "$PG_BIN/pg_isready" -q -t 60 -d "$DB" || true; }

# run_case KEY SCENARIO CASE SCRIPT KEYS
run_case() {
  local key=$1 scenario=$2 label=$3 script=$4 keys=$5
  local log="$OUT/$key.log" rc=0 name="$scenario / $label"
  printf '  %-40s ' "$name" >&2
  if [[ $script == rate_table.sql ]]; then
    # Full buckets and no dead tuples left by the previous case.
    { q "UPDATE handwritten_rate.bucket SET tokens = cap, ts = clock_timestamp()" \
        && q "VACUUM ANALYZE handwritten_rate.bucket"; } >/dev/null \
      || broken+=("$name: could not reset the hand-written buckets")
  fi
  q "CHECKPOINT" >/dev/null 2>&1 || true
  if (( WARMUP > 0 )); then
    run_pgbench "$OUT/$key.warmup.log" "$keys" "$script" "$WARMUP" || rc=$?
    if (( rc != 0 )); then
      broken+=("$name: warm-up pgbench exited $rc: $(grep -m1 -i error "$OUT/$key.warmup.log" || true) (see $OUT/$key.warmup.log)")
      wait_ready
    fi
  fi
  local before=""
  if [[ $script == rate_extension.sql ]]; then
    before=$(q "SELECT allowed || ' ' || denied || ' ' || evictions FROM meshhook_limits.rate_limit_stats()" 2>/dev/null) || before=""
  fi

  rc=0
  local t0 b0 c0 k0 t1 b1 c1 k1 other
  t0=$(now_s); b0=$(cpu_busy); c0=$(cluster_cpu); children_cpu; k0=$CHILD_CPU
  run_pgbench "$log" "$keys" "$script" "$DURATION" || rc=$?
  sleep 0.3 # let the postmaster reap the backends
  t1=$(now_s); b1=$(cpu_busy); c1=$(cluster_cpu); children_cpu; k1=$CHILD_CPU
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
  if [[ $script == rate_extension.sql ]]; then
    if stats=$(q "SELECT allowed || ' ' || denied || ' ' || evictions FROM meshhook_limits.rate_limit_stats()" 2>/dev/null) && [[ -n $before ]]; then
      local allowed denied evictions a0 d0 e0
      read -r allowed denied evictions <<<"$stats"
      read -r a0 d0 e0 <<<"$before"
      local da=$((allowed - a0)) dd=$((denied - d0)) de=$((evictions - e0))
      check+=", rate_limit_stats: allowed+$da, denied+$dd, evictions+$de"
      (( dd == 0 )) || broken+=("$name: $dd request(s) refused in a scenario that never reaches its limit")
      [[ $da == "${processed:-x}" ]] || check+=" (allowed != processed)"
    else
      broken+=("$name: could not read meshhook_limits.rate_limit_stats() around the run")
    fi
  elif [[ $script == rate_table.sql ]]; then
    # A refused request leaves its bucket below one token; none may be.
    if stats=$(q "SELECT count(*) FILTER (WHERE tokens < 1) || ' ' || round(min(tokens)) FROM handwritten_rate.bucket" 2>/dev/null); then
      local low min_tokens
      read -r low min_tokens <<<"$stats"
      check+=", hand-written: min(tokens)=$min_tokens"
      [[ $low == 0 ]] || broken+=("$name: $low hand-written bucket(s) ran dry (requests refused)")
    else
      broken+=("$name: could not read the hand-written buckets after the run")
    fi
  fi
  echo "tps=${tps:-n/a}  ($check, other CPU $other)" >&2
  TPS[$key]=${tps:-0}
  rows+=("$key|$scenario|$label|${tps:-0}|${lat:-0}|$other")
}

total=$(( CASES * (DURATION + WARMUP) ))
echo "meshhook_limits rate benchmark: $CASES cases x (${WARMUP}s warm-up + ${DURATION}s), ~${total}s of pgbench" >&2
run_case floor_start "floor"      "SELECT 1 (start)"             select1.sql        1
run_case tbl_100     "100 keys"   "hand-written token bucket"    rate_table.sql     100
run_case ext_100     "100 keys"   "meshhook_limits"              rate_extension.sql 100
run_case tbl_hot     "1 hot key"  "hand-written token bucket"    rate_table.sql     1
run_case ext_hot     "1 hot key"  "meshhook_limits"              rate_extension.sql 1
run_case floor_end   "floor"      "SELECT 1 (end)"               select1.sql        1

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
  echo "## meshhook_limits: check_rate_limit vs a hand-written token bucket"
  echo
  echo "- run: $(date -u +'%Y-%m-%d %H:%M UTC'), ${CLIENTS} clients, ${THREADS} pgbench threads, ${DURATION} s per case after ${WARMUP} s warm-up, \`pgbench -M $MODE\`"
  echo "- machine: $(nproc) CPUs ($cpu_model), ${mem_gib} GiB RAM, data directory on $data_fs, pgbench and server on the same machine"
  echo "- server: $pg_version; meshhook_limits $ext_version (.so sha256 $so_sha…)"
  echo "- load average (1/5/15 min) at start: $load_start; at end: $load_end"
  echo "- settings: $settings"
  echo
  echo "| scenario | case | tps | latency ms | × SELECT 1 floor | ext / hand-written | other CPU |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
  local r key scenario label tps lat other vs_floor vs_hw
  for r in "${rows[@]}"; do
    IFS='|' read -r key scenario label tps lat other <<<"$r"
    vs_floor=$(ratio "$tps" "$floor")
    vs_hw=""
    case $key in
      ext_100) vs_hw="$(ratio "$tps" "${TPS[tbl_100]}")×" ;;
      ext_hot) vs_hw="$(ratio "$tps" "${TPS[tbl_hot]}")×" ;;
    esac
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$scenario" "$label" "$(calc 0 "$tps")" "$lat" "$vs_floor" "$vs_hw" "$other"
  done
  echo
  echo "SELECT 1 floor = mean of the two floor runs = $(calc 0 "$floor") tps (drift start → end: $drift)."
  echo "Every pgbench transaction is one statement in one autocommit transaction."
  echo
  echo "other CPU = share of the machine's CPU used by processes outside this benchmark"
  echo "(neither the cluster nor pgbench) while the case ran; above a few % the numbers are noisy."
  echo
  echo "### Targets"
  echo
  target() { # label value threshold
    local verdict
    verdict=$(awk -v v="$2" -v t="$3" 'BEGIN { print (v != "n/a" && v + 0 >= t + 0) ? "PASS" : "MISS" }')
    echo "- $verdict: $1: $2 (target ≥ $3)"
  }
  target "ext / SELECT 1 floor, 100 keys" "$(ratio "${TPS[ext_100]}" "$floor")" 0.5
  target "ext / SELECT 1 floor, 1 hot key" "$(ratio "${TPS[ext_hot]}" "$floor")" 0.5
  target "ext / hand-written, 100 keys" "$(ratio "${TPS[ext_100]}" "${TPS[tbl_100]}")" 5
  target "ext / hand-written, 1 hot key" "$(ratio "${TPS[ext_hot]}" "${TPS[tbl_hot]}")" 5
  echo
  echo "### Checks"
  echo
  if (( ${#broken[@]} == 0 )); then
    echo "- OK: no pgbench errors or failed transactions; no request refused by"
    echo "  meshhook_limits (rate_limit_stats().denied unchanged) and no hand-written"
    echo "  bucket below one token after its cases."
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
