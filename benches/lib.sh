# Shared parts of the benchmark runners (run.sh, rate.sh, pgboss.sh,
# metrics.sh). Sourced, not run:
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Defines here, root, PG_BIN, PSQL, PGBENCH, SO, HZ, NCPU and functions only;
# nothing runs until a runner calls it. The runner sets its own shell options
# (set -euo pipefail) and, before calling the functions that need them,
# CLUSTER, DB, OUT (directory of raw output) and, for run_case, DURATION,
# WARMUP, CLIENTS, THREADS, MODE, PGBENCH_DEFINE and the array broken.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
PG_BIN=/usr/lib/postgresql/15/bin
PGBENCH=$PG_BIN/pgbench
PSQL=$PG_BIN/psql
SO=/usr/lib/postgresql/15/lib/meshhook_limits.so

# --- arguments and prerequisites ---------------------------------------------
need_positive() { # NAME VALUE
  [[ $2 =~ ^[1-9][0-9]*$ ]] || { echo "$1 must be a positive integer" >&2; exit 2; }
}
need_nonneg() { # NAME VALUE
  [[ $2 =~ ^[0-9]+$ ]] || { echo "$1 must be a non-negative integer" >&2; exit 2; }
}
need_pgbench() { [[ -x $PGBENCH ]] || { echo "pgbench not found at $PGBENCH" >&2; exit 2; }; }

# The installed library must exist; remember which one it is. Reinstalling it
# while the cluster runs invalidates the run (and can crash backends that have
# it mapped); so_checks notices it.
need_so() {
  [[ -f $SO ]] || { echo "meshhook_limits is not installed; run make bench (or scripts/setup.sh) first" >&2; exit 2; }
  # cargo pgrx test installs its debug build (with the pg_test functions,
  # ~25x slower in places); never measure that one.
  if ! cmp -s "$SO" "$root/target/release/libmeshhook_limits.so"; then
    echo "the installed $SO is not this checkout's release build; run make bench (or bash scripts/setup.sh) first" >&2
    exit 2
  fi
  so_before=$(so_stamp)
  so_sha=$(sha256sum "$SO" | cut -c1-12)
}
so_stamp() { stat -L -c '%i %s %Y' "$SO"; }

# --- cluster -------------------------------------------------------------------
# start_cluster [postgresql.conf lines...]: a new throwaway cluster $CLUSTER
# (scripts/pg.sh). The extra conf lines only apply when the cluster is
# created, hence destroy first. Stopped when the script exits. Exports
# PGHOST, PGPORT, PGUSER, PGDATA; sets server_log.
start_cluster() {
  "$root/scripts/pg.sh" destroy "$CLUSTER" >/dev/null 2>&1 || true
  trap stop_cluster EXIT
  eval "$("$root/scripts/pg.sh" start "$CLUSTER" "$@")"
  server_log=$(dirname "$PGDATA")/server.log
}
stop_cluster() { "$root/scripts/pg.sh" stop "$CLUSTER" >/dev/null 2>&1 || true; }
destroy_cluster() { "$root/scripts/pg.sh" destroy "$CLUSTER" >/dev/null 2>&1 || true; }
# Connections of the benchmark: no database, options or service from the
# caller's environment, and a recognisable application name.
bench_client_env() {
  unset PGDATABASE PGOPTIONS PGSERVICE
  export PGAPPNAME=meshhook_limits_bench
}

qdb() { # DB SQL: one statement, unaligned tuples only
  "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$1" -c "$2"
}
create_bench_db() { # DB: the database with the extension in it
  qdb postgres "CREATE DATABASE $1" >/dev/null
  qdb "$1" "CREATE EXTENSION meshhook_limits" >/dev/null
}
# After a crash the postmaster reinitialises; wait for it before going on.
wait_ready() { "$PG_BIN/pg_isready" -q -t 60 -d "$DB" || true; }

# auto_explain_sql MIN_MS OPTION...: psql lines that load auto_explain for the
# session, logging the plans of statements over MIN_MS ms with
# auto_explain.log_OPTION = on for each OPTION, as NOTICEs.
auto_explain_sql() {
  local opt
  echo "LOAD 'auto_explain';"
  echo "SET auto_explain.log_min_duration = $1;"
  shift
  for opt; do echo "SET auto_explain.log_$opt = on;"; done
  echo "SET auto_explain.log_level = notice;"
}

# --- machine and settings ------------------------------------------------------
machine_info() { # DB: sets cpu_model mem_gib pg_version data_fs ext_version load_start
  cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)
  [[ -n $cpu_model ]] || cpu_model=$(uname -m)
  mem_gib=$(awk '/^MemTotal/ {printf "%.1f", $2/1048576}' /proc/meminfo)
  pg_version=$(qdb "$1" "SELECT version()")
  data_fs=$(df -T "$PGDATA" | awk 'NR==2 {print $2 " on " $1}')
  ext_version=$(qdb "$1" "SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'")
  load_start=$(cut -d' ' -f1-3 /proc/loadavg)
}
pg_settings_of() { # DB NAME...: "name=value, ..." in name order
  local names
  names=$(printf "'%s', " "${@:2}")
  qdb "$1" "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name)
              FROM pg_settings WHERE name IN (${names%, })"
}

# The lines of the report that say where and on what it ran.
# report_machine RUN_DETAILS CLIENT SERVER_DETAILS SETTINGS_LABEL SETTINGS
report_machine() {
  echo "- run: $(date -u +'%Y-%m-%d %H:%M UTC')$1"
  echo "- machine: $(nproc) CPUs ($cpu_model), ${mem_gib} GiB RAM, data directory on $data_fs, $2 and server on the same machine"
  echo "- server: $pg_version; meshhook_limits $ext_version (.so sha256 $so_sha…$3)"
  echo "- load average (1/5/15 min) at start: $load_start; at end: $load_end"
  echo "- settings$4: $5"
}

# --- CPU accounting ------------------------------------------------------------
# To tell how much of the machine something else used while a case ran (this
# machine may be shared with builds and tests). All in seconds.
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)
# Busy time of the whole machine (user, nice, system, irq, softirq, steal).
cpu_busy() { awk -v hz="$HZ" '/^cpu / { print ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
# CPU of the cluster: the postmaster, its exited children (backends of
# finished client runs are reaped into cutime/cstime) and its live children.
cluster_cpu() {
  local pm; pm=$(head -1 "$PGDATA/postmaster.pid")
  { cat "/proc/$pm/stat"; for c in $(pgrep -P "$pm"); do cat "/proc/$c/stat" 2>/dev/null || true; done; } |
    awk -v hz="$HZ" '{ sub(/^.*\) /, ""); t += $12 + $13 + $14 + $15 } END { print t / hz }'
}
proc_cpu() { # one process's own user+system CPU
  [[ -n $1 && -r /proc/$1/stat ]] || { echo 0; return; }
  awk -v hz="$HZ" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"
}
# CPU of this shell's finished children (pgbench, node), from the `times`
# builtin. Sets CHILD_CPU; call it directly, not in $(...), which would run
# `times` in a subshell.
children_cpu() {
  times >"$OUT/.times"
  CHILD_CPU=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { m = $i; sub(/m.*/, "", m); s = $i; sub(/^[0-9]+m/, "", s); sub(/s$/, "", s); t += m * 60 + s } print t }' "$OUT/.times")
}
now_s() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { print a - b }'; }
# Around a measured run: cpu_start before, cpu_end after (both called
# directly), then cpu_other, which sets cpu_elapsed and cpu_other_pct: the
# share of the machine's CPU capacity used by anything but the cluster and
# this shell's children.
cpu_start() { cpu_t0=$(now_s); cpu_b0=$(cpu_busy); cpu_c0=$(cluster_cpu); children_cpu; cpu_k0=$CHILD_CPU; }
cpu_end() {
  sleep 0.3 # let the postmaster reap the backends
  cpu_t1=$(now_s); cpu_b1=$(cpu_busy); cpu_c1=$(cluster_cpu); children_cpu; cpu_k1=$CHILD_CPU
}
cpu_other() {
  cpu_elapsed=$(sub "$cpu_t1" "$cpu_t0")
  cpu_other_pct=$(awk -v t="$cpu_elapsed" -v busy="$(sub "$cpu_b1" "$cpu_b0")" \
              -v ours="$(awk -v a="$cpu_c1" -v b="$cpu_c0" -v x="$cpu_k1" -v y="$cpu_k0" 'BEGIN { print a - b + x - y }')" \
              -v n="$NCPU" 'BEGIN { o = busy - ours; if (o < 0) o = 0; printf "%.0f%%", 100 * o / (n * t) }')
}

# --- pgbench cases -------------------------------------------------------------
broken=()       # what went wrong, for the Checks section and the exit status
rows=()         # one per case (run_case) or phase
declare -A TPS  # tps by case key
run_pgbench() { # log count script seconds
  "$PGBENCH" -n -M "$MODE" -c "$CLIENTS" -j "$THREADS" -T "$4" -D "$PGBENCH_DEFINE=$2" \
    -f "$here/pgbench/$3" "$DB" >"$1" 2>&1
}
field() { sed -n "$2" "$1" | head -1; }

# A runner compares two kinds of case besides the SELECT 1 floor: a
# hand-written equivalent in tables (pgbench/$HW_SCRIPT) and the extension
# (pgbench/$EXT_SCRIPT). It sets
#   HW_SCRIPT, HW_WHAT    the script and what its tables are, for messages
#   EXT_SCRIPT, EXT_STATS the script and the extension's statistics function
# and defines
#   hw_reset              statements that reset the tables before a case
#   hw_stats              prints the state of the tables after a case
#   hw_check NAME STATS   judges that state
#   ext_stats             prints the extension's counters (before and after)
#   ext_check NAME BEFORE AFTER PROCESSED
#                         judges the change of the counters over the run
# The check functions add to broken and to `check`, the local summary line of
# run_case that they are called from.

# run_case KEY SCENARIO CASE SCRIPT COUNT [COLUMN]: a warm-up, then DURATION
# seconds of pgbench -f pgbench/SCRIPT -D $PGBENCH_DEFINE=COUNT. Adds
# TPS[KEY] and a row KEY|SCENARIO|CASE|[COLUMN|]tps|latency|other CPU.
run_case() {
  local key=$1 scenario=$2 label=$3 script=$4 count=$5
  local log="$OUT/$key.log" rc=0 name="$scenario / $label"
  printf '  %-40s ' "$name" >&2
  if [[ $script == "$HW_SCRIPT" ]]; then
    hw_reset >/dev/null || broken+=("$name: could not reset the $HW_WHAT")
  fi
  qdb "$DB" "CHECKPOINT" >/dev/null 2>&1 || true
  if (( WARMUP > 0 )); then
    run_pgbench "$OUT/$key.warmup.log" "$count" "$script" "$WARMUP" || rc=$?
    if (( rc != 0 )); then
      broken+=("$name: warm-up pgbench exited $rc: $(grep -m1 -i error "$OUT/$key.warmup.log" || true) (see $OUT/$key.warmup.log)")
      wait_ready
    fi
  fi
  local before=""
  if [[ $script == "$EXT_SCRIPT" ]]; then
    before=$(ext_stats 2>/dev/null) || before=""
  fi

  rc=0
  cpu_start
  run_pgbench "$log" "$count" "$script" "$DURATION" || rc=$?
  cpu_end
  cpu_other
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
  if [[ $script == "$EXT_SCRIPT" ]]; then
    if stats=$(ext_stats 2>/dev/null) && [[ -n $before ]]; then
      ext_check "$name" "$before" "$stats" "$processed"
    else
      broken+=("$name: could not read $EXT_STATS around the run")
    fi
  elif [[ $script == "$HW_SCRIPT" ]]; then
    if stats=$(hw_stats 2>/dev/null); then
      hw_check "$name" "$stats"
    else
      broken+=("$name: could not read the $HW_WHAT after the run")
    fi
  fi
  echo "tps=${tps:-n/a}  ($check, other CPU $cpu_other_pct)" >&2
  TPS[$key]=${tps:-0}
  rows+=("$key|$scenario|$label|${6:+$6|}${tps:-0}|${lat:-0}|$cpu_other_pct")
}

# --- end of the run and report ---------------------------------------------------
# Sets load_end; adds to broken when the library was replaced or a backend
# crashed during the run.
end_checks() {
  load_end=$(cut -d' ' -f1-3 /proc/loadavg)
  [[ $(so_stamp) == "$so_before" ]] \
    || broken+=("$SO was replaced during the run (a build or install ran meanwhile); numbers are not trustworthy")
  local line
  while IFS= read -r line; do
    broken+=("server log: $line")
  done < <(grep -E 'terminated by signal|PANIC|server process .* exited with' "$server_log" 2>/dev/null || true)
}

calc() { awk "BEGIN { printf \"%.${1}f\", $2 }"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "n/a" }'; }
# The median of the numbers on stdin, separated by spaces or lines (n/a: none).
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { if (!NR) print "n/a"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# floor (mean tps of the two SELECT 1 runs) and drift (start → end).
floor_stats() {
  floor=$(calc 1 "(${TPS[floor_start]} + ${TPS[floor_end]}) / 2")
  drift=$(awk -v a="${TPS[floor_start]}" -v b="${TPS[floor_end]}" 'BEGIN { if (a > 0) printf "%+.1f%%", (b - a) / a * 100; else printf "n/a" }')
}
verdict() { # VALUE OP THRESHOLD (OP >= or <): PASS or MISS
  awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN { ok = (op == "<") ? (v + 0 < t + 0) : (v + 0 >= t + 0); print (v != "n/a" && ok) ? "PASS" : "MISS" }'
}
target() { # label value threshold
  echo "- $(verdict "$2" '>=' "$3"): $1: $2 (target ≥ $3)"
}
other_cpu_note() {
  echo "other CPU = share of the machine's CPU used by processes outside this benchmark"
  echo "(neither the cluster nor pgbench) while the case ran; above a few % the numbers are noisy."
}
# The title and the lines on the machine of a pgbench report.
pgbench_report_head() { # TITLE
  echo "## $1"
  echo
  report_machine ", ${CLIENTS} clients, ${THREADS} pgbench threads, ${DURATION} s per case after ${WARMUP} s warm-up, \`pgbench -M $MODE\`" \
    pgbench "" "" "$settings"
  echo
}
# A table row per run_case row: scenario, case, [column,] tps, latency, ratio
# to the floor, for ext_100 and ext_hot the ratio to the hand-written case
# HW_100 or HW_HOT, other CPU.
pgbench_report_rows() { # HW_100 HW_HOT
  local r f n tps vs_hw
  for r in "${rows[@]}"; do
    IFS='|' read -r -a f <<<"$r"
    n=${#f[@]} tps=${f[n - 3]}
    vs_hw=""
    case ${f[0]} in
      ext_100) vs_hw="$(ratio "$tps" "${TPS[$1]}")×" ;;
      ext_hot) vs_hw="$(ratio "$tps" "${TPS[$2]}")×" ;;
    esac
    printf '| %s ' "${f[@]:1:n - 4}"
    printf '| %s | %s | %s | %s | %s |\n' "$(calc 0 "$tps")" "${f[n - 2]}" "$(ratio "$tps" "$floor")" "$vs_hw" "${f[n - 1]}"
  done
}
report_checks() { # the lines to print when nothing broke
  echo "### Checks"
  echo
  if (( ${#broken[@]} == 0 )); then
    printf '%s\n' "$@"
  else
    local b
    for b in "${broken[@]}"; do echo "- BROKEN: $b"; done
  fi
}
# publish WHAT: runs the runner's report function into $OUT/results.md and
# stdout; fails when something broke.
publish() {
  echo >&2
  report | tee "$OUT/results.md"
  echo >&2
  echo "$1 and results.md: $OUT" >&2
  (( ${#broken[@]} == 0 ))
}
