#!/usr/bin/env bash
# The cost of the background worker's sampling on real pg-boss 11.
#
#  (a) throughput: pg-boss producers/consumers (benches/pgboss_load.mjs ab:
#      batched send + fetch + complete, several concurrent workers) run
#      without a break while the meshhook_limits worker is switched off and
#      on under it every few seconds (sample_interval 1h / 1s, reloaded):
#      off, on, off, ..., off. Prints jobs/s per phase, the loss of each on
#      phase against its two neighbours, and the worker's own CPU.
#  (b) sample time: 1,000 queues and 1,000,000 jobs in pg-boss (queues with
#      pg-boss's own pgboss.create_queue(), jobs bulk-inserted into
#      pgboss.job); times SELECT meshhook_limits.tick() and
#      _sample_pgboss() alone (median of several) and prints the plan of the
#      sampler's query (auto_explain, EXPLAIN ANALYZE of the installed code).
#
#   bash benches/pgboss.sh
#   BENCH_SECONDS=30 BENCH_PAIRS=4 bash benches/pgboss.sh
#
# Environment:
#   BENCH_PHASE     seconds per throughput phase (default 10)
#   BENCH_SETTLE    seconds at the start of a phase not counted (default 1)
#   BENCH_WARMUP    warm-up seconds before the first phase (default 5)
#   BENCH_PAIRS     on phases, each between two off phases (default 8)
#   BENCH_KEEP      completed jobs older than this many seconds are deleted every
#                   second, as pg-boss's maintenance does (default 10; 0 = keep all)
#   BENCH_WORKERS   concurrent pg-boss worker loops (default 8)
#   BENCH_BATCH     jobs per send/fetch/complete (default 20)
#   BENCH_QUEUES    queues of the throughput load (default 4)
#   BENCH_SAMPLE_QUEUES  queues for (b) (default 1000)
#   BENCH_SAMPLE_JOBS    jobs for (b) (default 1000000)
#   BENCH_REPS      timed repetitions of tick() and of the sampler (default 5)
#   BENCH_CLUSTER   name of the throwaway cluster for scripts/pg.sh (default bench-pgboss)
#   BENCH_OUT       directory for raw output and results.md
#                   (default /tmp/meshhook_limits/bench-pgboss-results)
#
# Exit status: 0 when everything ran, whether the target was met or not (a
# benchmark is not a test); 1 when something broke: the load failed, the
# worker did not run (or ran when it should not), a tick failed, a crashed
# backend, the library replaced mid-run; 2 for a missing prerequisite.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
PHASE=${BENCH_PHASE:-10}
SETTLE=${BENCH_SETTLE:-1}
WARMUP=${BENCH_WARMUP:-5}
PAIRS=${BENCH_PAIRS:-8}
KEEP=${BENCH_KEEP:-10}
WORKERS=${BENCH_WORKERS:-8}
BATCH=${BENCH_BATCH:-20}
LOAD_QUEUES=${BENCH_QUEUES:-4}
SAMPLE_QUEUES=${BENCH_SAMPLE_QUEUES:-1000}
SAMPLE_JOBS=${BENCH_SAMPLE_JOBS:-1000000}
REPS=${BENCH_REPS:-5}
CLUSTER=${BENCH_CLUSTER:-bench-pgboss}
OUT=${BENCH_OUT:-/tmp/meshhook_limits/bench-pgboss-results}
DB=bench          # throughput database; the worker ticks here
SAMPLE_DB=sample  # (b), sampled by hand with the worker off
INTERVAL_MS=1000

for v in PHASE PAIRS WORKERS BATCH LOAD_QUEUES SAMPLE_QUEUES SAMPLE_JOBS REPS; do
  need_positive "$v" "${!v}"
done
need_nonneg BENCH_WARMUP "$WARMUP"
need_nonneg BENCH_SETTLE "$SETTLE"
need_nonneg BENCH_KEEP "$KEEP"
(( SETTLE < PHASE )) || { echo "BENCH_SETTLE must be shorter than BENCH_PHASE" >&2; exit 2; }
command -v node >/dev/null || { echo "node not found (Node 20+)" >&2; exit 2; }
[[ -f $root/tests/node/node_modules/pg-boss/package.json ]] \
  || { echo "pg-boss is not installed; run bash scripts/install-queue-systems.sh" >&2; exit 2; }
[[ -f $PG_BIN/../lib/auto_explain.so || -f /usr/lib/postgresql/15/lib/auto_explain.so ]] \
  || { echo "auto_explain (postgresql-15 contrib) not found" >&2; exit 2; }
need_so
ext_sql=$(ls /usr/share/postgresql/15/extension/meshhook_limits--*.sql 2>/dev/null | head -1)
ext_sql_sha=$( [[ -n $ext_sql ]] && sha256sum "$ext_sql" | cut -c1-12 || echo "?")
boss_version=$(node -p "require('$root/tests/node/node_modules/pg-boss/package.json').version")

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/*.txt "$OUT"/results.md

# --- cluster ---------------------------------------------------------------
# The worker runs in database $DB; the ab load switches it between ticking
# every second and sleeping on its latch (sample_interval 1h) with ALTER
# SYSTEM and pg_reload_conf(), so no restart separates the two arms.
start_cluster 'meshhook_limits.restart_grace = 0' \
  "meshhook_limits.database = '$DB'" "meshhook_limits.sample_interval = 1h" \
  'meshhook_limits.worker = on'
bench_client_env

q() { qdb "$1" "$2"; }
conn() { echo "host=$PGHOST port=$PGPORT user=postgres dbname=$1"; }

create_bench_db "$DB"
node "$here/pgboss_load.mjs" "$(conn "$DB")" init --queues "$LOAD_QUEUES" >"$OUT/init.json" \
  || { echo "pg-boss init failed: $(cat "$OUT/init.json")" >&2; exit 1; }

broken=()
worker_pid() { q postgres "SELECT pid FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker'"; }
json() { node -e "const o = JSON.parse(require('fs').readFileSync('$1', 'utf8')); const v = o$2; process.stdout.write(v == null ? '' : String(typeof v === 'number' ? Math.round(v * 100) / 100 : v))"; }

# --- machine and settings ----------------------------------------------------
machine_info "$DB"
settings() {
  pg_settings_of postgres fsync synchronous_commit shared_buffers work_mem meshhook_limits.worker \
    meshhook_limits.sample_interval meshhook_limits.database meshhook_limits.queue_window
}

# --- (a) throughput, worker off vs on, interleaved --------------------------------
total=$(( WARMUP + (2 * PAIRS + 1) * PHASE ))
echo "pg-boss throughput: $((2 * PAIRS + 1)) phases of ${PHASE}s (off, on, ..., off) after ${WARMUP}s, ~${total}s" >&2
wpid=""
for i in $(seq 50); do wpid=$(worker_pid); [[ -n $wpid ]] && break; sleep 0.1; done
[[ -n $wpid ]] || { echo "the meshhook_limits worker is not running; see $server_log" >&2; exit 1; }
q "$DB" "CHECKPOINT" >/dev/null
ticks0=$(q "$DB" "SELECT ticks FROM meshhook_limits.worker_state")
errs0=$(q "$DB" "SELECT errors FROM meshhook_limits.worker_state")
full0=$(q "$DB" "SELECT count(DISTINCT stats_at) FROM meshhook_limits.queue_samples")
ablog="$OUT/ab.json"
rc=0
cpu_start
node "$here/pgboss_load.mjs" "$(conn "$DB")" ab --queues "$LOAD_QUEUES" --workers "$WORKERS" \
  --batch "$BATCH" --pairs "$PAIRS" --phase "$PHASE" --settle "$SETTLE" --warmup "$WARMUP" \
  --worker-pid "$wpid" --on-interval "${INTERVAL_MS}ms" --off-interval 1h --keep "$KEEP" >"$ablog" 2>"$OUT/ab.log" || rc=$?
cpu_end; cpu_other
if (( rc != 0 )) || [[ -z $(json "$ablog" .off_mean_jobs_per_s 2>/dev/null || true) ]]; then
  broken+=("load failed: $(head -c 400 "$ablog" 2>/dev/null) $(head -c 400 "$OUT/ab.log" 2>/dev/null)")
fi
settings_on=$(settings)
ticks1=$(q "$DB" "SELECT ticks FROM meshhook_limits.worker_state")
errs1=$(q "$DB" "SELECT errors FROM meshhook_limits.worker_state")
dticks=$((ticks1 - ticks0))
on_seconds=$((PAIRS * PHASE))
# About one tick per second of the on phases (plus one per switch).
(( dticks >= on_seconds * 8 / 10 && dticks <= on_seconds + 2 * PAIRS + 3 )) \
  || broken+=("the worker ticked $dticks times over $on_seconds s of on phases")
(( errs1 == errs0 )) || broken+=("$((errs1 - errs0)) tick(s) failed: $(q "$DB" "SELECT last_error FROM meshhook_limits.worker_state")")
[[ $(worker_pid) == "$wpid" ]] || broken+=("the worker process changed during the run (crash or restart)")
full_passes=$(( $(q "$DB" "SELECT count(DISTINCT stats_at) FROM meshhook_limits.queue_samples") - full0 ))
scan_ms_load=$(q "$DB" "SELECT coalesce(queue_stats_ms::text, '–') FROM meshhook_limits.worker_state")
last_ms=$(q "$DB" "SELECT coalesce(last_tick_ms::text, '–') FROM meshhook_limits.worker_state")
load_rows=$(q "$DB" "SELECT count(*) FROM pgboss.job")
loss=$(json "$ablog" .loss_pct)
paired_mean=$(json "$ablog" .paired_loss_mean_pct)
paired_se=$(json "$ablog" .paired_loss_stderr_pct)
paired_median=$(json "$ablog" .paired_loss_median_pct)
noise=$(json "$ablog" .off_neighbour_diff_median_pct)
wcpu_on=$(json "$ablog" .worker_cpu_on_pct_of_core)
wcpu_off=$(json "$ablog" .worker_cpu_off_pct_of_core)
echo "  loss: paired mean ${paired_mean}% ± ${paired_se} (median ${paired_median}%), worker CPU on ${wcpu_on}% of a core, $dticks ticks, $full_passes full passes" >&2

# The plan of the sampler's statement as installed (auto_explain, nested
# statements, EXPLAIN ANALYZE + BUFFERS, statements over 10 ms only), with
# the cost estimates stripped.
explain_sampler() { # db file
  { auto_explain_sql 10 analyze buffers nested_statements
    echo "SELECT meshhook_limits._sample_pgboss(clock_timestamp(), current_setting('meshhook_limits.queue_window')::interval);"
  } | "$PSQL" -X -q -d "$1" >"$2" 2>&1 || true
  sed -n '/^[A-Za-z].*(cost=/,$p' "$2" | sed '/NOTICE:  duration/,$d' | sed 's/ (cost=[^)]*)//'
}
# The sampler on the job table as the last phase left it (every finished job
# inside the queue window), before (b) replaces the data set.
load_plan=$(explain_sampler "$DB" "$OUT/sampler-plan-load.txt")

# --- (b) sample time with many queues and jobs --------------------------------
echo "sample time: $SAMPLE_QUEUES queues, $SAMPLE_JOBS jobs" >&2
create_bench_db "$SAMPLE_DB"
node "$here/pgboss_load.mjs" "$(conn "$SAMPLE_DB")" init --queues 0 >"$OUT/init-sample.json" \
  || { echo "pg-boss init failed: $(cat "$OUT/init-sample.json")" >&2; exit 1; }
t0=$(now_s)
# Queues through pg-boss's own function (what boss.createQueue runs): standard
# policy, not partitioned (pg-boss's default), so jobs go to pgboss.job_common.
q "$SAMPLE_DB" "DO \$\$ BEGIN FOR i IN 1..$SAMPLE_QUEUES LOOP
    PERFORM pgboss.create_queue('queue-' || lpad(i::text, 5, '0'), '{\"policy\":\"standard\"}'::jsonb);
  END LOOP; END \$\$" >/dev/null
# Jobs: random queue; 5% created (queued, up to 1 h old), 0.5% active, 4.5%
# failed, 90% completed, finished uniformly over the last 24 h (pg-boss 11
# keeps finished jobs in pgboss.job until deletion, 7 days by default), so
# about 1/288 of them fall in a 5-minute window. The deferred foreign keys
# are skipped for the bulk load (every name is a queue by construction).
"$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$SAMPLE_DB" >/dev/null <<SQL
SET session_replication_role = replica;
SELECT setseed(0.42);
INSERT INTO pgboss.job (name, data, state, created_on, start_after, started_on, completed_on, keep_until, policy)
SELECT name, jsonb_build_object('n', g), st, created, created, started,
       CASE WHEN st >= 'completed' THEN finished END, created + interval '14 days', 'standard'
  FROM (SELECT g, name, st, finished,
               CASE WHEN st = 'created' THEN NULL
                    WHEN st = 'active' THEN now() - r2 * interval '1 minute'
                    ELSE finished - r2 * interval '2 seconds' END AS started,
               CASE WHEN st = 'created' THEN now() - r2 * interval '1 hour'
                    WHEN st = 'active' THEN now() - interval '1 minute' - r3 * interval '10 seconds'
                    ELSE finished - interval '2 seconds' - r3 * interval '10 seconds' END AS created
          FROM (SELECT g, 'queue-' || lpad((1 + floor(random() * $SAMPLE_QUEUES))::int::text, 5, '0') AS name,
                       CASE WHEN x < 0.05 THEN 'created' WHEN x < 0.055 THEN 'active'
                            WHEN x < 0.10 THEN 'failed' ELSE 'completed' END::pgboss.job_state AS st,
                       now() - random() * interval '24 hours' AS finished, random() AS r2, random() AS r3
                  FROM (SELECT g, random() AS x FROM generate_series(1, $SAMPLE_JOBS) g) a) b) d;
RESET session_replication_role;
VACUUM ANALYZE pgboss.job, pgboss.queue;
CHECKPOINT;
SQL
load_s=$(awk -v a="$(now_s)" -v b="$t0" 'BEGIN { printf "%.0f", a - b }')
dataset=$(q "$SAMPLE_DB" "SELECT (SELECT count(*) FROM pgboss.queue) || ' queues, ' ||
    sum(n) || ' jobs (' || string_agg(state || ' ' || n, ', ' ORDER BY state) || '), ' ||
    sum(w) || ' of them finished within the queue window; pgboss.job_common ' ||
    pg_size_pretty(pg_total_relation_size('pgboss.job_common')) || ' with indexes, heap ' ||
    pg_size_pretty(pg_relation_size('pgboss.job_common'))
  FROM (SELECT state, count(*) AS n,
               count(*) FILTER (WHERE completed_on > now() - current_setting('meshhook_limits.queue_window')::interval) AS w
          FROM pgboss.job GROUP BY state) s")
echo "  loaded in ${load_s}s: $dataset" >&2

# Time each statement REPS times after one untimed run (warm caches), each in
# its own transaction as the worker runs it; the median is reported.
time_stmt() { # name sql [setup] -> "median min max", or "n/a n/a n/a" on error
  local f="$OUT/time-$1.log"
  { if [[ -n ${3:-} ]]; then echo "$3;"; fi; echo '\timing on'; for ((i = 0; i <= REPS; i++)); do echo "$2;"; done; } |
    "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$SAMPLE_DB" >"$f" 2>&1 || { echo "n/a n/a n/a"; return; }
  grep -o '^Time: [0-9.]*' "$f" | awk '{ print $2 }' | tail -n "$REPS" | sort -g |
    awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.1f %.1f %.1f", m, a[1], a[NR] }'
}
timed() { # name: record a failed timing
  [[ $2 != n/a ]] || broken+=("timing $1 failed: $(grep -m1 -i error "$OUT/time-$1.log")")
}
win="current_setting('meshhook_limits.queue_window')::interval"
read -r tick_med tick_min tick_max <<<"$(time_stmt tick "SELECT meshhook_limits.tick()" "SET meshhook_limits.queue_scan_budget = 1")"
timed tick "$tick_med"
# Between full passes: the untimed first run makes a full pass; with a tiny
# budget the timed ones that follow are all cheap ticks.
read -r cheap_med cheap_min cheap_max <<<"$(time_stmt tick_cheap "SELECT meshhook_limits.tick()" "SET meshhook_limits.queue_scan_budget = 0.0001")"
timed tick_cheap "$cheap_med"
cheap_ticks=$(q "$SAMPLE_DB" "SELECT count(DISTINCT sampled_at) FROM meshhook_limits.queue_samples WHERE stats_at < sampled_at")
(( cheap_ticks >= REPS )) || broken+=("only $cheap_ticks of the $REPS ticks under a tiny budget were cheap ones")
read -r sampc_med sampc_min sampc_max <<<"$(time_stmt sample_pgboss_cheap "SELECT meshhook_limits._sample_pgboss(clock_timestamp(), $win, false)")"
timed sample_pgboss_cheap "$sampc_med"
full_ms=$(q "$SAMPLE_DB" "SELECT queue_stats_ms FROM meshhook_limits.worker_state")
budget_default=$(q "$SAMPLE_DB" "SELECT boot_val FROM pg_settings WHERE name = 'meshhook_limits.queue_scan_budget'")
full_every=$(awk -v ms="$full_ms" -v b="$budget_default" 'BEGIN { printf "%.0f", ms / b / 1000 }')
per_second=$(awk -v c="$cheap_med" -v b="$budget_default" -v i="$INTERVAL_MS" 'BEGIN { printf "%.1f", c * 1000 / i + b * 1000 }')
read -r samp_med samp_min samp_max <<<"$(time_stmt sample_pgboss "SELECT meshhook_limits._sample_pgboss(clock_timestamp(), $win)")"
timed sample_pgboss "$samp_med"
alerts=""
if [[ $(q "$SAMPLE_DB" "SELECT to_regprocedure('meshhook_limits._evaluate_alerts(timestamptz)') IS NOT NULL") == t ]]; then
  read -r al_med al_min al_max <<<"$(time_stmt evaluate_alerts "SELECT meshhook_limits._evaluate_alerts(clock_timestamp())")"
  timed evaluate_alerts "$al_med"
  alerts=yes
fi
tick_errors=$(q "$SAMPLE_DB" "SELECT errors FROM meshhook_limits.worker_state")
(( tick_errors == 0 )) || broken+=("tick() recorded $tick_errors error(s)")
grep -q 'sampling pg-boss failed' "$OUT/time-tick.log" && broken+=("tick(): $(grep -m1 'sampling pg-boss failed' "$OUT/time-tick.log")")
samples=$(q "$SAMPLE_DB" "SELECT count(*) FROM meshhook_limits.queue_samples
                            WHERE source = 'pgboss' AND sampled_at = (SELECT max(sampled_at) FROM meshhook_limits.queue_samples)")
[[ $samples == "$SAMPLE_QUEUES" ]] || broken+=("the last sample has $samples pg-boss queues, expected $SAMPLE_QUEUES")

plan=$(explain_sampler "$SAMPLE_DB" "$OUT/sampler-plan.txt")
# What one scan of the job table costs, for scale.
scan_ms=$( { echo '\timing on'; echo 'SELECT count(*) FROM pgboss.job;'; echo 'SELECT count(*) FROM pgboss.job;'; } |
  "$PSQL" -X -qAt -d "$SAMPLE_DB" 2>&1 | grep -o '^Time: [0-9.]*' | tail -1 | awk '{ printf "%.1f", $2 }')

end_checks

# --- report ------------------------------------------------------------------
report() {
  echo "## meshhook_limits: cost of the worker's sampling on pg-boss $boss_version"
  echo
  report_machine "" "Node $(node --version)" ", $(basename "${ext_sql:-?}") sha256 $ext_sql_sha…" " (at the end; the load switches sample_interval between ${INTERVAL_MS}ms and 1h)" "$settings_on"
  echo
  echo "### (a) Throughput, worker off vs on, interleaved"
  echo
  echo "$WORKERS concurrent loops of pg-boss \`insert\` $BATCH jobs → \`fetch\` batchSize $BATCH → \`complete\`,"
  echo "over $LOAD_QUEUES queues, run without a break for $((2 * PAIRS + 1)) phases of $PHASE s after $WARMUP s of warm-up;"
  echo "the worker is switched at each phase boundary (\`sample_interval\` ${INTERVAL_MS}ms ↔ 1h, \`pg_reload_conf()\`),"
  echo "and the first $SETTLE s of every phase are not counted. $(if (( KEEP > 0 )); then
    echo "Every second, jobs completed more than $KEEP s ago are deleted (pg-boss's maintenance with a short"
    echo "\`deleteAfterSeconds\`), so the job table stays at a steady size: $load_rows rows at the end."
  else
    echo "The job table is never emptied: it grew to $load_rows rows by the end."
  fi)"
  echo
  echo "| phase | worker | jobs/s | worker CPU (% of one core) | machine busy |"
  echo "| ---: | --- | ---: | ---: | ---: |"
  node -e "const o = JSON.parse(require('fs').readFileSync('$ablog', 'utf8'));
    o.phases.forEach((p, i) => console.log('| ' + (i + 1) + ' | ' + p.arm + ' | ' + p.jobs_per_s.toFixed(0) + ' | ' +
      p.worker_cpu_pct_of_core.toFixed(2) + ' | ' + p.machine_busy_pct.toFixed(0) + '% |'))" 2>/dev/null || echo "| (no phases) | | | | |"
  echo
  echo "- mean jobs/s: off $(json "$ablog" .off_mean_jobs_per_s), on $(json "$ablog" .on_mean_jobs_per_s) → loss $loss%"
  echo "- each on phase against the mean of its two neighbours: mean **$paired_mean%** ± $paired_se (standard error), median $paired_median%"
  echo "  (per phase: $(node -e "const o = JSON.parse(require('fs').readFileSync('$ablog', 'utf8')); process.stdout.write(o.paired_loss_pct.map(x => x.toFixed(1) + '%').join(', '))" 2>/dev/null))"
  echo "- noise: neighbouring off phases differ by $noise% (median)"
  echo "- CPU of the worker process: $wcpu_on% of one core while on ($(awk -v x="$wcpu_on" -v n="$NCPU" 'BEGIN { printf "%.2f", x / n }')% of the machine's $NCPU CPUs), $wcpu_off% while off"
  echo "- ticks: $dticks, of which $full_passes full passes over the queue tables (the last took $scan_ms_load ms; last tick $last_ms ms)"
  echo "- other CPU (outside the cluster and the load): $cpu_other_pct"
  echo "- $(verdict "$paired_mean" '<' 1): throughput loss with the worker sampling every second: $paired_mean% (target < 1%)"
  echo
  echo "Plan of the sampler's statement on the job table the last phase left ($load_rows rows, all"
  echo "finished within the queue window; auto_explain, ANALYZE, BUFFERS; costs removed):"
  echo
  echo '```'
  echo "$load_plan"
  echo '```'
  echo
  echo "### (b) Sample time, $SAMPLE_QUEUES queues and $SAMPLE_JOBS jobs"
  echo
  echo "Data set: $dataset; loaded in ${load_s} s."
  echo
  echo "| statement | median ms | min ms | max ms |"
  echo "| --- | ---: | ---: | ---: |"
  echo "| \`SELECT meshhook_limits.tick()\` with a full pass (\`queue_scan_budget = 1\`) | $tick_med | $tick_min | $tick_max |"
  echo "| \`SELECT meshhook_limits.tick()\` between full passes | $cheap_med | $cheap_min | $cheap_max |"
  echo "| \`_sample_pgboss(now, queue_window)\` alone, full pass | $samp_med | $samp_min | $samp_max |"
  echo "| \`_sample_pgboss(now, queue_window, false)\` alone, waiting jobs only | $sampc_med | $sampc_min | $sampc_max |"
  [[ -n $alerts ]] && echo "| \`_evaluate_alerts(now)\` alone | $al_med | $al_min | $al_max |"
  echo "| \`SELECT count(*) FROM pgboss.job\` (one full scan, for scale) | $scan_ms | | |"
  echo
  echo "$REPS timed runs each after one untimed run, each its own transaction, worker asleep."
  echo "The last full pass took $full_ms ms; under the default \`queue_scan_budget\` ($budget_default of one core) the"
  echo "next one follows $full_every s later, so at one tick a second the sampler costs about $per_second ms of CPU"
  echo "per second (a cheap tick each second plus the budget), instead of a full tick every second."
  echo
  echo "Plan of the sampler's statement (auto_explain, ANALYZE, BUFFERS; costs removed):"
  echo
  echo '```'
  echo "$plan"
  echo '```'
  echo
  report_checks "- OK: the load ran without error; the worker ticked about once a second in the" \
    "  on phases with no failed tick and the same process throughout; tick() and the" \
    "  sampler ran cleanly and sampled all $SAMPLE_QUEUES queues."
}

publish "raw output"
