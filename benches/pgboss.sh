#!/usr/bin/env bash
# The cost of the background worker's sampling on real pg-boss 11.
#
#  (a) throughput: pg-boss producers/consumers (benches/pgboss_load.mjs:
#      batched send + fetch + complete, several concurrent workers) for a
#      fixed time, alternately with the meshhook_limits worker off and on
#      (ticking every second) on one cluster restarted between phases:
#      off, on, off, on, ... Prints jobs/s per phase and the loss.
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
#   BENCH_SECONDS   measured seconds per throughput phase (default 20)
#   BENCH_WARMUP    warm-up seconds per phase, discarded (default 3)
#   BENCH_PAIRS     off/on pairs of phases (default 3)
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
DURATION=${BENCH_SECONDS:-20}
WARMUP=${BENCH_WARMUP:-3}
PAIRS=${BENCH_PAIRS:-3}
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

for v in DURATION PAIRS WORKERS BATCH LOAD_QUEUES SAMPLE_QUEUES SAMPLE_JOBS REPS; do
  need_positive "$v" "${!v}"
done
need_nonneg BENCH_WARMUP "$WARMUP"
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
# The worker ticks in database $DB every second when on. It is switched with
# ALTER SYSTEM (a postmaster setting) and a restart before every phase, so
# both arms start from the same cold shared buffers.
start_cluster 'meshhook_limits.restart_grace = 0' \
  "meshhook_limits.database = '$DB'" "meshhook_limits.sample_interval = ${INTERVAL_MS}ms" \
  'meshhook_limits.worker = off'
bench_client_env

q() { qdb "$1" "$2"; }
conn() { echo "host=$PGHOST port=$PGPORT user=postgres dbname=$1"; }

create_bench_db "$DB"
node "$here/pgboss_load.mjs" "$(conn "$DB")" init --queues "$LOAD_QUEUES" >"$OUT/init.json" \
  || { echo "pg-boss init failed: $(cat "$OUT/init.json")" >&2; exit 1; }

broken=()

set_worker() { # on|off: restart the cluster with the worker on or off
  q postgres "ALTER SYSTEM SET meshhook_limits.worker = $1" >/dev/null
  "$root/scripts/pg.sh" stop "$CLUSTER" >/dev/null
  # A reinstall of the extension elsewhere can leave the library missing for
  # a moment; retry the start (the run is then flagged as untrustworthy).
  local try
  for try in 1 2 3 4 5 6; do
    "$root/scripts/pg.sh" start "$CLUSTER" >/dev/null 2>&1 && break
    (( try < 6 )) || { echo "could not start the cluster; see $server_log" >&2; exit 1; }
    sleep 5
  done
  wait_ready
  local want=0 n i
  [[ $1 == on ]] && want=1
  for i in $(seq 50); do
    n=$(q postgres "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker'")
    [[ $n == "$want" ]] && break
    sleep 0.1
  done
  [[ $n == "$want" ]] || broken+=("worker $1: $n worker process(es) running, expected $want")
}
worker_pid() { q postgres "SELECT pid FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker'"; }

json() { node -e "const o = JSON.parse(require('fs').readFileSync('$1', 'utf8')); const v = o['$2']; process.stdout.write(v == null ? '' : String(v))"; }

# --- machine and settings ----------------------------------------------------
machine_info "$DB"
settings() {
  pg_settings_of postgres fsync synchronous_commit shared_buffers work_mem meshhook_limits.worker \
    meshhook_limits.sample_interval meshhook_limits.database meshhook_limits.queue_window
}

# --- (a) throughput, worker off vs on ------------------------------------------
phases=()
for ((i = 0; i < PAIRS; i++)); do phases+=(off on); done
total=$(( ${#phases[@]} * (DURATION + WARMUP + 4) ))
echo "pg-boss throughput: ${#phases[@]} phases x (${WARMUP}s warm-up + ${DURATION}s), ~${total}s" >&2

rows=()       # n|arm|jobs/s|ticks|worker cpu %|last tick ms|job rows|other CPU
declare -A SUM CNT
SUM[off]=0 SUM[on]=0 CNT[off]=0 CNT[on]=0
declare -a JPS ARM
settings_on=""
n=0
for arm in "${phases[@]}"; do
  n=$((n + 1))
  printf '  phase %d (worker %-3s) ' "$n" "$arm" >&2
  set_worker "$arm"
  [[ $arm == on ]] && settings_on=$(settings)
  # Same start for every phase: no jobs, no old samples.
  q "$DB" "TRUNCATE pgboss.job; TRUNCATE meshhook_limits.queue_samples" >/dev/null
  q "$DB" "CHECKPOINT" >/dev/null
  wpid=""; [[ $arm == on ]] && wpid=$(worker_pid)
  ticks0=$(q "$DB" "SELECT ticks FROM meshhook_limits.worker_state")
  errs0=$(q "$DB" "SELECT errors FROM meshhook_limits.worker_state")
  log="$OUT/phase-$n-$arm.json"
  rc=0
  cpu_start; w0=$(proc_cpu "$wpid")
  node "$here/pgboss_load.mjs" "$(conn "$DB")" run --queues "$LOAD_QUEUES" --workers "$WORKERS" \
    --batch "$BATCH" --seconds "$DURATION" --warmup "$WARMUP" >"$log" 2>"$OUT/phase-$n-$arm.log" || rc=$?
  cpu_end; w1=$(proc_cpu "$wpid")
  cpu_other; elapsed=$cpu_elapsed; other=$cpu_other_pct
  jps=$(json "$log" jobs_per_s 2>/dev/null || true)
  if (( rc != 0 )) || [[ -z $jps ]]; then
    broken+=("phase $n (worker $arm): load failed: $(head -c 300 "$log" 2>/dev/null) $(head -c 300 "$OUT/phase-$n-$arm.log" 2>/dev/null)")
    jps=0
  fi
  ticks1=$(q "$DB" "SELECT ticks FROM meshhook_limits.worker_state")
  errs1=$(q "$DB" "SELECT errors FROM meshhook_limits.worker_state")
  last_ms=$(q "$DB" "SELECT coalesce(last_tick_ms::text, '') FROM meshhook_limits.worker_state")
  jobs=$(q "$DB" "SELECT count(*) FROM pgboss.job")
  dticks=$((ticks1 - ticks0))
  wcpu=$(awk -v a="$w1" -v b="$w0" -v t="$elapsed" 'BEGIN { printf "%.1f", 100 * (a - b) / t }')
  if [[ $arm == on ]]; then
    # At one tick a second, a phase should see about one tick per second.
    (( dticks >= (DURATION + WARMUP) / 2 )) || broken+=("phase $n: the worker ticked only $dticks times")
    (( errs1 == errs0 )) || broken+=("phase $n: $((errs1 - errs0)) tick(s) failed: $(q "$DB" "SELECT last_error FROM meshhook_limits.worker_state")")
  else
    (( dticks == 0 )) || broken+=("phase $n: $dticks tick(s) with the worker off")
    last_ms=""; wcpu=""
  fi
  echo "jobs/s=$jps  (ticks+$dticks, worker CPU ${wcpu:-–}% of one core, last tick ${last_ms:-–} ms, $jobs job rows, other CPU $other)" >&2
  rows+=("$n|$arm|$jps|$dticks|$wcpu|$last_ms|$jobs|$other")
  JPS[n]=$jps; ARM[n]=$arm
  SUM[$arm]=$(awk -v a="${SUM[$arm]}" -v b="$jps" 'BEGIN { print a + b }')
  CNT[$arm]=$((CNT[$arm] + 1))
done

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
load_rows=$(q "$DB" "SELECT count(*) FROM pgboss.job")
load_plan=$(explain_sampler "$DB" "$OUT/sampler-plan-load.txt")

mean_off=$(awk -v s="${SUM[off]}" -v c="${CNT[off]}" 'BEGIN { printf "%.1f", s / c }')
mean_on=$(awk -v s="${SUM[on]}" -v c="${CNT[on]}" 'BEGIN { printf "%.1f", s / c }')
loss=$(awk -v a="$mean_off" -v b="$mean_on" 'BEGIN { if (a > 0) printf "%.2f", 100 * (a - b) / a; else print "n/a" }')
# Drift-controlled: each "on" phase against the mean of the "off" phases
# next to it (before and, when there is one, after).
paired=()
for ((i = 1; i <= n; i++)); do
  [[ ${ARM[i]} == on ]] || continue
  ref=${JPS[i - 1]}; cnt=1
  if (( i + 1 <= n )) && [[ ${ARM[i + 1]} == off ]]; then
    ref=$(awk -v a="$ref" -v b="${JPS[i + 1]}" 'BEGIN { print a + b }'); cnt=2
  fi
  paired+=("$(awk -v r="$ref" -v c="$cnt" -v x="${JPS[i]}" 'BEGIN { m = r / c; printf "%.2f", 100 * (m - x) / m }')")
done
paired_median=$(printf '%s\n' "${paired[@]}" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f", (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
# Spread of the "off" phases: how much two identical phases differ here.
off_spread=$(for ((i = 1; i <= n; i++)); do if [[ ${ARM[i]} == off ]]; then echo "${JPS[i]}"; fi; done |
  awk -v m="$mean_off" '{ d = ($1 - m) / m * 100; if (d < 0) d = -d; if (d > x) x = d } END { printf "%.1f", x }')

# --- (b) sample time with many queues and jobs --------------------------------
echo "sample time: $SAMPLE_QUEUES queues, $SAMPLE_JOBS jobs" >&2
set_worker off
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
time_stmt() { # name sql -> "median min max", or "n/a n/a n/a" on error
  local f="$OUT/time-$1.log"
  { echo '\timing on'; for ((i = 0; i <= REPS; i++)); do echo "$2;"; done; } |
    "$PSQL" -X -qAt -v ON_ERROR_STOP=1 -d "$SAMPLE_DB" >"$f" 2>&1 || { echo "n/a n/a n/a"; return; }
  grep -o '^Time: [0-9.]*' "$f" | awk '{ print $2 }' | tail -n "$REPS" | sort -g |
    awk '{ a[NR] = $1 } END { m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2; printf "%.1f %.1f %.1f", m, a[1], a[NR] }'
}
timed() { # name: record a failed timing
  [[ $2 != n/a ]] || broken+=("timing $1 failed: $(grep -m1 -i error "$OUT/time-$1.log")")
}
win="current_setting('meshhook_limits.queue_window')::interval"
read -r tick_med tick_min tick_max <<<"$(time_stmt tick "SELECT meshhook_limits.tick()")"
timed tick "$tick_med"
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
  report_machine "" "Node $(node --version)" ", $(basename "${ext_sql:-?}") sha256 $ext_sql_sha…" " (worker on)" "$settings_on"
  echo
  echo "### (a) Throughput, worker off vs on"
  echo
  echo "$WORKERS concurrent loops of pg-boss \`insert\` $BATCH jobs → \`fetch\` batchSize $BATCH → \`complete\`,"
  echo "over $LOAD_QUEUES queues; ${DURATION} s measured after ${WARMUP} s warm-up per phase; job table truncated and"
  echo "cluster restarted before each phase."
  echo
  echo "| phase | worker | jobs/s | ticks | worker CPU (% of one core) | last tick ms | job rows at end | other CPU |"
  echo "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
  local r
  for r in "${rows[@]}"; do
    IFS='|' read -r pn arm jps dticks wcpu last jobs other <<<"$r"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$pn" "$arm" "$(awk -v x="$jps" 'BEGIN { printf "%.0f", x }')" \
      "$dticks" "${wcpu:-–}" "${last:-–}" "$jobs" "$other"
  done
  echo
  echo "- mean jobs/s: off $mean_off, on $mean_on → loss $loss% (paired with neighbouring off phases: ${paired[*]/%/%}; median $paired_median%)"
  local wmean
  wmean=$(for r in "${rows[@]}"; do IFS='|' read -r _ arm _ _ wcpu _ _ _ <<<"$r"; if [[ $arm == on ]]; then echo "$wcpu"; fi; done |
    awk -v n="$NCPU" '{ s += $1; c++ } END { if (c) printf "%.1f%% of one core, %.1f%% of the machine'"'"'s %d CPUs", s / c, s / c / n, n }')
  echo "- CPU of the worker process while on (mean over the on phases): $wmean"
  echo "- largest deviation of an off phase from the off mean: ±$off_spread% (the noise floor of this comparison)"
  echo "- $(verdict "$loss" '<' 1): throughput loss with the worker sampling every second: $loss% (target < 1%)"
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
  echo "| \`SELECT meshhook_limits.tick()\` | $tick_med | $tick_min | $tick_max |"
  echo "| \`_sample_pgboss(now, queue_window)\` alone | $samp_med | $samp_min | $samp_max |"
  [[ -n $alerts ]] && echo "| \`_evaluate_alerts(now)\` alone | $al_med | $al_min | $al_max |"
  echo "| \`SELECT count(*) FROM pgboss.job\` (one full scan, for scale) | $scan_ms | | |"
  echo
  echo "$REPS timed runs each after one untimed run, each its own transaction, worker off."
  echo
  echo "Plan of the sampler's statement (auto_explain, ANALYZE, BUFFERS; costs removed):"
  echo
  echo '```'
  echo "$plan"
  echo '```'
  echo
  report_checks "- OK: every load phase ran without error; the worker ticked about once a" \
    "  second with no failed tick when on and not at all when off; tick() and the" \
    "  sampler ran cleanly and sampled all $SAMPLE_QUEUES queues."
}

publish "raw output"
