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

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DURATION=${BENCH_SECONDS:-15}
WARMUP=${BENCH_WARMUP:-3}
CLUSTER=${BENCH_CLUSTER:-bench}
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-results}
CLIENTS=16
THREADS=2
MODE=prepared # the scripts bind :slot_id as a parameter ($1), as drivers do
PGBENCH_DEFINE=tenants
DB=bench
HOT_LIMIT=1000

need_positive BENCH_SECONDS "$DURATION"
need_nonneg BENCH_WARMUP "$WARMUP"
need_pgbench
need_so

mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/results.md

# --- cluster ---------------------------------------------------------------
# restart_grace = 0: slots are otherwise refused for a lease after start-up.
start_cluster 'meshhook_limits.restart_grace = 0'
bench_client_env

q() { qdb "$DB" "$1"; }
create_bench_db "$DB"
# Global default; both scenarios (100 tenants, one hot tenant) sit far below it.
q "SELECT meshhook_limits.set_limit('concurrent_executions', $HOT_LIMIT)" >/dev/null
PGOPTIONS='-c client_min_messages=warning' "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$here/handwritten.sql" >/dev/null
q "VACUUM ANALYZE" >/dev/null

# --- machine and settings ----------------------------------------------------
machine_info "$DB"
settings=$(pg_settings_of "$DB" fsync synchronous_commit wal_sync_method full_page_writes shared_buffers \
  max_connections commit_delay wal_level meshhook_limits.restart_grace)

# --- running a case ----------------------------------------------------------
HW_SCRIPT=handwritten.sql HW_WHAT="hand-written tables"
EXT_SCRIPT=extension.sql EXT_STATS="meshhook_limits.slot_stats()"
hw_reset() {
  q "TRUNCATE handwritten.slot; UPDATE handwritten.quota SET in_use = 0" \
    && q "VACUUM ANALYZE handwritten.quota, handwritten.slot"
}
hw_stats() { q "SELECT (SELECT count(*) FROM handwritten.slot) || ' ' || (SELECT sum(in_use) FROM handwritten.quota)"; }
hw_check() { # name stats
  local held in_use
  read -r held in_use <<<"$2"
  check+=", hand-written: slot rows=$held, sum(in_use)=$in_use"
  [[ $held == 0 && $in_use == 0 ]] || broken+=("$1: hand-written counter left $held slot rows, in_use=$in_use")
}
ext_stats() { q "SELECT live || ' ' || grants || ' ' || refusals FROM $EXT_STATS"; }
ext_check() { # name before after processed
  local live grants refusals g0 r0
  read -r live grants refusals <<<"$3"
  read -r _ g0 r0 <<<"$2"
  local dg=$((grants - g0)) dr=$((refusals - r0))
  check+=", slot_stats: live=$live, grants+$dg, refusals+$dr"
  (( live == 0 )) || broken+=("$1: $live slot(s) still live after the run (leak)")
  (( dr == 0 )) || broken+=("$1: $dr acquisition(s) refused in a scenario that never reaches its limit")
  [[ $dg == "${4:-x}" ]] || check+=" (grants != processed)"
}

# run_case KEY SCENARIO CASE SCRIPT TENANTS STMTS (lib.sh)
total=$(( 6 * (DURATION + WARMUP) ))
echo "meshhook_limits benchmark: 6 cases x (${WARMUP}s warm-up + ${DURATION}s), ~${total}s of pgbench" >&2
run_case floor_start "floor"         "SELECT 1 (start)"       select1.sql     1   1
run_case hw_100      "100 tenants"   "hand-written counter"   handwritten.sql 100 2
run_case ext_100     "100 tenants"   "meshhook_limits"        extension.sql   100 2
run_case hw_hot      "1 hot tenant"  "hand-written counter"   handwritten.sql 1   2
run_case ext_hot     "1 hot tenant"  "meshhook_limits"        extension.sql   1   2
run_case floor_end   "floor"         "SELECT 1 (end)"         select1.sql     1   1

end_checks

# --- report ------------------------------------------------------------------
floor_stats

report() {
  pgbench_report_head "meshhook_limits: execution slots vs a hand-written counter"
  echo "| scenario | case | statements per pgbench txn | tps | latency ms | × SELECT 1 floor | ext / hand-written | other CPU |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  pgbench_report_rows hw_100 hw_hot
  echo
  echo "SELECT 1 floor = mean of the two floor runs = $(calc 0 "$floor") tps (drift start → end: $drift)."
  echo
  other_cpu_note
  echo
  echo "A pgbench transaction of the slot cases is two statements, each its own"
  echo "autocommit transaction (acquire, then release), against one statement for"
  echo "SELECT 1. The tps and ratios above count acquire+release pairs, not statements."
  echo
  echo "### Targets"
  echo
  target "ext / hand-written, 100 tenants" "$(ratio "${TPS[ext_100]}" "${TPS[hw_100]}")" 3
  target "ext / hand-written, 1 hot tenant" "$(ratio "${TPS[ext_hot]}" "${TPS[hw_hot]}")" 5
  target "ext / SELECT 1 floor, 100 tenants" "$(ratio "${TPS[ext_100]}" "$floor")" 0.25
  target "ext / SELECT 1 floor, 1 hot tenant" "$(ratio "${TPS[ext_hot]}" "$floor")" 0.25
  echo
  report_checks "- OK: no pgbench errors or failed transactions; after every meshhook_limits case" \
    "  slot_stats().live = 0 and no acquisition was refused; the hand-written" \
    "  counter ended every case at in_use = 0 with no slot rows."
}

publish "raw pgbench output"
