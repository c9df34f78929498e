#!/usr/bin/env bash
# claim_jobs against the number of tenants with waiting jobs (issue 20), on
# pgmq, one throwaway cluster (PostgreSQL 15, the installed release build).
# For each N of BENCH_TENANTS, two queues filled alike with N tenants × J
# jobs (J = 5, or more so that the loops below never run dry): t<N> bound,
# r<N> not. Measured in the server (clock_timestamp around each call):
#   send      enqueue cost: pgmq.send_batch of the fill, and 1,000 single
#             pgmq.send calls, into the bound queue against the unbound one
#             (the claim index and the binding's trigger)
#   first     a new backend's first claim_jobs (batch 1, rolled back): scans
#             the tenants
#   changed   the first claim after a set_limit on an unrelated tenant (rolled
#             back), in a backend that has claimed
#   claim     claim_jobs(batch 1) + pgmq.archive of the job, committed each,
#             LOOPS times in one backend: median and mean (the mean has the
#             rescans of the tenants in it), ms per job
#   claim8    the same with batch 8, ms per job (mean)
#   read      pgmq.read(r<N>, 30, 1) + pgmq.archive, LOOPS times: what the
#             queue's own fetch and complete cost
#   floor     SELECT 1 through the same loop
# and the growth of `claim` against the smallest N. Then what an enqueuer
# can add (BENCH_HOSTILE, 100,000): deferred jobs of as many tenants, or jobs
# whose tenant is not a uuid, next to 10 tenants with waiting jobs. pg-boss 12's fetch and
# groupConcurrency fetch at many tenants: benches/claim.sh, throughput
# scenario with BENCH_TP_TENANTS (benches/README.md).
#
#   bash benches/claim_tenants.sh                              # ~3 minutes
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

# timed SQL: ms of one run of SQL, in a transaction rolled back, in a new
# session.
timed() {
  "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$DB" <<SQL
CREATE TEMP TABLE t_ms (ms float8);
DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
  BEGIN PERFORM * FROM ($1) x; RAISE EXCEPTION 'undo'; EXCEPTION WHEN raise_exception THEN NULL; END;
  INSERT INTO t_ms VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000); END \$\$;
SELECT round(ms::numeric, 3) FROM t_ms;
SQL
}

# loop_ms BODY N [PRE]: "median mean max" in ms of N runs of BODY (PL/pgSQL;
# ids is a bigint[]), each committed, in one new session (PRE runs first).
loop_ms() {
  "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$DB" <<SQL
${3:-}
CREATE TEMP TABLE l_ms (ms float8);
DO \$\$ DECLARE t0 timestamptz; ids bigint[]; BEGIN
  FOR i IN 1..$2 LOOP
    t0 := clock_timestamp();
    $1
    INSERT INTO l_ms VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000);
    COMMIT;
  END LOOP; END \$\$;
SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 3) || ' ' || round(avg(ms)::numeric, 3)
       || ' ' || round(max(ms)::numeric, 1) FROM l_ms;
SQL
}
field() { cut -d' ' -f"$1" <<<"$2"; }
us() { awk -v a="$1" 'BEGIN { printf "%.1f", a * 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

LOOPS=${BENCH_LOOPS:-1000}
need_positive BENCH_LOOPS "$LOOPS"
rows=() sends=()
base="" base_mean="" base_n=""
for n in $TENANTS; do
  per=$(( (3 * LOOPS + 3 * LOOPS + n - 1) / n )); (( per < 5 )) && per=5
  for qn in "t$n" "r$n"; do q "SELECT pgmq.create('$qn')" >/dev/null; done
  q "SELECT meshhook_limits.bind_queue('pgmq', 't$n')" >/dev/null
  q "CREATE TABLE IF NOT EXISTS fill (q text, ms float8)" >/dev/null
  for qn in "r$n" "t$n"; do
    q "DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
         PERFORM pgmq.send_batch('$qn', ARRAY(SELECT jsonb_build_object('tenant_id', md5(t::text)::uuid)
           FROM generate_series(1, $n) t, generate_series(1, $per)));
         INSERT INTO fill VALUES ('$qn', extract(epoch FROM clock_timestamp() - t0) * 1000); END \$\$" >/dev/null
    q "VACUUM ANALYZE pgmq.q_$qn" >/dev/null
  done
  fill_bound=$(q "SELECT round((ms / ($n * $per) * 1000)::numeric, 1) FROM fill WHERE q = 't$n'")
  fill_plain=$(q "SELECT round((ms / ($n * $per) * 1000)::numeric, 1) FROM fill WHERE q = 'r$n'")
  # 1,000 single sends each (of existing tenants), deleted again.
  one_bound=$(loop_ms "PERFORM pgmq.send('t$n', jsonb_build_object('tenant_id', md5((1 + i % $n)::text)::uuid), 3600);" "$LOOPS")
  one_plain=$(loop_ms "PERFORM pgmq.send('r$n', jsonb_build_object('tenant_id', md5((1 + i % $n)::text)::uuid), 3600);" "$LOOPS")
  q "DELETE FROM pgmq.q_t$n WHERE vt > clock_timestamp() + interval '10 minutes'" >/dev/null
  q "DELETE FROM pgmq.q_r$n WHERE vt > clock_timestamp() + interval '10 minutes'" >/dev/null
  sends+=("| $n | $fill_plain | $fill_bound | $(ratio "$fill_bound" "$fill_plain") | $(us "$(field 1 "$one_plain")") | $(us "$(field 1 "$one_bound")") | $(ratio "$(field 1 "$one_bound")" "$(field 1 "$one_plain")") |")

  first=$(timed "SELECT * FROM meshhook_limits.claim_jobs('pgmq', 't$n', 1)")
  changed=$("$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$DB" <<SQL
SELECT count(*) FROM meshhook_limits.claim_jobs('pgmq', 't$n', 1);
SELECT count(*) FROM meshhook_limits.claim_jobs('pgmq', 't$n', 1);
SELECT meshhook_limits.set_limit('concurrent_executions', 3, tenant_id => gen_random_uuid());
CREATE TEMP TABLE t_one (ms float8);
DO \$\$ DECLARE t0 timestamptz := clock_timestamp(); BEGIN
  BEGIN PERFORM * FROM meshhook_limits.claim_jobs('pgmq', 't$n', 1); RAISE EXCEPTION 'undo';
  EXCEPTION WHEN raise_exception THEN NULL; END;
  INSERT INTO t_one VALUES (extract(epoch FROM clock_timestamp() - t0) * 1000); END \$\$;
SELECT round(ms::numeric, 3) FROM t_one;
SQL
)
  changed=$(tail -n1 <<<"$changed")
  claim=$(loop_ms "SELECT array_agg(job_id::bigint) INTO ids FROM meshhook_limits.claim_jobs('pgmq', 't$n', 1);
    PERFORM pgmq.archive('t$n', ids);" "$LOOPS")
  claim8=$(loop_ms "SELECT array_agg(job_id::bigint) INTO ids FROM meshhook_limits.claim_jobs('pgmq', 't$n', 8);
    PERFORM pgmq.archive('t$n', ids);" "$(( LOOPS / 4 ))")
  read=$(loop_ms "SELECT array_agg(msg_id) INTO ids FROM pgmq.read('r$n', 30, 1);
    PERFORM pgmq.archive('r$n', ids);" "$LOOPS")
  floor=$(loop_ms "PERFORM 1;" "$LOOPS")
  c50=$(field 1 "$claim") cmean=$(field 2 "$claim") r50=$(field 1 "$read")
  per8=$(awk -v a="$(field 2 "$claim8")" 'BEGIN { printf "%.3f", a / 8 }')
  [[ -z $base ]] && base=$c50 base_mean=$cmean base_n=$n
  rows+=("| $n | $first | $changed | $c50 | $cmean | $(field 3 "$claim") | $per8 | $r50 | $(field 1 "$floor") | $(ratio "$c50" "$r50") | $(ratio "$c50" "$base") |")
  echo "tenants $n: first $first ms, after set_limit $changed ms, claim+archive $claim, claim8 $claim8, read+archive $read, floor $floor (median mean max)" >&2
  q "SELECT meshhook_limits.unbind_queue('pgmq', 't$n')" >/dev/null
  for qn in "t$n" "r$n"; do q "SELECT pgmq.drop_queue('$qn')" >/dev/null; done
done

# What an enqueuer can add: 10 tenants with waiting jobs next to HOSTILE
# deferred jobs of as many other tenants (pgmq.send_batch with an hour's
# delay), or next to HOSTILE jobs whose tenant is not a uuid; claim + archive
# of the 10 tenants' jobs as above, against the first N's.
HOSTILE=${BENCH_HOSTILE:-100000}
need_positive BENCH_HOSTILE "$HOSTILE"
hrows=()
for kind in deferred junk; do
  qn="h_$kind"
  q "SELECT pgmq.create('$qn')" >/dev/null
  q "SELECT meshhook_limits.bind_queue('pgmq', '$qn')" >/dev/null
  per=$(( (LOOPS + 9) / 10 + 5 ))
  q "SELECT count(*) FROM pgmq.send_batch('$qn', ARRAY(SELECT jsonb_build_object('tenant_id', md5(t::text)::uuid)
       FROM generate_series(1, 10) t, generate_series(1, $per)))" >/dev/null
  if [[ $kind == deferred ]]; then
    q "SELECT count(*) FROM pgmq.send_batch('$qn', ARRAY(SELECT jsonb_build_object('tenant_id', md5('d' || g)::uuid)
         FROM generate_series(1, $HOSTILE) g), 3600)" >/dev/null
  else
    q "SELECT count(*) FROM pgmq.send_batch('$qn', ARRAY(SELECT jsonb_build_object('tenant_id', 'junk-' || g)
         FROM generate_series(1, $HOSTILE) g))" >/dev/null
  fi
  q "VACUUM ANALYZE pgmq.q_$qn" >/dev/null
  first=$(timed "SELECT * FROM meshhook_limits.claim_jobs('pgmq', '$qn', 1)")
  claim=$(loop_ms "SELECT array_agg(job_id::bigint) INTO ids FROM meshhook_limits.claim_jobs('pgmq', '$qn', 1);
    PERFORM pgmq.archive('$qn', ids);" "$LOOPS")
  hrows+=("| $HOSTILE $kind | $first | $(field 1 "$claim") | $(field 2 "$claim") | $(field 3 "$claim") | $(ratio "$(field 1 "$claim")" "$base") | $(ratio "$(field 2 "$claim")" "$base_mean") |")
  echo "hostile $kind: first $first ms, claim+archive $claim (median mean max)" >&2
  q "SELECT meshhook_limits.unbind_queue('pgmq', '$qn')" >/dev/null
  q "SELECT pgmq.drop_queue('$qn')" >/dev/null
done

load_end=$(cut -d' ' -f1-3 /proc/loadavg)
{
  echo "## claim_jobs against the number of tenants (pgmq), $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  report_machine "" "psql" "" "" "meshhook_limits.restart_grace=0, otherwise the defaults"
  echo
  echo "Each tenant at least 5 waiting jobs. first, after set_limit: one call each, rolled back. claim: claim_jobs + pgmq.archive,"
  echo "$LOOPS times, each committed, ms per job (median, mean, max); batch 8: mean per job. read: pgmq.read + pgmq.archive"
  echo "on an unbound queue filled alike. floor: SELECT 1 through the same loop."
  echo
  echo "| tenants | first claim of a backend | first after set_limit | claim + archive (median) | mean | max | batch 8, per job | read + archive | floor | claim / read | claim growth |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Enqueue cost, µs per job: pgmq.send_batch of the fill, and $LOOPS single pgmq.send calls (median), into an unbound and a bound queue."
  echo
  echo "| tenants | send_batch, unbound | bound | × | pgmq.send, unbound | bound | × |"
  echo "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  printf '%s\n' "${sends[@]}"
  echo
  echo "What an enqueuer can add: 10 tenants with waiting jobs next to $HOSTILE deferred jobs of as many tenants (an hour's delay),"
  echo "or next to $HOSTILE jobs whose tenant is not a uuid. claim + archive of the 10 tenants' jobs, ms; × against $base_n tenants alone."
  echo
  echo "| next to | first claim | claim + archive (median) | mean | max | × median | × mean |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  printf '%s\n' "${hrows[@]}"
} | tee "$OUT/results.md"
