#!/usr/bin/env bash
# sqlsmith (random SQL) against meshhook_limits, with a bound pg-boss queue and
# a bound pgmq queue holding jobs, for MINUTES per role (default 10):
#   1. as a plain login role (`smith_user`: no superuser, not in
#      meshhook_limits_admin; USAGE on schema pgmq and INSERT on the pgmq queue
#      table, so it can write hostile messages into a bound queue);
#   2. as the superuser `postgres`.
# Around each run it snapshots the extension's configuration (limits, plans,
# bindings, live slots, tracked tables), the roles, the per-role/database
# settings and the meshhook_limits.* settings, and diffs them. After the plain
# role's run the superuser claims from both queues and explains them, so what
# the plain role wrote into the pgmq queue goes through the claim path.
#
#   [PG=18] [SEED=1] [KEEP=1] tests/fuzz/sqlsmith.sh [MINUTES]
# (the extension installed for $PG; SEED: sqlsmith's first seed, each restart
# of sqlsmith takes the next)
#
# sqlsmith only calls functions that return one value; every set-returning
# function of meshhook_limits gets a SECURITY INVOKER wrapper in schema
# smith_w that returns its rows as jsonb, so sqlsmith fuzzes those too, with
# the caller's rights. The server logs in JSON (jsonlog) under
# /tmp/meshhook_limits/sqlsmith-$PG/data/log; results in
# /tmp/meshhook_limits/sqlsmith-$PG/out (the logs take about 2 GB for two
# 10-minute runs). Ordinary errors are expected. Bad: a backend terminated by
# a signal, PANIC, a server restart, a lost sqlsmith connection, SQLSTATE
# XX000 raised in or through the extension, a Rust panic / backtrace / TRAP
# in the log, or any change made by the plain role to the extension's
# configuration, slots, roles or settings. PostgreSQL's own XX000s that
# sqlsmith reaches in core C code (CORE_SITES below) are listed apart. Prints
# a summary; exits 1 if anything bad was found. The server is stopped at the
# end (KEEP=1 leaves it running).
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES=${1:-10}
source scripts/pgenv.sh
export PATH="$PG_BIN:$PATH"
command -v sqlsmith >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sqlsmith >/dev/null; }
bash scripts/install-queue-systems.sh

name=sqlsmith-$PG_MAJOR
base=/tmp/meshhook_limits/$name
bash scripts/pg.sh destroy "$name" >/dev/null 2>&1 || true
eval "$(PG=$PG_MAJOR bash scripts/pg.sh start "$name" \
  "meshhook_limits.restart_grace = 0" "fsync = off" \
  "logging_collector = on" "log_destination = 'stderr,jsonlog'" "log_directory = 'log'" \
  "log_filename = 'postgresql.log'" "log_rotation_age = 0" "log_rotation_size = 0" \
  "log_min_messages = warning" "log_min_error_statement = error" "log_error_verbosity = verbose" \
  "log_line_prefix = '%m [%p] %u %e '" | tail -1)"
[[ ${KEEP:-0} == 1 ]] || trap 'bash scripts/pg.sh stop "$name" >/dev/null 2>&1 || true' EXIT
out=$base/out; mkdir -p "$out"; chmod 777 "$out"
jlog=$PGDATA/log/postgresql.json; slog=$PGDATA/log/postgresql.log
DB=smith
sql() { psql -X -q -v ON_ERROR_STOP=1 -d "$DB" "$@"; }
conn="host=$PGHOST port=$PGPORT user=postgres dbname=$DB"
boss() { node tests/node/pgboss_driver.mjs "$conn" "$@" >/dev/null; }
T1=a0000000-0000-4000-8000-000000000001
T2=b0000000-0000-4000-8000-000000000002
T3=c0000000-0000-4000-8000-000000000003

# ---------------------------------------------------------------- set-up
psql -X -q -d postgres -c "CREATE DATABASE $DB"
sql -c "CREATE EXTENSION meshhook_limits"
sql -f .cache/pgmq/pgmq.sql >/dev/null
boss start '{}'
boss create-queue '{"name":"smith_jobs"}'
for t in $T1 $T2 $T3; do
  boss send "{\"name\":\"smith_jobs\",\"count\":20,\"data\":{\"tenant_id\":\"$t\",\"api\":\"openai\",\"units\":1}}"
done
boss send '{"name":"smith_jobs","count":3,"data":{"tenant_id":"not-a-uuid"}}'
sql -v t1=$T1 -v t2=$T2 -v t3=$T3 > "$out/setup.txt" <<'SQL'
SELECT pgmq.create('smith_mq');
SELECT pgmq.send_batch('smith_mq', array_fill(jsonb_build_object('tenant_id', t), ARRAY[15]))
  FROM unnest(ARRAY[:'t1', :'t2', :'t3']) t;
SELECT meshhook_limits.bind_queue('pgboss', 'smith_jobs', tenant_path => 'tenant_id', key_path => 'api', cost_path => 'units');
SELECT meshhook_limits.bind_queue('pgmq', 'smith_mq', tenant_path => 'tenant_id');
SELECT meshhook_limits.set_limit('concurrent_executions', 5);
SELECT meshhook_limits.set_limit('concurrent_executions', 3, tenant_id => :'t2');
SELECT meshhook_limits.set_limit('concurrent_executions.openai', 2);
SELECT meshhook_limits.set_limit('concurrent_executions_total', 64);
SELECT meshhook_limits.set_limit('fair_share_weight', 4, tenant_id => :'t1');
SELECT meshhook_limits.set_limit('requests_per_second', 10, tenant_id => :'t1', burst => 20);
SELECT meshhook_limits.set_limit('executions_per_day', 100, window_length => '1 day');
SELECT meshhook_limits.create_plan('free', 'hobby');
SELECT meshhook_limits.set_plan_limit('free', 'concurrent_executions', 2);
SELECT meshhook_limits.assign_plan(:'t3', 'free');
CREATE TABLE public.docs (tenant uuid, body text);
SELECT meshhook_limits.track_storage('public.docs', 'tenant');
SELECT meshhook_limits.set_limit('storage_bytes', 100000, tenant_id => :'t1');
INSERT INTO public.docs SELECT :'t1', repeat('x', 100) FROM generate_series(1, 10);
-- live slots: claimed jobs from both queues and direct acquires, long leases
SELECT count(*) AS claimed_pgboss FROM meshhook_limits.claim_jobs('pgboss', 'smith_jobs', batch => 4, lease => '12 hours');
SELECT count(*) AS claimed_pgmq FROM meshhook_limits.claim_jobs('pgmq', 'smith_mq', batch => 4, lease => '12 hours');
SELECT granted FROM meshhook_limits.acquire_execution_slot(tenant_id => :'t2', run_id => 'smith-run', lease => '12 hours');
SELECT * FROM meshhook_limits.check_rate_limit(:'t1', 'webhooks', cost => 1);
SELECT * FROM meshhook_limits.record_usage(:'t1', 'executions_per_day', 1);

-- Wrappers for the set-returning functions (sqlsmith calls only functions
-- returning one value): same arguments, rows as jsonb, caller's rights.
CREATE SCHEMA smith_w;
GRANT USAGE ON SCHEMA smith_w TO PUBLIC;
DO $$
DECLARE f record; n int;
BEGIN
  FOR f IN SELECT p.oid, p.proname, p.pronargs FROM pg_proc p
            WHERE p.pronamespace = 'meshhook_limits'::regnamespace AND p.proretset AND p.prokind = 'f'
  LOOP
    EXECUTE format('CREATE FUNCTION smith_w.%I(%s) RETURNS jsonb LANGUAGE sql AS %L', f.proname,
      pg_get_function_identity_arguments(f.oid),
      format('SELECT jsonb_agg(to_jsonb(r)) FROM meshhook_limits.%I(%s) r', f.proname,
             (SELECT coalesce(string_agg('$' || i, ', '), '') FROM generate_series(1, f.pronargs) i)));
  END LOOP;
END $$;

CREATE ROLE smith_user LOGIN;
GRANT USAGE ON SCHEMA pgmq TO smith_user;
GRANT INSERT ON pgmq.q_smith_mq TO smith_user;
SQL
# sqlsmith stalls on slow queries; locks held by sessions that die with it too.
sql -c "ALTER DATABASE $DB SET statement_timeout = '2s'" -c "ALTER DATABASE $DB SET lock_timeout = '1s'" \
    -c "ALTER DATABASE $DB SET idle_in_transaction_session_timeout = '10s'"

# ---------------------------------------------------------------- helpers
# The state a plain role must not change, one line per row.
snapshot() {
  sql -At <<'SQL'
SELECT 'limits ' || to_jsonb(l)::text FROM meshhook_limits.limits l ORDER BY 1;
SELECT 'queue_bindings ' || to_jsonb(b)::text FROM meshhook_limits.queue_bindings b ORDER BY 1;
-- not lease_expires_at: the worker's tick renews the leases of claimed jobs that still run
SELECT 'slot ' || concat_ws(' ', slot_id, tenant_id, project_id, run_id, state) FROM meshhook_limits.slots() ORDER BY 1;
SELECT 'table ' || c.relname || ' ' || (xpath('/row/c/text()', query_to_xml(format('SELECT count(*) AS c FROM %s', c.oid::regclass), false, true, '')))[1]::text
  FROM pg_class c WHERE c.relnamespace = 'meshhook_limits'::regnamespace AND c.relkind IN ('r', 'p')
   AND c.relname NOT IN ('events', 'worker_state', 'alert_states', 'pool_samples', 'queue_samples') ORDER BY 1;
SELECT 'setting ' || name || '=' || setting || ' (' || source || ')' FROM pg_settings WHERE name LIKE 'meshhook_limits.%' ORDER BY 1;
SELECT 'role_setting ' || coalesce(r.rolname, '*') || ' ' || coalesce(d.datname, '*') || ' ' || s.setconfig::text
  FROM pg_db_role_setting s LEFT JOIN pg_roles r ON r.oid = s.setrole LEFT JOIN pg_database d ON d.oid = s.setdatabase ORDER BY 1;
SELECT 'role ' || concat_ws(' ', rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication) FROM pg_roles WHERE rolname !~ '^pg_' ORDER BY 1;
SELECT 'member ' || m.roleid::regrole || ' <- ' || m.member::regrole FROM pg_auth_members m ORDER BY 1;
SELECT 'acl ' || n.nspname || '.' || p.proname || ' ' || coalesce(p.proacl::text, 'default') FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'meshhook_limits' ORDER BY 1;
SQL
}
wait_ready() {  # until the server accepts connections again (after a crash)
  for _ in $(seq 1 600); do pg_isready -q -h "$PGHOST" -p "$PGPORT" && psql -X -Atqd "$DB" -c 'SELECT 1' >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "server not ready after 120 s" >&2; return 1
}

# One role for MINUTES: sqlsmith again with a new seed whenever it exits early
# (a lost connection ends it). Counts the queries from its progress reports.
run_smith() {
  local role=$1 rc deadline=$(( $(date +%s) + MINUTES * 60 )) seed=${SEED:-1} queries=0 runs=0 lost=0
  : > "$out/sqlsmith-$role.log"
  while (( $(date +%s) < deadline - 5 )); do
    wait_ready
    runs=$((runs + 1))
    echo "== run $runs seed $seed $(date -u +%T)" >> "$out/sqlsmith-$role.log"
    rc=0
    timeout -s INT $(( deadline - $(date +%s) )) sqlsmith --verbose --seed=$seed --max-queries=100000000 \
      --target="host=$PGHOST port=$PGPORT dbname=$DB user=$role application_name=sqlsmith" \
      >> "$out/sqlsmith-$role.log" 2>&1 || rc=$?
    printf '\n== exit %s\n' "$rc" >> "$out/sqlsmith-$role.log"
    seed=$((seed + 1))
  done
  # sqlsmith prints one character per query: . ok, e error, t timeout, S
  # syntax error, C lost connection (a crash, or the server going away)
  queries=$({ grep -E '^[.etSC]+$' "$out/sqlsmith-$role.log" || true; } | tr -d '\n' | wc -c)
  lost=$({ grep -E '^[.etSC]+$' "$out/sqlsmith-$role.log" || true; } | tr -cd 'C' | wc -c)
  echo "$queries $runs $lost"
}

# Reads the JSON log from byte offset $2 on; prints findings and the count.
analyse() {
  python3 - "$jlog" "$1" "$out/findings-$2.txt" "$slog" "$3" <<'PY'
import collections, json, re, sys
jlog, start, findings, slog, sstart = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
crash_re = re.compile(r"terminated by signal|PANIC|panicked|RUST_BACKTRACE|TRAP: |crash of another server process"
                      r"|reinitializing|stack backtrace|was terminated by exception")
CORE_SITES = {"coerce_type", "intervaltypmodout", "intervaltypmodleastfield", "AdjustIntervalForTypmod",
              "pg_get_shmem_allocations_numa", "multirange_intersect_agg_transfn", "range_intersect_agg_transfn",
              "parse_jsonb_index_flags", "SetNextObjectId", "acldefault_sql", "get_object_property_data",
              "getObjectTypeDescription", "getObjectDescription", "getObjectIdentityParts",
              "stats_fill_fcinfo_from_arg_pairs"}
calls_re = re.compile(r"\b(meshhook_limits|smith_w)\.\w+\s*\(")  # a call of one of the extension's functions
by_class, mh_state, bad, core_xx, stack = collections.Counter(), collections.Counter(), [], collections.Counter(), 0
with open(jlog, "rb") as f:
    f.seek(start)
    for line in f:
        try: r = json.loads(line)
        except ValueError: continue
        sev, st, msg = r.get("error_severity", ""), r.get("state_code") or "", r.get("message", "")
        ours = bool(calls_re.search(r.get("statement") or "") or calls_re.search(r.get("context") or "")
                    or (r.get("file_name") or "").endswith(".rs") or "meshhook" in (r.get("context") or ""))
        if sev in ("ERROR", "FATAL", "PANIC"):
            by_class[st[:2]] += 1
            if ours: mh_state[st] += 1
        if st == "54001": stack += 1
        if sev == "PANIC" or crash_re.search(msg) or crash_re.search(r.get("detail") or ""):
            bad.append(r)
        elif st == "XX000":
            # PostgreSQL's own elog()s that sqlsmith reaches, raised in core C
            # code outside any meshhook_limits function, count apart; e.g.
            #   SELECT nullif(null::unknown, coalesce(null::unknown, null::unknown)::unknown);
            #   SELECT pg_catalog.intervaltypmodout(52);
            inside = (r.get("file_name") or "").endswith(".rs") or "meshhook" in (r.get("context") or "")
            if inside or (ours and r.get("func_name") not in CORE_SITES): bad.append(r)
            else: core_xx[f"{msg} ({r.get('file_name')}:{r.get('func_name')})"] += 1
raw = []
with open(slog, "rb") as f:  # raw stderr (a Rust panic printed outside elog)
    f.seek(sstart)
    for line in f:
        s = line.decode("utf-8", "replace")
        if re.search(r"panicked at|RUST_BACKTRACE|stack backtrace|TRAP: |Assertion", s): raw.append(s.rstrip())
with open(findings, "w") as o:
    for r in bad:
        o.write(json.dumps({k: r.get(k) for k in ("timestamp", "user", "error_severity", "state_code", "message", "detail",
                "context", "statement", "file_name", "file_line_num", "func_name", "backend_type")}) + "\n")
    for s in raw: o.write("stderr: " + s + "\n")
print(f"errors by SQLSTATE class: {dict(sorted(by_class.items()))}")
print(f"errors of statements calling meshhook_limits functions (or raised by them), by SQLSTATE: {dict(sorted(mh_state.items()))}")
print(f"stack depth (54001): {stack}; XX000 of the extension: {sum(r.get('state_code') == 'XX000' for r in bad)}; "
      f"crash/PANIC/restart/Rust panic lines: {sum(r.get('state_code') != 'XX000' for r in bad) + len(raw)}")
print(f"XX000 of PostgreSQL itself (not involving the extension): {sum(core_xx.values())}")
for k, n in core_xx.most_common(): print(f"  {n:5d}  {k}")
groups = collections.defaultdict(list)
for r in bad:
    groups[(r.get("state_code"), r.get("message"), f"{r.get('file_name')}:{r.get('file_line_num')}")].append(r)
for (st, msg, where), rs in sorted(groups.items(), key=lambda g: -len(g[1])):
    shortest = min((r.get("statement") or "" for r in rs), key=len)
    print(f"  FINDING x{len(rs)}: {st} {msg} at {where}; context: {(rs[0].get('context') or '-')[:120]}")
    print("    shortest statement: " + " ".join(shortest.split())[:400])
for s in raw[:10]: print("  STDERR: " + s[:300])
print(f"BAD {len(bad) + len(raw)}")
PY
}

# ---------------------------------------------------------------- runs
status=0
for role in smith_user postgres; do
  snapshot > "$out/before-$role.txt"
  started=$(sql -Atc "SELECT pg_postmaster_start_time()")
  joff=$(stat -c %s "$jlog"); soff=$(stat -c %s "$slog")
  echo "== sqlsmith as $role for $MINUTES min (from $(date -u +%T))"
  read -r queries runs lost < <(run_smith "$role")
  wait_ready
  snapshot > "$out/after-$role.txt"
  if [[ $role == smith_user ]]; then  # after the snapshot: what the plain role wrote goes through the claim path
    sql -At > "$out/probe.txt" 2>&1 <<'SQL' || true
\set ON_ERROR_STOP 0
SELECT count(*) FROM meshhook_limits.claim_jobs('pgmq', 'smith_mq', batch => 100, lease => '12 hours');
SELECT count(*) FROM meshhook_limits.claim_jobs('pgboss', 'smith_jobs', batch => 100, lease => '12 hours');
SELECT count(*) FROM meshhook_limits.explain_queues();
SELECT count(*) FROM meshhook_limits.queue_health();
SELECT length(meshhook_limits.metrics());
SQL
  fi
  restarted=$(sql -Atc "SELECT pg_postmaster_start_time() <> '$started'")
  diff "$out/before-$role.txt" "$out/after-$role.txt" > "$out/diff-$role.txt" || true
  report=$(analyse "$joff" "$role" "$soff")
  bad=$(sed -n 's/^BAD //p' <<<"$report")
  changes=$(grep -c '^[<>]' "$out/diff-$role.txt" || true)
  echo "queries: $queries in $runs sqlsmith run(s); connections lost: $lost; server restarted: $restarted"
  grep -v '^BAD' <<<"$report"
  echo "state changes: $changes (diff in $out/diff-$role.txt)"
  [[ $bad == 0 ]] || { echo "findings: $bad (all of them in $out/findings-$role.txt)"; status=1; }
  [[ $restarted == f && $lost == 0 ]] || status=1
  # The superuser may change anything; the plain role nothing of this.
  if [[ $role == smith_user && $changes != 0 ]]; then
    echo "the plain role changed:"; grep '^[<>]' "$out/diff-$role.txt" | cut -c1-300 | sed -n 1,20p; status=1
  fi
done
exit $status
