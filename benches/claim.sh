#!/usr/bin/env bash
# Limit-aware fair claiming (meshhook_limits.claim_jobs) on real pg-boss 11
# (PGBOSS_MAJOR=12: pg-boss 12)
# (and pgmq), side by side with the queues' own fetch, on one throwaway
# cluster (benches/claim_load.mjs runs the worker loops):
#
#  noisy       noisy neighbour: tenant A enqueues BENCH_NOISY_JOBS jobs, then
#              BENCH_QUIET_TENANTS quiet tenants BENCH_QUIET_JOBS each; W
#              workers claim, "run" BENCH_RUN_MS ms, complete. The quiet
#              tenants' wait (pgboss.job started_on − created_on) in five arms:
#                a  quiet tenants alone, claim_jobs (the baseline)
#                b  with A, claim_jobs
#                c  with A, plain FIFO boss.fetch (no limits)
#                d  with A, the naive loop: boss.fetch → acquire_execution_slot
#                   → refused: the job is put back, fetchable after the
#                   refusal's retry_after (BENCH_PUTBACK)
#                g  with A, pg-boss 12's own boss.fetch with groupConcurrency =
#                   BENCH_LIMIT, each tenant a group (PGBOSS_MAJOR=12 only)
#                e  as b, with ANALYZE pgboss.job after A's enqueue (b runs on
#                   the statistics of the queue before the burst: nothing waiting)
#              concurrent_executions = BENCH_LIMIT for every tenant (global
#              default) in all arms (fetch ignores it). c and d stop when
#              every quiet job is done or BENCH_CAP s after the quiet enqueue.
#              Target: p95(b) ≤ 1.5 × p95(a).
#  weights     tenants with fair_share_weight 1, 2, 4 (BENCH_WEIGHTS), each with
#              a deep backlog, concurrent_executions_total = BENCH_TOTAL, W
#              workers claim/run/complete for BENCH_SECONDS (ANALYZE after the
#              enqueue, as in arm e); each tenant's share of the claimed cost
#              against w / Σw. Target:
#              every share within ±5% (relative) of its target. A second
#              arm runs without the total limit (just the W loops).
#  throughput  no limits at all; claim_jobs + boss.complete vs boss.fetch +
#              boss.complete, no run time, same workers and batch, on a short
#              queue (each iteration sends its batch first) and on a deep one
#              (BENCH_TP_JOBS queued), BENCH_TP_ROUNDS interleaved rounds;
#              pgmq the same with pgmq.read/pgmq.archive.
#              Target: claim / fetch ≥ 0.8.
#  backlog     1,000,000 waiting pg-boss jobs of tenant A (at its limit: its
#              slots are held), one job of tenant B: the time of a claim_jobs
#              that claims B's job (rolled back each time), against the same
#              with A's backlog absent. Target: ratio ≤ 2. Prints the plans
#              (auto_explain, nested statements, ANALYZE).
#
#   bash benches/claim.sh
#   BENCH_SCENARIOS="noisy" BENCH_NOISY_ARMS="c d" bash benches/claim.sh
#   BENCH_NOISY_JOBS=2000 BENCH_QUIET_JOBS=50 BENCH_SECONDS=10 BENCH_TP_SECONDS=5 \
#     BENCH_BACKLOG_JOBS=100000 bash benches/claim.sh          # a quick check
#
# Environment (defaults in brackets):
#   BENCH_SCENARIOS      which to run [noisy weights throughput backlog]
#   BENCH_WORKERS        concurrent worker loops [8]
#   BENCH_RUN_MS         run time of a job in noisy and weights [20]
#   BENCH_POLL_MS        sleep after an empty claim or fetch [5]
#   BENCH_LIMIT          concurrent_executions per tenant in noisy and backlog [4]
#   BENCH_NOISY_ARMS     [a b e c d]
#   BENCH_NOISY_JOBS     tenant A's jobs [20000]
#   BENCH_QUIET_TENANTS  [10]      BENCH_QUIET_JOBS  jobs per quiet tenant [200]
#   BENCH_QUIET_DELAY    seconds between the workers' start and the quiet enqueue [2]
#   BENCH_CAP            seconds after the quiet enqueue an arm stops at the latest [120]
#   BENCH_PUTBACK        arm d's put-back: update (UPDATE back to created, start_after
#                        = now() + retry_after) or fail (boss.fail, pg-boss retry
#                        with retryDelay = retry_after_max) [update]
#   BENCH_SECONDS        measured seconds of weights [60]
#   BENCH_W_WARMUP       warm-up seconds of weights, not counted [5]
#   BENCH_WEIGHTS        fair_share_weight of each tenant, comma-separated [1,2,4]
#   BENCH_TOTAL          concurrent_executions_total in weights, 0 = none [7]
#   BENCH_W_JOBS         jobs per tenant in weights [enough for the run at 20 ms]
#   BENCH_COST_MAX       job cost in weights: 1, or uniform 1..N (cost_path 'cost') [1]
#   BENCH_W_NOTOTAL      1: also a weights arm without the total limit [1]
#   BENCH_RELEASE        1: noisy and weights loops also call release_execution_slot
#                        after the complete (the slot ends with the job anyway) [0]
#   BENCH_TP_ARMS        fetch, claim, claimrel (claim + explicit release), group
#                        (pg-boss 12's fetch with groupConcurrency = BENCH_LIMIT, each
#                        tenant a group; PGBOSS_MAJOR=12, pg-boss only) [fetch claim]
#   BENCH_TP_TENANTS     tenants the throughput jobs belong to; a list runs each
#                        (e.g. "10 100 1000 10000 100000": claiming against the
#                        number of tenants, issue 20) [100]
#   BENCH_SERVER_CONF    one more postgresql.conf line, e.g. 'synchronous_commit = off'
#                        (the throughput arms without the wait for the WAL flush) []
#   BENCH_TP_MODES       steady (each iteration sends its batch first: a short queue)
#                        and/or backlog (BENCH_TP_JOBS queued first) [steady backlog]
#   BENCH_TP_SECONDS     measured seconds per throughput run [10]
#   BENCH_TP_WARMUP      warm-up seconds per throughput run [2]
#   BENCH_TP_BATCH       jobs per claim/fetch in throughput; a list runs each [10]
#   BENCH_TP_JOBS        queued jobs per throughput run in mode backlog [200000]
#   BENCH_TP_ROUNDS      interleaved rounds of the throughput arms [3]
#   BENCH_TP_PGMQ        1: also pgmq (needs .cache/pgmq/pgmq.sql) [1]
#   BENCH_BACKLOG_JOBS   tenant A's waiting jobs in backlog [1000000]
#   BENCH_BACKLOG_REPS   timed claims per case, the median is reported [21]
#   BENCH_BACKLOG_TENANTS  a third case: this many more tenants with a waiting job, all
#                        at their limit; 0 = skip [1000]
#   BENCH_HISTORY        completed jobs in every pg-boss queue before its arm (finished
#                        over the last day, then VACUUM ANALYZE), as pg-boss keeps them [50000]
#   BENCH_CLUSTER        throwaway cluster for scripts/pg.sh [bench-claim]
#   BENCH_OUT            raw output and results.md [/tmp/meshhook_limits/bench-claim-results]
#
# Exit status: 0 when it ran, whether the targets were met or not (a
# benchmark is not a test); 1 when something broke: a load failed, a claimed
# job could not be completed, over-admission (a tenant with more jobs in hand
# or live slots than its limit), slots left behind, a crashed backend, the
# library replaced mid-run; 2 for a missing prerequisite.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
SCENARIOS=${BENCH_SCENARIOS:-noisy weights throughput backlog}
WORKERS=${BENCH_WORKERS:-8}
RUN_MS=${BENCH_RUN_MS:-20}
POLL_MS=${BENCH_POLL_MS:-5}
LIMIT=${BENCH_LIMIT:-4}
NOISY_ARMS=${BENCH_NOISY_ARMS:-a b e c d}
NOISY_JOBS=${BENCH_NOISY_JOBS:-20000}
QUIET_TENANTS=${BENCH_QUIET_TENANTS:-10}
QUIET_JOBS=${BENCH_QUIET_JOBS:-200}
QUIET_DELAY=${BENCH_QUIET_DELAY:-2}
CAP=${BENCH_CAP:-120}
PUTBACK=${BENCH_PUTBACK:-update}
W_SECONDS=${BENCH_SECONDS:-60}
W_WARMUP=${BENCH_W_WARMUP:-5}
W_WEIGHTS=${BENCH_WEIGHTS:-1,2,4}
W_TOTAL=${BENCH_TOTAL:-7}
W_COST_MAX=${BENCH_COST_MAX:-1}
W_NOTOTAL=${BENCH_W_NOTOTAL:-1}
RELEASE=${BENCH_RELEASE:-0}
TP_ARMS=${BENCH_TP_ARMS:-fetch claim}
TP_MODES=${BENCH_TP_MODES:-steady backlog}
TP_SECONDS=${BENCH_TP_SECONDS:-10}
TP_WARMUP=${BENCH_TP_WARMUP:-2}
TP_BATCH=${BENCH_TP_BATCH:-10}
TP_JOBS=${BENCH_TP_JOBS:-200000}
TP_ROUNDS=${BENCH_TP_ROUNDS:-3}
TP_PGMQ=${BENCH_TP_PGMQ:-1}
TP_TENANTS=${BENCH_TP_TENANTS:-100}
BL_JOBS=${BENCH_BACKLOG_JOBS:-1000000}
BL_REPS=${BENCH_BACKLOG_REPS:-21}
HISTORY=${BENCH_HISTORY:-50000}
BL_TENANTS=${BENCH_BACKLOG_TENANTS:-1000}
CLUSTER=${BENCH_CLUSTER:-bench-claim}
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-claim-results}
DB=bench        # noisy, weights, throughput; the extension's worker ticks here
BL_DB=backlog   # backlog, without the worker's sampling of its million jobs
NOISY_TENANT=00000000-0000-4000-8000-000000001000
OTHER_TENANT=00000000-0000-4000-8000-000000002000

for v in WORKERS LIMIT QUIET_TENANTS QUIET_JOBS CAP W_SECONDS W_COST_MAX TP_SECONDS TP_JOBS TP_ROUNDS BL_JOBS BL_REPS; do
  need_positive "$v" "${!v}"
done
for v in RUN_MS POLL_MS NOISY_JOBS QUIET_DELAY W_WARMUP W_TOTAL TP_WARMUP BL_TENANTS HISTORY; do
  need_nonneg "$v" "${!v}"
done
[[ $W_WEIGHTS =~ ^[0-9]+(\.[0-9]+)?(,[0-9]+(\.[0-9]+)?)*$ ]] || { echo "BENCH_WEIGHTS must be numbers separated by commas" >&2; exit 2; }
[[ $PUTBACK == update || $PUTBACK == fail ]] || { echo "BENCH_PUTBACK must be update or fail" >&2; exit 2; }
# has LIST WORD: whether WORD is one of the words of LIST.
has() { [[ " $1 " == *" $2 "* ]]; }
for s in $SCENARIOS; do
  [[ $s =~ ^(noisy|weights|throughput|backlog)$ ]] || { echo "unknown scenario $s (noisy weights throughput backlog)" >&2; exit 2; }
done
for a in $NOISY_ARMS; do [[ $a =~ ^[abcdeg]$ ]] || { echo "unknown noisy arm $a (a b c d e g)" >&2; exit 2; }; done
if has "$NOISY_ARMS" g && [[ ${PGBOSS_MAJOR:-11} != 12 ]]; then echo "noisy arm g needs PGBOSS_MAJOR=12" >&2; exit 2; fi
for a in $TP_ARMS; do [[ $a =~ ^(fetch|claim|claimrel|group)$ ]] || { echo "unknown throughput arm $a (fetch claim claimrel group)" >&2; exit 2; }; done
if has "$TP_ARMS" group && [[ ${PGBOSS_MAJOR:-11} != 12 ]]; then echo "throughput arm group needs PGBOSS_MAJOR=12" >&2; exit 2; fi
for n in $TP_TENANTS; do need_positive BENCH_TP_TENANTS "$n"; done
for b in $TP_BATCH; do need_positive BENCH_TP_BATCH "$b"; done
for m in $TP_MODES; do [[ $m =~ ^(steady|backlog)$ ]] || { echo "unknown throughput mode $m (steady backlog)" >&2; exit 2; }; done
IFS=, read -r -a weights <<<"$W_WEIGHTS"
if [[ -z ${BENCH_W_JOBS:-} ]]; then
  # Enough for the whole run at the rate W workers reach with RUN_MS ms jobs
  # (×1.5), even if one tenant got every claim.
  W_JOBS=$(awk -v w="$WORKERS" -v ms="$RUN_MS" -v s="$((W_SECONDS + W_WARMUP))" \
    'BEGIN { r = w * 1000 / (ms > 0 ? ms + 3 : 3); n = int(r * s * 1.5 / 1000 + 1) * 1000; print (n < 2000 ? 2000 : n) }')
else
  W_JOBS=$BENCH_W_JOBS
fi
need_positive BENCH_W_JOBS "$W_JOBS"

command -v node >/dev/null || { echo "node not found (Node 20+)" >&2; exit 2; }
[[ -f $root/tests/node/node_modules/pg-boss/package.json ]] \
  || { echo "pg-boss is not installed; run bash scripts/install-queue-systems.sh" >&2; exit 2; }
pgmq_sql=$root/.cache/pgmq/pgmq.sql
if has "$SCENARIOS" throughput && [[ $TP_PGMQ == 1 && ! -f $pgmq_sql ]]; then
  echo "pgmq's SQL is not at $pgmq_sql; run bash scripts/install-queue-systems.sh (or BENCH_TP_PGMQ=0)" >&2; exit 2
fi
[[ -f /usr/lib/postgresql/15/lib/auto_explain.so ]] || { echo "auto_explain (postgresql-15 contrib) not found" >&2; exit 2; }
need_so
boss_pkg=pg-boss; [[ ${PGBOSS_MAJOR:-11} == 12 ]] && boss_pkg=pg-boss-12
boss_version=$(node -p "require('$root/tests/node/node_modules/$boss_pkg/package.json').version")

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/*.txt "$OUT"/results.md

# --- cluster -----------------------------------------------------------------------
# restart_grace = 0: slots are otherwise refused for a lease after start-up.
# The worker ticks every second in $DB: it releases the slot of a completed job
# claimed by claim_jobs (the throughput arm `claim` relies on that).
start_cluster 'meshhook_limits.restart_grace = 0' "meshhook_limits.database = '$DB'" 'meshhook_limits.worker = on' ${BENCH_SERVER_CONF:+"$BENCH_SERVER_CONF"}
bench_client_env
q() { qdb "$DB" "$1"; }
conn() { echo "host=$PGHOST port=$PGPORT user=postgres dbname=$1"; }
load() { node "$here/claim_load.mjs" "$(conn "${LOAD_DB:-$DB}")" "$@"; }
create_bench_db "$DB"
load init --queue bench-init >"$OUT/init.json" 2>"$OUT/init.log" \
  || { echo "pg-boss init failed: $(cat "$OUT/init.json" "$OUT/init.log")" >&2; exit 1; }

has_claim=$(q "SELECT to_regproc('meshhook_limits.claim_jobs') IS NOT NULL AND to_regproc('meshhook_limits.bind_queue') IS NOT NULL")
needs_claim=""
has "$SCENARIOS" noisy && { has "$NOISY_ARMS" a || has "$NOISY_ARMS" b || has "$NOISY_ARMS" e; } && needs_claim+=" noisy arms a/b/e"
has "$SCENARIOS" weights && needs_claim+=" weights"
has "$SCENARIOS" throughput && { has "$TP_ARMS" claim || has "$TP_ARMS" claimrel; } && needs_claim+=" throughput claim arms"
has "$SCENARIOS" backlog && needs_claim+=" backlog"
if [[ $has_claim != t && -n $needs_claim ]]; then
  echo "meshhook_limits.claim_jobs/bind_queue are not in the installed extension; needed by:$needs_claim" >&2
  echo "(without them: BENCH_SCENARIOS=\"noisy throughput\" BENCH_NOISY_ARMS=\"c d\" BENCH_TP_ARMS=fetch)" >&2
  exit 2
fi

broken=()
notes=()
machine_info "$DB"
settings=$(pg_settings_of "$DB" fsync synchronous_commit shared_buffers max_connections \
  meshhook_limits.sample_interval meshhook_limits.default_lease meshhook_limits.retry_after_max meshhook_limits.restart_grace)
worker_pid() { q "SELECT pid FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker'"; }
wpid0=""
for _ in $(seq 100); do wpid0=$(worker_pid); [[ -n $wpid0 ]] && break; sleep 0.1; done
[[ -n $wpid0 ]] || broken+=("the meshhook_limits worker is not running in $DB")

json() { # FILE EXPR: a value of the load's JSON output
  node -e "const o = JSON.parse(require('fs').readFileSync('$1', 'utf8')); const v = (o$2); process.stdout.write(v == null ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v))"
}
clear_limits() {
  q "SELECT count(meshhook_limits.clear_limit(resource, tenant_id, project_id)) FROM meshhook_limits.limits WHERE plan IS NULL" >/dev/null
}
# create_queue DB NAME: a pg-boss queue as boss.createQueue makes it, with a
# history: pg-boss keeps a queue's finished jobs (7 days by default), so a live
# queue's rows are mostly completed jobs, and the planner's statistics say so.
# HISTORY completed jobs (finished over the last day), then VACUUM ANALYZE.
# Without them the statistics describe an empty queue, and both pg-boss's
# fetch and claim_jobs get plans that scan every row of the queue.
create_queue() {
  qdb "$1" "SELECT pgboss.create_queue('$2', '{\"policy\":\"standard\"}'::jsonb)" >/dev/null
  (( HISTORY > 0 )) || return 0
  qdb "$1" "INSERT INTO pgboss.job (name, data, state, policy, created_on, start_after, started_on, completed_on)
    SELECT '$2', jsonb_build_object('tenant_id', '00000000-0000-4000-8000-' || lpad((1 + g % 100)::text, 12, '0')),
           'completed', 'standard', t - interval '2 seconds', t - interval '2 seconds', t - interval '1 second', t
      FROM (SELECT g, now() - g * (interval '1 day' / $HISTORY) AS t FROM generate_series(1, $HISTORY) g) h" >/dev/null
  qdb "$1" "VACUUM ANALYZE pgboss.job" >/dev/null
}
drop_queue_jobs() { # NAME: the arm's jobs go, so the next arm starts on the same table
  q "DELETE FROM pgboss.job WHERE name = '$1'" >/dev/null
  q "VACUUM ANALYZE pgboss.job" >/dev/null
}
live_slots() { qdb "${1:-$DB}" "SELECT count(*) FROM meshhook_limits.slots() WHERE state = 'live'"; }
# After an arm: every slot must be gone (released by the loop or, within a
# tick, by the worker); what is left is released here and reported.
slots_left() { # NAME [WAIT_S]: sets DRAIN_S, how long the slots took to go
  local n i t0
  t0=$(now_s)
  for ((i = 0; i <= ${2:-0} * 10; i++)); do
    n=$(live_slots)
    DRAIN_S=$(awk -v a="$(now_s)" -v b="$t0" 'BEGIN { printf "%.1f", a - b }')
    (( n == 0 )) && return 0
    sleep 0.1
  done
  broken+=("$1: $n live slot(s) left after the arm ($(q "SELECT string_agg(tenant_id || ' ' || coalesce(run_id, '-'), ', ') FROM (SELECT * FROM meshhook_limits.slots() WHERE state = 'live' LIMIT 5) s"))")
  q "SELECT count(meshhook_limits.release_execution_slot(slot_id)) FROM meshhook_limits.slots() WHERE state = 'live'" >/dev/null
}
# The load's own findings: errors, jobs it could not complete, over-admission.
load_checks() { # NAME FILE
  local v
  v=$(json "$2" .complete_mismatch 2>/dev/null || echo "?")
  [[ $v == 0 || -z $v ]] || broken+=("$1: $v claimed job(s) could not be completed (not active any more)")
  v=$(json "$2" '.over_admission.join("; ")' 2>/dev/null || true)
  [[ -z $v ]] || broken+=("$1: over-admission: $v")
}
run_load() { # NAME FILE ARGS...: runs the load; a failure goes to broken
  local name=$1 file=$2 rc=0
  shift 2
  load "$@" >"$file" 2>"${file%.json}.log" || rc=$?
  if (( rc != 0 )); then
    broken+=("$name: the load failed: $(head -c 500 "$file") $(head -c 300 "${file%.json}.log")")
    return 1
  fi
}

# --- noisy neighbour ------------------------------------------------------------------
declare -A NOISY_FILE NOISY_CPU
noisy_arm() { # ARM
  local arm=$1 qn="noisy-$1" mode noisy=$NOISY_JOBS
  local analyze=0
  case $arm in a) mode=claim noisy=0 ;; b) mode=claim ;; e) mode=claim analyze=1 ;; c) mode=fetch ;; d) mode=naive ;; g) mode=group ;; esac
  create_queue "$DB" "$qn"
  [[ $mode == claim ]] && q "SELECT meshhook_limits.bind_queue('pgboss', '$qn')" >/dev/null
  echo "  arm $arm ($mode, A: $noisy jobs)" >&2
  local jf="$OUT/noisy-$arm.json"
  q "CHECKPOINT" >/dev/null
  cpu_start
  run_load "noisy $arm" "$jf" noisy --queue "$qn" --arm "$mode" --workers "$WORKERS" --run-ms "$RUN_MS" \
    --poll-ms "$POLL_MS" --noisy-jobs "$noisy" --quiet-tenants "$QUIET_TENANTS" --quiet-jobs "$QUIET_JOBS" \
    --quiet-delay "$QUIET_DELAY" --cap "$CAP" --limit "$LIMIT" --putback "$PUTBACK" --release "$RELEASE" \
    --analyze "$analyze" || true
  cpu_end; cpu_other
  NOISY_FILE[$arm]=$jf NOISY_CPU[$arm]=$cpu_other_pct
  if [[ -s $jf ]] && [[ -z $(json "$jf" .error 2>/dev/null) ]]; then
    load_checks "noisy $arm" "$jf"
    echo "    quiet p95 $(json "$jf" .quiet_p95_s) s, done $(json "$jf" .quiet_done)/$(json "$jf" .quiet_total), refusals $(json "$jf" .refusals), other CPU $cpu_other_pct" >&2
  fi
  # Before unbinding: an unbound queue's claims end only with their leases.
  slots_left "noisy $arm" 5
  [[ $mode == claim ]] && q "SELECT meshhook_limits.unbind_queue('pgboss', '$qn')" >/dev/null
  drop_queue_jobs "$qn"
}
if has "$SCENARIOS" noisy; then
  echo "noisy neighbour: A $NOISY_JOBS jobs, $QUIET_TENANTS quiet tenants × $QUIET_JOBS, $WORKERS workers, ${RUN_MS} ms jobs, limit $LIMIT" >&2
  clear_limits
  q "SELECT meshhook_limits.set_limit('concurrent_executions', $LIMIT)" >/dev/null
  for arm in $NOISY_ARMS; do noisy_arm "$arm"; done
fi

# --- weights ----------------------------------------------------------------------------
# The measured arm runs under concurrent_executions_total = BENCH_TOTAL. With
# BENCH_W_NOTOTAL=1 a second arm runs without it (just the W loops), where the
# running counts cannot split W slots by the weights exactly.
declare -A W_FILE=() W_CPU=()
weights_arm() { # KIND (total | none)
  local kind=$1 qn="weights-$1" jf="$OUT/weights-$1.json" total=$W_TOTAL
  [[ $kind == none ]] && total=0
  clear_limits
  for i in "${!weights[@]}"; do
    q "SELECT meshhook_limits.set_limit('fair_share_weight', ${weights[$i]}, tenant_id => '00000000-0000-4000-8000-$(printf '%012d' $((101 + i)))')" >/dev/null
  done
  (( total > 0 )) && q "SELECT meshhook_limits.set_limit('concurrent_executions_total', $total)" >/dev/null
  create_queue "$DB" "$qn"
  q "SELECT meshhook_limits.bind_queue('pgboss', '$qn', cost_path => 'cost')" >/dev/null
  echo "  concurrent_executions_total: $( (( total > 0 )) && echo "$total" || echo none)" >&2
  cpu_start
  run_load "weights $kind" "$jf" weights --queue "$qn" --weights "$W_WEIGHTS" --workers "$WORKERS" --run-ms "$RUN_MS" \
    --poll-ms "$POLL_MS" --jobs "$W_JOBS" --cost-max "$W_COST_MAX" --seconds "$W_SECONDS" --warmup "$W_WARMUP" \
    --total "$total" --release "$RELEASE" --analyze 1 || true
  cpu_end; cpu_other
  W_FILE[$kind]=$jf W_CPU[$kind]=$cpu_other_pct
  if [[ -s $jf ]] && [[ -z $(json "$jf" .error 2>/dev/null) ]]; then
    load_checks "weights $kind" "$jf"
    [[ $(json "$jf" .saturated) == true ]] || notes+=("weights $kind: a tenant ran out of jobs before the end (BENCH_W_JOBS); its share is not a saturated share")
    echo "    max deviation $(json "$jf" .max_abs_deviation_pct)%, $(json "$jf" .cost_per_s) cost/s" >&2
  fi
  slots_left "weights $kind" 5
  q "SELECT meshhook_limits.unbind_queue('pgboss', '$qn')" >/dev/null
  drop_queue_jobs "$qn"
}
if has "$SCENARIOS" weights; then
  echo "weights: $W_WEIGHTS, $WORKERS workers, ${W_SECONDS}s after ${W_WARMUP}s, $W_JOBS jobs per tenant" >&2
  (( W_TOTAL > 0 )) && weights_arm total
  [[ $W_NOTOTAL == 1 || $W_TOTAL == 0 ]] && weights_arm none
  clear_limits
fi

# --- throughput ---------------------------------------------------------------------------
# Two modes, because pg-boss's fetch does not cost the same on a short and on
# a deep queue: `steady` (each loop iteration first sends its batch, so the
# queue stays as short as the loops keep it; the insert is in both arms) and
# `backlog` (TP_JOBS jobs queued before the run, no inserts).
# Each case is a mode, a number of tenants (BENCH_TP_TENANTS) and a batch
# (BENCH_TP_BATCH): "mode tenants batch".
declare -A TP_RUNS=()   # "source case arm" → jobs/s of each round
declare -A TP_LIVE=() TP_TICK=() TP_DRAIN=()  # "source case" → claim arm: most live slots, the worker's longest tick, drain time
tp_n="" tp_b=""          # the case's tenants and batch, set before tp_run
tenant_expr=""
fill_pgboss() { # QUEUE [ARM]: TP_JOBS waiting jobs of tp_n tenants, 1 ms apart (FIFO order defined); arm group: each in its tenant's group
  local group=NULL
  [[ ${2:-} == group ]] && group="$tenant_expr"
  q "INSERT INTO pgboss.job (name, data, policy, created_on, start_after$( [[ $group != NULL ]] && echo ', group_id'))
     SELECT '$1', jsonb_build_object('tenant_id', $tenant_expr), 'standard',
            now() - ($TP_JOBS - g) * interval '1 ms', now() - ($TP_JOBS - g) * interval '1 ms'$( [[ $group != NULL ]] && echo ", $group")
       FROM generate_series(1, $TP_JOBS) g" >/dev/null
  q "VACUUM ANALYZE pgboss.job" >/dev/null
}
fill_pgmq() { # QUEUE
  q "SELECT count(*) FROM pgmq.send_batch('$1', (SELECT array_agg(jsonb_build_object('tenant_id', $tenant_expr) ORDER BY g)
       FROM generate_series(1, $TP_JOBS) g))" >/dev/null
  q "VACUUM ANALYZE pgmq.q_$1" >/dev/null
}
tp_run() { # SOURCE MODE ARM ROUND (the case's tenants and batch: tp_n, tp_b)
  local src=$1 mode=$2 arm=$3 r=$4 qn jf cmd=throughput produce=0 name="throughput $1 $2 $tp_n tenants batch $tp_b $3 round $4"
  local case="$mode $tp_n $tp_b"
  [[ $mode == steady ]] && produce=1
  tenant_expr="('00000000-0000-4000-8000-' || lpad((1 + g % $tp_n)::text, 12, '0'))"
  if [[ $src == pgboss ]]; then
    qn="tp-$r-$mode-$tp_n-$tp_b-$arm"; create_queue "$DB" "$qn"
    [[ $mode == backlog ]] && fill_pgboss "$qn" "$arm"
  else
    [[ $arm == group ]] && return 0   # pg-boss 12's only
    qn="tp_${r}_${mode}_${tp_n}_${tp_b}_$arm"; cmd=pgmq-throughput
    q "SELECT pgmq.create('$qn')" >/dev/null
    [[ $mode == backlog ]] && fill_pgmq "$qn"
  fi
  [[ $arm != fetch && $arm != group ]] && q "SELECT meshhook_limits.bind_queue('$src', '$qn')" >/dev/null
  jf="$OUT/tp-$src-$mode-$tp_n-$tp_b-$arm-$r.json"
  local larm=$arm
  [[ $src == pgmq && $arm == fetch ]] && larm='read'
  q "CHECKPOINT" >/dev/null
  if run_load "$name" "$jf" "$cmd" --queue "$qn" --arm "$larm" --workers "$WORKERS" --batch "$tp_b" \
      --seconds "$TP_SECONDS" --warmup "$TP_WARMUP" --poll-ms "$POLL_MS" --produce "$produce" --tenants "$tp_n" --limit "$LIMIT"; then
    load_checks "$name" "$jf"
    local jps waiting
    jps=$(json "$jf" .jobs_per_s)
    if [[ $mode == backlog ]]; then
      if [[ $src == pgboss ]]; then
        waiting=$(q "SELECT count(*) FROM pgboss.job WHERE name = '$qn' AND state < 'active'")
      else
        waiting=$(q "SELECT count(*) FROM pgmq.q_$qn WHERE vt <= clock_timestamp()")
      fi
      (( waiting > 0 )) || notes+=("$name: the backlog ran out before the end (BENCH_TP_JOBS); jobs/s is a lower bound")
    fi
    if [[ $arm == claim ]]; then
      TP_LIVE["$src $case"]+="$(json "$jf" .sampled_max_live_total) "
      TP_TICK["$src $case"]+="$(json "$jf" .max_tick_ms) "
    fi
    TP_RUNS["$src $case $arm"]+="$jps "
    printf '    %-7s %-8s %7s tenants  batch %-3s %-9s round %s: %s jobs/s\n' "$src" "$mode" "$tp_n" "$tp_b" "$arm" "$r" "$jps" >&2
  fi
  # Before unbinding: an unbound queue's claims end only with their leases.
  slots_left "$name" 10
  [[ $arm == claim ]] && TP_DRAIN["$src $case"]+="$DRAIN_S "
  [[ $arm != fetch && $arm != group ]] && q "SELECT meshhook_limits.unbind_queue('$src', '$qn')" >/dev/null
  if [[ $src == pgboss ]]; then drop_queue_jobs "$qn"; else q "SELECT pgmq.drop_queue('$qn')" >/dev/null; fi
}
TP_CPU="" tp_sources=""
if has "$SCENARIOS" throughput; then
  echo "throughput: $TP_ROUNDS rounds × ($TP_MODES) × tenants ($TP_TENANTS) × batch ($TP_BATCH) × ($TP_ARMS), $WORKERS workers, ${TP_SECONDS}s after ${TP_WARMUP}s" >&2
  clear_limits
  tp_sources=pgboss
  if [[ $TP_PGMQ == 1 ]]; then
    "$PSQL" -X -q -v ON_ERROR_STOP=1 -d "$DB" -f "$pgmq_sql" >"$OUT/pgmq-install.log" 2>&1 \
      || { broken+=("installing pgmq failed: $(head -c 300 "$OUT/pgmq-install.log")"); }
    q "SELECT to_regproc('pgmq.read') IS NOT NULL" | grep -q t && tp_sources+=" pgmq"
  fi
  cpu_start
  for r in $(seq "$TP_ROUNDS"); do
    for mode in $TP_MODES; do
      for tp_n in $TP_TENANTS; do
        for tp_b in $TP_BATCH; do
          for src in $tp_sources; do
            for arm in $TP_ARMS; do tp_run "$src" "$mode" "$arm" "$r"; done
          done
        done
      done
    done
  done
  cpu_end; cpu_other
  TP_CPU=$cpu_other_pct
fi

# --- backlog independence ----------------------------------------------------------------
BL_EMPTY="" BL_FULL=""
if has "$SCENARIOS" backlog; then
  echo "backlog: $BL_JOBS waiting jobs of A (at its limit), one job of B" >&2
  create_bench_db "$BL_DB"
  LOAD_DB=$BL_DB load init --queue bench-init >"$OUT/init-backlog.json" 2>&1 \
    || broken+=("pg-boss init in $BL_DB failed: $(head -c 300 "$OUT/init-backlog.json")")
  create_queue "$BL_DB" backlog
  qdb "$BL_DB" "SELECT meshhook_limits.set_limit('concurrent_executions', $LIMIT)" >/dev/null
  qdb "$BL_DB" "SELECT meshhook_limits.bind_queue('pgboss', 'backlog')" >/dev/null
  # A at its limit: LIMIT slots held for an hour (as if A had LIMIT jobs running).
  held=$(qdb "$BL_DB" "SELECT count(*) FILTER (WHERE a.granted) FROM generate_series(1, $LIMIT) i,
           LATERAL meshhook_limits.acquire_execution_slot('$NOISY_TENANT', CASE WHEN i > 0 THEN NULL::uuid END, 'held-' || i, '1 hour') a")
  [[ $held == "$LIMIT" ]] || broken+=("backlog: only $held of $LIMIT slots of A could be held")
  qdb "$BL_DB" "INSERT INTO pgboss.job (name, data, policy) VALUES ('backlog', jsonb_build_object('tenant_id', '$OTHER_TENANT'), 'standard')" >/dev/null
  qdb "$BL_DB" "VACUUM ANALYZE pgboss.job" >/dev/null
  # One timed claim per repetition, in a transaction rolled back (the job goes
  # back to waiting and the slot is not held: the rollback undoes both); the
  # claimed tenant is printed so that a wrong pick shows.
  time_claims() { # NAME: sets TC (median ms), TC_MIN, TC_MAX, TC_FIRST (the first call of the session)
    local jf="$OUT/backlog-$1.log" i
    TC=n/a TC_MIN="" TC_MAX="" TC_FIRST=""
    { echo '\set ON_ERROR_STOP 1'
      for ((i = 0; i <= BL_REPS; i++)); do
        echo 'BEGIN;'
        printf '%s\n' '\timing on'
        echo "SELECT 'claimed ' || tenant_id FROM meshhook_limits.claim_jobs('pgboss', 'backlog', 1);"
        printf '%s\n' '\timing off'
        echo 'ROLLBACK;'
        # Past claim_jobs' 100 ms reuse of the tenants it found: every timed
        # call runs its skip scan.
        echo 'SELECT pg_sleep(0.12);'
      done
    } | "$PSQL" -X -qAt -d "$BL_DB" >"$jf" 2>&1 || { broken+=("backlog $1: claim failed: $(grep -m1 ERROR "$jf")"); return; }
    local got
    got=$(grep -c "^claimed $OTHER_TENANT" "$jf" || true)
    (( got == BL_REPS + 1 )) || broken+=("backlog $1: B's job was claimed in $got of $((BL_REPS + 1)) claims ($(grep -m1 -v "^claimed $OTHER_TENANT\|^Time" "$jf" || echo 'no row'))")
    TC_FIRST=$(grep -o '^Time: [0-9.]*' "$jf" | head -1 | awk '{ printf "%.2f", $2 }')
    read -r TC TC_MIN TC_MAX < <(grep -o '^Time: [0-9.]*' "$jf" | awk '{ print $2 }' | tail -n "$BL_REPS" | sort -g |
      awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.2f %.2f %.2f\n", m, a[1], a[NR] }')
  }
  explain_claim() { # FILE: the plans of the statements inside claim_jobs (auto_explain, nested)
    { auto_explain_sql 0 analyze buffers nested_statements
      echo 'BEGIN;'
      echo "SELECT tenant_id FROM meshhook_limits.claim_jobs('pgboss', 'backlog', 1);"
      echo 'ROLLBACK;'
    } | "$PSQL" -X -q -d "$BL_DB" >"$1" 2>&1 || true
    # Only the statements on the queue table, the slot's and the shares', and
    # the call itself (the limit lookups inside are the same as for a slot).
    sed -e 's/ (cost=[^)]*)//' -e 's/^NOTICE:  //' "$1" |
      awk '/^duration: / { if (keep) printf "%s", block; block = ""; keep = 0 }
           /^(LOAD|SET|BEGIN|ROLLBACK)$/ || /^ *tenant_id *$/ || /^-+$/ || /^\(1 row\)$/ || /^ [0-9a-f-]+$/ { next }
           { block = block $0 "\n" }
           /pgboss\.job|claim_jobs\(|_claim_slot|_claim_shares/ { keep = 1 }
           END { if (keep) printf "%s", block }'
  }
  time_claims empty
  BL_EMPTY=$TC BL_EMPTY_MIN=$TC_MIN BL_EMPTY_MAX=$TC_MAX BL_EMPTY_FIRST=$TC_FIRST
  BL_EMPTY_PLAN=$(explain_claim "$OUT/backlog-plan-empty.txt")
  t0=$(now_s)
  # A's backlog: older than B's job (B's is last in FIFO order), waiting.
  qdb "$BL_DB" "INSERT INTO pgboss.job (name, data, policy, created_on, start_after)
    SELECT 'backlog', jsonb_build_object('tenant_id', '$NOISY_TENANT', 'n', g), 'standard',
           now() - interval '1 hour' + g * interval '1 ms', now() - interval '1 hour' + g * interval '1 ms'
      FROM generate_series(1, $BL_JOBS) g" >/dev/null
  qdb "$BL_DB" "VACUUM ANALYZE pgboss.job" >/dev/null
  qdb "$BL_DB" "CHECKPOINT" >/dev/null
  BL_LOAD_S=$(awk -v a="$(now_s)" -v b="$t0" 'BEGIN { printf "%.0f", a - b }')
  BL_DATA=$(qdb "$BL_DB" "SELECT count(*) || ' waiting jobs, pgboss.job_common ' || pg_size_pretty(pg_total_relation_size('pgboss.job_common')) || ' with indexes'
                            FROM pgboss.job WHERE state < 'active'")
  time_claims full
  BL_FULL=$TC BL_FULL_MIN=$TC_MIN BL_FULL_MAX=$TC_MAX BL_FULL_FIRST=$TC_FIRST
  BL_FULL_PLAN=$(explain_claim "$OUT/backlog-plan-full.txt")
  if (( BL_TENANTS > 0 )); then
    # Many tenants waiting, all at their limit (concurrent_executions 0, so
    # no slots are needed to hold them): what a claim costs per tenant with
    # waiting jobs (the skip scan and the shares).
    qdb "$BL_DB" "SELECT count(meshhook_limits.set_limit('concurrent_executions', 0,
                    tenant_id => ('00000000-0000-4000-8000-' || lpad((3000 + g)::text, 12, '0'))::uuid))
                    FROM generate_series(1, $BL_TENANTS) g" >/dev/null
    qdb "$BL_DB" "INSERT INTO pgboss.job (name, data, policy, created_on, start_after)
      SELECT 'backlog', jsonb_build_object('tenant_id', '00000000-0000-4000-8000-' || lpad((3000 + g)::text, 12, '0')), 'standard',
             now() - interval '30 minutes', now() - interval '30 minutes'
        FROM generate_series(1, $BL_TENANTS) g" >/dev/null
    qdb "$BL_DB" "VACUUM ANALYZE pgboss.job" >/dev/null
    time_claims tenants
    BL_TEN=$TC BL_TEN_MIN=$TC_MIN BL_TEN_MAX=$TC_MAX BL_TEN_FIRST=$TC_FIRST
  fi
  bl_live=$(qdb "$BL_DB" "SELECT count(*) FROM meshhook_limits.slots() WHERE state = 'live' AND tenant_id = '$OTHER_TENANT'")
  (( bl_live == 0 )) || broken+=("backlog: $bl_live slot(s) of B live after claims that were all rolled back")
  bl_active=$(qdb "$BL_DB" "SELECT count(*) FROM pgboss.job WHERE state = 'active'")
  (( bl_active == 0 )) || broken+=("backlog: $bl_active job(s) active after claims that were all rolled back")
fi

end_checks
[[ -z $wpid0 || $(worker_pid) == "$wpid0" ]] || broken+=("the worker process changed during the run (crash or restart)")

# --- report ---------------------------------------------------------------------------------
release_words() {
  if [[ $RELEASE == 1 ]]; then echo ", then \`release_execution_slot\` (claim and naive arms)"
  else echo " (claim arms: no release call, the slot ends with the job; naive arm: then \`release_execution_slot\`)"; fi
}
# Ratio with two decimals of A / B, or n/a.
noisy_row() { # ARM LABEL
  local jf=${NOISY_FILE[$1]:-}
  [[ -n $jf && -s $jf && -z $(json "$jf" .error 2>/dev/null) ]] || { echo "| $1 | $2 | (failed) | | | | | | | | |"; return; }
  local p95 done_ total lb
  p95=$(json "$jf" .quiet_p95_s) done_=$(json "$jf" .quiet_done) total=$(json "$jf" .quiet_total)
  lb=$(json "$jf" .quiet_wait_lower_bound_s)
  [[ -n $p95 ]] || p95="> $lb"
  local p50 p99 mx
  p50=$(json "$jf" .quiet_p50_s); [[ -n $p50 ]] || p50="> $lb"
  p99=$(json "$jf" .quiet_p99_s); [[ -n $p99 ]] || p99="> $lb"
  mx=$(json "$jf" .quiet_max_s); [[ -n $mx ]] || mx="> $lb"
  echo "| $1 | $2 | $done_ / $total in $(json "$jf" .quiet_seconds) s | $p50 | **$p95** | $p99 | $mx | $(json "$jf" .noisy_jobs_per_s_while_quiet) | $(json "$jf" .max_in_hand_noisy) / $(json "$jf" .max_in_hand_quiet) | $(json "$jf" .refusals) | ${NOISY_CPU[$1]} |"
}
report() {
  echo "## meshhook_limits: limit-aware fair claiming (claim_jobs) on pg-boss $boss_version"
  echo
  report_machine "" "Node $(node --version) (one process, pg-boss's pool)" "" "" "$settings"
  echo "- every pg-boss queue starts with $HISTORY completed jobs of its own (finished over the last day; pg-boss keeps them 7 days), then VACUUM ANALYZE"
  echo "- workers: $WORKERS concurrent loops, one job in hand each in noisy and weights (batch 1); an empty claim or fetch sleeps ${POLL_MS} ms"
  echo
  if has "$SCENARIOS" noisy; then
    echo "### Noisy neighbour"
    echo
    echo "Tenant A enqueues $NOISY_JOBS jobs (\`boss.insert\`, chunks of 1000); the $WORKERS workers start;"
    echo "${QUIET_DELAY} s later $QUIET_TENANTS quiet tenants enqueue $QUIET_JOBS jobs each. A job \"runs\" $RUN_MS ms (sleep), then"
    echo "\`boss.complete\`$(release_words). \`concurrent_executions\` = $LIMIT"
    echo "for every tenant (global default) in all arms; the FIFO arm ignores it. Wait = \`started_on − created_on\`"
    echo "of each quiet job in \`pgboss.job\`; a job not started when the arm stopped (after ${CAP} s at most, or"
    echo "when every quiet job was done) counts as waiting longer than any that did (\`>\`: at least that long)."
    echo "Naive put-back: $( [[ $PUTBACK == update ]] && echo "one \`UPDATE pgboss.job SET state = 'created', started_on = NULL, start_after = now() + retry_after\` (keeps created_on and the retry count; pg-boss has no defer call)" || echo "\`boss.fail\` with pg-boss's retry (jobs sent with retryLimit 1e6, retryDelay 5 s = retry_after_max)")."
    echo
    echo "| arm | what | quiet jobs done | p50 s | p95 s | p99 s | max s | A jobs/s meanwhile | max in hand A / quiet | refusals | other CPU |"
    echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    has "$NOISY_ARMS" a && noisy_row a "quiet tenants alone, claim_jobs"
    has "$NOISY_ARMS" b && noisy_row b "with A, claim_jobs"
    has "$NOISY_ARMS" e && noisy_row e "with A, claim_jobs, ANALYZE after A's enqueue"
    has "$NOISY_ARMS" c && noisy_row c "with A, FIFO boss.fetch (no limits)"
    has "$NOISY_ARMS" d && noisy_row d "with A, boss.fetch + acquire_execution_slot, put back"
    has "$NOISY_ARMS" g && noisy_row g "with A, pg-boss 12 boss.fetch with groupConcurrency = limit"
    echo
    local pa="" pb=""
    [[ -n ${NOISY_FILE[a]:-} && -s ${NOISY_FILE[a]:-/nonexistent} ]] && pa=$(json "${NOISY_FILE[a]}" .quiet_p95_s 2>/dev/null || true)
    [[ -n ${NOISY_FILE[b]:-} && -s ${NOISY_FILE[b]:-/nonexistent} ]] && pb=$(json "${NOISY_FILE[b]}" .quiet_p95_s 2>/dev/null || true)
    if [[ -n $pa && -n $pb ]]; then
      local r; r=$(ratio "$pb" "$pa")
      echo "- $(awk -v r="$r" 'BEGIN { print (r != "n/a" && r + 0 <= 1.5) ? "PASS" : "MISS" }'): quiet p95 with A (b) / alone (a): $pb / $pa s = **$r** (target ≤ 1.5)"
      for arm in e c d; do
        [[ -n ${NOISY_FILE[$arm]:-} && -s ${NOISY_FILE[$arm]} ]] || continue
        local p; p=$(json "${NOISY_FILE[$arm]}" .quiet_p95_s 2>/dev/null || true)
        if [[ -n $p ]]; then echo "- arm $arm / a: $(ratio "$p" "$pa")"; else echo "- arm $arm / a: > $(ratio "$(json "${NOISY_FILE[$arm]}" .quiet_wait_lower_bound_s)" "$pa") (p95 not reached before the stop)"; fi
      done
    fi
    echo "- per quiet tenant p95 (min–max over tenants):$(for arm in $NOISY_ARMS; do jf=${NOISY_FILE[$arm]:-}; [[ -n $jf && -s $jf ]] && printf ' %s %s–%s s;' "$arm" "$(json "$jf" .quiet_tenant_p95_min_s)" "$(json "$jf" .quiet_tenant_p95_max_s)"; done)"
    echo "- max in hand: the most jobs of one tenant claimed and not yet released at once (the load's own count, never above what the"
    echo "  database held); live slots sampled every 100 ms (\`slots()\`): max per tenant$(for arm in $NOISY_ARMS; do jf=${NOISY_FILE[$arm]:-}; [[ -n $jf && -s $jf ]] && printf ' %s %s;' "$arm" "$(json "$jf" .sampled_max_live)"; done)"
    echo "- empty claims / fetches:$(for arm in $NOISY_ARMS; do jf=${NOISY_FILE[$arm]:-}; [[ -n $jf && -s $jf ]] && printf ' %s %s of %s;' "$arm" "$(json "$jf" .empty_claims)" "$(json "$jf" .claims)"; done)"
    echo
  fi
  if has "$SCENARIOS" weights; then
    echo "### Weights"
    echo
    echo "Tenants with \`fair_share_weight\` $W_WEIGHTS, $W_JOBS jobs each (round-robin chunks of 1000, cost $( (( W_COST_MAX > 1 )) && echo "uniform 1..$W_COST_MAX" || echo 1),"
    echo "\`bind_queue(cost_path => 'cost')\`), no per-tenant limit; $WORKERS workers"
    echo "claim (batch 1), run $RUN_MS ms, complete$(release_words), for $W_SECONDS s after $W_WARMUP s of warm-up;"
    echo "\`ANALYZE pgboss.job\` after the enqueue (as arm e of the noisy neighbour). Share = the tenant's cost claimed in"
    echo "the measured window / all of it; running share = its time-averaged cost in hand / all of it."
    echo
    local kind jf dev
    for kind in total none; do
      jf=${W_FILE[$kind]:-}
      [[ -n $jf ]] || continue
      if [[ ! -s $jf || -n $(json "$jf" .error 2>/dev/null) ]]; then echo "$kind: (failed)"; echo; continue; fi
      if [[ $kind == total ]]; then
        echo "**\`concurrent_executions_total\` = $W_TOTAL** (the measurement; other CPU ${W_CPU[$kind]}):"
      else
        echo "**No total limit, just the $WORKERS loops** (other CPU ${W_CPU[$kind]}):"
      fi
      echo
      echo "| tenant | weight | target | cost claimed | share | deviation | mean running | running share | deviation | max in hand | waiting at end |"
      echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
      node -e "const o = JSON.parse(require('fs').readFileSync('$jf', 'utf8'));
        for (const t of o.tenants) console.log('| ' + t.tenant.slice(-3) + ' | ' + t.weight + ' | ' + t.target.toFixed(4) + ' | ' + t.cost_claimed + ' | ' +
          t.share.toFixed(4) + ' | ' + (t.deviation_pct > 0 ? '+' : '') + t.deviation_pct.toFixed(2) + '% | ' + t.mean_running_cost.toFixed(2) + ' | ' +
          t.running_share.toFixed(4) + ' | ' + (t.running_deviation_pct > 0 ? '+' : '') + t.running_deviation_pct.toFixed(2) + '% | ' + t.max_in_hand + ' | ' + t.waiting_at_end + ' |')"
      echo
      dev=$(json "$jf" .max_abs_deviation_pct)
      if [[ $kind == total ]]; then
        echo "- $(awk -v d="$dev" 'BEGIN { print (d + 0 <= 5) ? "PASS" : "MISS" }'): max relative deviation of a share from its target: **${dev}%** (target ±5%); of the running share: $(json "$jf" .max_abs_running_deviation_pct)%"
      else
        echo "- max relative deviation: ${dev}% (running share: $(json "$jf" .max_abs_running_deviation_pct)%)"
      fi
      echo "- $(json "$jf" .cost_per_s) cost/s claimed; $(json "$jf" .empty_claims) of $(json "$jf" .claims) claims empty; most in hand at once $(json "$jf" .max_in_hand_total), most live slots sampled $(json "$jf" .sampled_max_live_total); every tenant saturated to the end: $(json "$jf" .saturated)"
      echo
    done
  fi
  if has "$SCENARIOS" throughput; then
    echo "### Throughput, no limits"
    echo
    echo "No limit set at all; the queue bound with \`bind_queue(source, queue)\` for the claim arms. Each run on a new queue;"
    echo "$WORKERS loops with no run time, ${TP_SECONDS} s counted after ${TP_WARMUP} s; $TP_ROUNDS rounds, modes, tenants, batches, sources"
    echo "and arms interleaved within each round; the median is reported. Other CPU $TP_CPU."
    echo
    echo "- mode \`steady\`: every iteration first sends its batch of jobs (\`boss.insert\`, \`pgmq.send_batch\`), so the queue stays short; the insert is in both arms"
    echo "- mode \`backlog\`: $TP_JOBS jobs queued before the run (bulk INSERT 1 ms apart / \`pgmq.send_batch\`, then VACUUM ANALYZE), no inserts"
    echo "- \`fetch\`: \`boss.fetch(q, {batchSize})\` + \`boss.complete(q, ids)\` (pgmq: \`pgmq.read(q, 30, n)\` + \`pgmq.archive(q, ids)\`)"
    echo "- \`claim\`: \`claim_jobs(source, q, n)\` + the same complete/archive; no release call: the extension ends the slot with the job"
    has "$TP_ARMS" claimrel && echo "- \`claimrel\`: \`claim\` + \`SELECT release_execution_slot(s) FROM unnest(slots)\`, a third statement"
    has "$TP_ARMS" group && echo "- \`group\`: pg-boss 12's \`boss.fetch(q, {batchSize, groupConcurrency: $LIMIT})\` + \`boss.complete\`, each job in its tenant's group (pg-boss only)"
    echo
    echo "| source | mode | tenants | batch | arm | jobs/s (median) | rounds | × fetch |"
    echo "| --- | --- | ---: | ---: | --- | ---: | --- | ---: |"
    local src mode arm med base n b case
    for src in $tp_sources; do
      for mode in $TP_MODES; do
        for n in $TP_TENANTS; do
          for b in $TP_BATCH; do
            case="$mode $n $b"
            base=$(echo "${TP_RUNS["$src $case fetch"]:-}" | median)
            for arm in $TP_ARMS; do
              [[ $src == pgmq && $arm == group ]] && continue
              med=$(echo "${TP_RUNS["$src $case $arm"]:-}" | median)
              echo "| $src | $mode | $n | $b | $arm | $med | ${TP_RUNS["$src $case $arm"]:-} | $( [[ $arm == fetch ]] || ratio "$med" "$base") |"
            done
          done
        done
      done
    done
    echo
    for src in $tp_sources; do
      for mode in $TP_MODES; do
        for n in $TP_TENANTS; do
          for b in $TP_BATCH; do
            case="$mode $n $b"
            base=$(echo "${TP_RUNS["$src $case fetch"]:-}" | median)
            for arm in claim claimrel; do
              [[ -n ${TP_RUNS["$src $case $arm"]:-} && $base != n/a ]] || continue
              med=$(echo "${TP_RUNS["$src $case $arm"]}" | median)
              echo "- $(verdict "$(ratio "$med" "$base")" '>=' 0.8): $src $mode, $n tenants, batch $b: $arm / fetch $(ratio "$med" "$base") (target ≥ 0.8)"
            done
          done
        done
      done
    done
    echo "- \`claim\` arm, per run: most live slots sampled$(for k in "${!TP_LIVE[@]}"; do printf ' (%s) %s' "$k" "${TP_LIVE[$k]}"; done);"
    echo "  the worker's longest tick, ms$(for k in "${!TP_TICK[@]}"; do printf ' (%s) %s' "$k" "${TP_TICK[$k]}"; done);"
    echo "  seconds from the end of the run until no slot was left$(for k in "${!TP_DRAIN[@]}"; do printf ' (%s) %s' "$k" "${TP_DRAIN[$k]}"; done)"
    echo
  fi
  if has "$SCENARIOS" backlog; then
    echo "### Backlog independence"
    echo
    echo "Database \`$BL_DB\` (no worker ticking there), \`concurrent_executions\` = $LIMIT, tenant A at its limit ($LIMIT slots held"
    echo "with a 1-hour lease), one waiting job of tenant B, the newest. \`claim_jobs('pgboss', 'backlog', 1)\` timed with psql's timing"
    echo "$BL_REPS times after one untimed run (the first call of the session, with cold caches), each in a transaction rolled"
    echo "back and 120 ms apart (longer than claim_jobs reuses the tenants it found); every claim must return B's job."
    echo "Backlog: $BL_JOBS waiting jobs of A, older than B's (bulk INSERT in ${BL_LOAD_S:-?} s, then VACUUM ANALYZE): ${BL_DATA:-?}."
    echo
    echo "| case | median ms | min ms | max ms | first call of the session ms |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    echo "| B's job alone | $BL_EMPTY | ${BL_EMPTY_MIN:-} | ${BL_EMPTY_MAX:-} | ${BL_EMPTY_FIRST:-} |"
    echo "| B's job behind $BL_JOBS of A | $BL_FULL | ${BL_FULL_MIN:-} | ${BL_FULL_MAX:-} | ${BL_FULL_FIRST:-} |"
    (( BL_TENANTS > 0 )) && echo "| the same + one job each of $BL_TENANTS more tenants, all at their limit (0) | $BL_TEN | ${BL_TEN_MIN:-} | ${BL_TEN_MAX:-} | ${BL_TEN_FIRST:-} |"
    echo
    echo "- $(awk -v r="$(ratio "$BL_FULL" "$BL_EMPTY")" 'BEGIN { print (r != "n/a" && r + 0 <= 2) ? "PASS" : "MISS" }'): with the backlog / without: **$(ratio "$BL_FULL" "$BL_EMPTY")** (target ≤ 2)"
    echo
    echo "Plans inside \`claim_jobs\` behind the backlog (auto_explain: nested statements, ANALYZE, BUFFERS; costs removed):"
    echo
    echo '```'
    echo "$BL_FULL_PLAN"
    echo '```'
    echo
    echo "Without the backlog:"
    echo
    echo '```'
    echo "$BL_EMPTY_PLAN"
    echo '```'
    echo
  fi
  if (( ${#notes[@]} )); then
    echo "### Notes"
    echo
    printf -- '- %s\n' "${notes[@]}"
    echo
  fi
  report_checks "- OK: every load ran without error; every claimed job was completed; no tenant ever had more jobs in" \
    "  hand or live slots than its limit (nor all together more than the total); no slot was left after an arm;" \
    "  no crashed backend; the library was not replaced."
}

publish "raw output"
