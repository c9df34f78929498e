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

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DURATION=${BENCH_SECONDS:-15}
WARMUP=${BENCH_WARMUP:-3}
CLUSTER=${BENCH_CLUSTER:-bench-rate}
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-rate-results}
CLIENTS=16
THREADS=2
MODE=prepared
PGBENCH_DEFINE=keys
DB=bench
RATE=1e6   # requests per second and burst: never reached by 16 clients
CASES=6

need_positive BENCH_SECONDS "$DURATION"
need_nonneg BENCH_WARMUP "$WARMUP"
need_pgbench
need_so

mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/results.md

# --- cluster ---------------------------------------------------------------
# restart_grace = 0 as in run.sh; worker = off so no background tick runs
# beside the measured statements.
start_cluster 'meshhook_limits.restart_grace = 0' 'meshhook_limits.worker = off'
bench_client_env

q() { qdb "$DB" "$1"; }
create_bench_db "$DB"
# Global default for every tenant and key; neither scenario comes near it.
q "SELECT meshhook_limits.set_limit('requests_per_second', $RATE, burst => $RATE)" >/dev/null
PGOPTIONS='-c client_min_messages=warning' "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$here/handwritten_rate.sql" >/dev/null
q "VACUUM ANALYZE" >/dev/null
# The same rule both ways: the extension must resolve 1e6/s, burst 1e6.
# (One bucket per tenant: each tenant n checks its own key upstream-n.)
rule=$(q "SELECT tenant_rate || ' ' || tenant_burst FROM meshhook_limits._rate_rules('00000000-0000-0000-0000-000000000001', 'upstream-1')")
[[ $rule == "1000000 1000000" ]] || { echo "unexpected rate rule for the benchmark keys: '$rule'" >&2; exit 1; }

# --- machine and settings ----------------------------------------------------
machine_info "$DB"
settings=$(pg_settings_of "$DB" fsync synchronous_commit wal_sync_method full_page_writes shared_buffers \
  max_connections commit_delay wal_level meshhook_limits.restart_grace meshhook_limits.worker)

# --- running a case ----------------------------------------------------------
HW_SCRIPT=rate_table.sql HW_WHAT="hand-written buckets"
EXT_SCRIPT=rate_extension.sql EXT_STATS="meshhook_limits.rate_limit_stats()"
hw_reset() { # full buckets and no dead tuples left by the previous case
  q "UPDATE handwritten_rate.bucket SET tokens = cap, ts = clock_timestamp()" \
    && q "VACUUM ANALYZE handwritten_rate.bucket"
}
# A refused request leaves its bucket below one token; none may be.
hw_stats() { q "SELECT count(*) FILTER (WHERE tokens < 1) || ' ' || round(min(tokens)) FROM handwritten_rate.bucket"; }
hw_check() { # name stats
  local low min_tokens
  read -r low min_tokens <<<"$2"
  check+=", hand-written: min(tokens)=$min_tokens"
  [[ $low == 0 ]] || broken+=("$1: $low hand-written bucket(s) ran dry (requests refused)")
}
ext_stats() { q "SELECT allowed || ' ' || denied || ' ' || evictions FROM $EXT_STATS"; }
ext_check() { # name before after processed
  local allowed denied evictions a0 d0 e0
  read -r allowed denied evictions <<<"$3"
  read -r a0 d0 e0 <<<"$2"
  local da=$((allowed - a0)) dd=$((denied - d0)) de=$((evictions - e0))
  check+=", rate_limit_stats: allowed+$da, denied+$dd, evictions+$de"
  (( dd == 0 )) || broken+=("$1: $dd request(s) refused in a scenario that never reaches its limit")
  [[ $da == "${4:-x}" ]] || check+=" (allowed != processed)"
}

# run_case KEY SCENARIO CASE SCRIPT KEYS (lib.sh)
total=$(( CASES * (DURATION + WARMUP) ))
echo "meshhook_limits rate benchmark: $CASES cases x (${WARMUP}s warm-up + ${DURATION}s), ~${total}s of pgbench" >&2
run_case floor_start "floor"      "SELECT 1 (start)"             select1.sql        1
run_case tbl_100     "100 keys"   "hand-written token bucket"    rate_table.sql     100
run_case ext_100     "100 keys"   "meshhook_limits"              rate_extension.sql 100
run_case tbl_hot     "1 hot key"  "hand-written token bucket"    rate_table.sql     1
run_case ext_hot     "1 hot key"  "meshhook_limits"              rate_extension.sql 1
run_case floor_end   "floor"      "SELECT 1 (end)"               select1.sql        1

end_checks

# --- report ------------------------------------------------------------------
floor_stats

report() {
  pgbench_report_head "meshhook_limits: check_rate_limit vs a hand-written token bucket"
  echo "| scenario | case | tps | latency ms | × SELECT 1 floor | ext / hand-written | other CPU |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
  pgbench_report_rows tbl_100 tbl_hot
  echo
  echo "SELECT 1 floor = mean of the two floor runs = $(calc 0 "$floor") tps (drift start → end: $drift)."
  echo "Every pgbench transaction is one statement in one autocommit transaction."
  echo
  other_cpu_note
  echo
  echo "### Targets"
  echo
  target "ext / SELECT 1 floor, 100 keys" "$(ratio "${TPS[ext_100]}" "$floor")" 0.5
  target "ext / SELECT 1 floor, 1 hot key" "$(ratio "${TPS[ext_hot]}" "$floor")" 0.5
  target "ext / hand-written, 100 keys" "$(ratio "${TPS[ext_100]}" "${TPS[tbl_100]}")" 5
  target "ext / hand-written, 1 hot key" "$(ratio "${TPS[ext_hot]}" "${TPS[tbl_hot]}")" 5
  echo
  report_checks "- OK: no pgbench errors or failed transactions; no request refused by" \
    "  meshhook_limits (rate_limit_stats().denied unchanged) and no hand-written" \
    "  bucket below one token after its cases."
}

publish "raw pgbench output"
