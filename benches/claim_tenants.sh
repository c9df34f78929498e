#!/usr/bin/env bash
# claim_jobs against the number of tenants with waiting jobs (issue 20), on
# pgmq, one throwaway cluster (PostgreSQL 15, the installed release build):
# for each N of BENCH_TENANTS, a new queue with N tenants × 5 jobs, bound,
# then, each measured in the server (clock_timestamp around the call, in a
# transaction rolled back, so the queue stays as it is):
#   first    a new backend's first claim_jobs (batch 1): loads the limits of
#            every tenant it finds
#   changed  the first claim after a set_limit on an unrelated tenant
#   claim    median of 21 claims 120 ms apart (each scans the tenants afresh:
#            the scan's result is reused for 100 ms)
#   claim8   the same with batch 8 (per job)
#   read     median of 21 pgmq.read(q, 30, 1) (what the queue's own fetch costs)
#   floor    median of 21 SELECT 1 through the same loop
# and the growth of `claim` against the smallest N. Not yet measured here:
# pg-boss 12's fetch and groupConcurrency, the enqueue cost (issue 20).
#
#   bash benches/claim_tenants.sh
#   BENCH_TENANTS="10 100 1000 10000 100000" bash benches/claim_tenants.sh
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
TENANTS=${BENCH_TENANTS:-10 100 1000 10000}
CLUSTER=${BENCH_CLUSTER:-bench-tenants}
DB=bench_tenants
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-tenants-results}
for n in $TENANTS; do need_positive BENCH_TENANTS "$n"; done
pgmq_sql=$root/.cache/pgmq/pgmq.sql
[[ -f $pgmq_sql ]] || { echo "pgmq's SQL is not at $pgmq_sql; run bash scripts/install-queue-systems.sh" >&2; exit 2; }
need_so
mkdir -p "$OUT"
bench_client_env
start_cluster 'meshhook_limits.restart_grace = 0' "meshhook_limits.database = '$DB'"
create_bench_db "$DB"
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$pgmq_sql" >"$OUT/pgmq-install.log" 2>&1
q() { qdb "$DB" "$1"; }
machine_info "$DB"

# timed SQL [N] [SLEEP_S]: the median in ms of N runs of SQL (in a
# transaction rolled back each), SLEEP_S apart, in one new session.
timed() {
  local sql=$1 n=${2:-21} pause=${3:-0.12}
  "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$DB" <<SQL
CREATE TEMP TABLE t_ms (ms float8);
DO \$\$ DECLARE t0 timestamptz; BEGIN
  FOR i IN 1..$n LOOP
    PERFORM pg_sleep($pause);
    t0 := clock_timestamp();
    BEGIN PERFORM * FROM ($sql) x; RAISE EXCEPTION 'undo'; EXCEPTION WHEN raise_exception THEN NULL; END;
    INSERT INTO t_ms VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000);
  END LOOP; END \$\$;
SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3) FROM t_ms;
SQL
}

rows=()
base=""
for n in $TENANTS; do
  qn="t$n"
  q "SELECT pgmq.create('$qn')" >/dev/null
  q "SELECT meshhook_limits.bind_queue('pgmq', '$qn')" >/dev/null
  q "SELECT count(*) FROM pgmq.send_batch('$qn', ARRAY(SELECT jsonb_build_object('tenant_id', t::text)
       FROM (SELECT gen_random_uuid() AS t FROM generate_series(1, $n)) x, generate_series(1, 5)))" >/dev/null
  q "VACUUM ANALYZE pgmq.q_$qn" >/dev/null
  first=$(timed "SELECT * FROM meshhook_limits.claim_jobs('pgmq', '$qn', 1)" 1 0)
  changed=$("$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$DB" <<SQL
SELECT count(*) FROM meshhook_limits.claim_jobs('pgmq', '$qn', 1);
SELECT meshhook_limits.set_limit('concurrent_executions', 3, tenant_id => gen_random_uuid());
CREATE TEMP TABLE t_one (ms float8);
DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
  BEGIN PERFORM * FROM meshhook_limits.claim_jobs('pgmq', '$qn', 1); RAISE EXCEPTION 'undo';
  EXCEPTION WHEN raise_exception THEN NULL; END;
  INSERT INTO t_one VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000); END \$\$;
SELECT round(ms::numeric, 3) FROM t_one;
SQL
)
  changed=$(tail -n1 <<<"$changed")
  claim=$(timed "SELECT * FROM meshhook_limits.claim_jobs('pgmq', '$qn', 1)")
  claim8=$(timed "SELECT * FROM meshhook_limits.claim_jobs('pgmq', '$qn', 8)")
  read=$(timed "SELECT * FROM pgmq.read('$qn', 30, 1)")
  floor=$(timed "SELECT 1")
  per8=$(awk -v a="$claim8" 'BEGIN { printf "%.3f", a / 8 }')
  [[ -z $base ]] && base=$claim
  growth=$(awk -v a="$claim" -v b="$base" 'BEGIN { printf "%.1f", a / b }')
  ratio=$(awk -v a="$claim" -v b="$read" 'BEGIN { printf "%.1f", a / b }')
  rows+=("| $n | $first | $changed | $claim | $per8 | $read | $floor | $ratio | $growth |")
  echo "tenants $n: first $first ms, after set_limit $changed ms, claim $claim ms, claim8/job $per8 ms, read $read ms, floor $floor ms" >&2
  q "SELECT meshhook_limits.unbind_queue('pgmq', '$qn')" >/dev/null
  q "SELECT pgmq.drop_queue('$qn')" >/dev/null
done

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "## claim_jobs against the number of tenants (pgmq), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  report_machine "" "psql" "" "" "meshhook_limits.restart_grace=0, otherwise the defaults"
  echo
  echo "Each tenant 5 waiting jobs; medians in ms of 21 calls 120 ms apart, each rolled back; first and after"
  echo "set_limit: one call each."
  echo
  echo "| tenants | first claim of a backend | first after set_limit | claim (batch 1) | claim (batch 8), per job | pgmq.read | SELECT 1 | claim / read | claim growth |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  printf '%s\n' "${rows[@]}"
} | tee "$OUT/results.md"
