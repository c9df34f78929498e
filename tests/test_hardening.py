"""Attacks on 0.1.0, performed as the attacker would, with real roles, real
claims and real catalog objects. Each test fails on 0.1.0 and passes now.

Routes to superuser are checked the direct way: the attacker's payload runs
`ALTER ROLE <attacker> SUPERUSER`, which only succeeds when it runs as a
superuser; afterwards the attacker must still not be one."""
import json
from contextlib import contextmanager
from pathlib import Path
import time
import uuid

import psycopg
import pytest

from conftest import PG_MAJOR, acquire, rpc, set_limit, sqlstate


def is_superuser(conn, role):
    return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


@pytest.fixture
def attacker(cluster):
    """A fresh login role (no superuser), dropped afterwards."""
    name = "mallory_" + uuid.uuid4().hex[:8]
    with cluster.connect() as c:
        c.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER")
        c.execute(f"GRANT CREATE ON DATABASE {cluster.dbname} TO {name}")
        c.execute(f"GRANT CREATE ON SCHEMA public TO {name}")
    yield name
    with cluster.connect() as c:
        c.execute(f"REVOKE CREATE ON DATABASE {cluster.dbname} FROM {name}")
        c.execute(f"DROP OWNED BY {name} CASCADE")
        c.execute(f"DROP ROLE {name}")


@contextmanager
def scratch_db(cluster, prefix, options=""):
    """A database of its own for a test that changes database-wide things
    (queue schemas, Realtime, alert rules), dropped afterwards."""
    db = prefix + "_" + uuid.uuid4().hex[:8]
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db} {options}")
    try:
        yield db
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE {db} WITH (FORCE)")


def escalation_payload(role):
    return f"""BEGIN
      BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
      RETURN NULL; END"""


# --- Critical: privilege escalation -------------------------------------------------------

def test_track_storage_does_not_run_a_cast_of_the_tracked_table(cluster, admin, attacker, tenant):
    """An admin-role member who is not superuser plants a cast from its
    table's row type to text; counting the table must not run it."""
    admin.execute(f"GRANT meshhook_limits_admin TO {attacker}")
    tbl = "docs_" + uuid.uuid4().hex[:8]
    with cluster.connect(user=attacker) as m:
        m.execute(f"CREATE TABLE {tbl} (tenant uuid, body text)")
        m.execute(f"INSERT INTO {tbl} VALUES (%s, 'hello')", (tenant,))
        m.execute(f"CREATE FUNCTION {tbl}_to_text({tbl}) RETURNS text LANGUAGE plpgsql AS $$ "
                  + escalation_payload(attacker).replace("RETURN NULL", "RETURN 'x'") + " $$")
        m.execute(f"CREATE CAST ({tbl} AS text) WITH FUNCTION {tbl}_to_text({tbl})")
        m.execute("SELECT meshhook_limits.track_storage(%s, 'tenant')", (tbl,))
        m.execute(f"INSERT INTO {tbl} VALUES (%s, 'again')", (tenant,))
        m.execute(f"UPDATE {tbl} SET body = 'changed'")
        m.execute(f"ALTER TABLE {tbl} ADD COLUMN extra text DEFAULT 'x'")  # a recount
        m.execute(f"DELETE FROM {tbl}")
    assert not is_superuser(admin, attacker)
    total = admin.execute("SELECT bytes FROM meshhook_limits.storage_totals WHERE tenant_id = %s",
                          (tenant,)).fetchone()[0]
    assert total == 0


def table_turned_view(conn, name, columns, select):
    """What the owner of a queue table can make of it: a view over its own
    code. Up to PostgreSQL 15 an ON SELECT rule turns the table itself into
    one; 16 refuses such rules, so there the owner drops and creates."""
    if PG_MAJOR <= 15:
        conn.execute(f"CREATE TABLE {name} ({columns})")
        conn.execute(f'CREATE RULE "_RETURN" AS ON SELECT TO {name} DO INSTEAD {select}')
    else:
        conn.execute(f"CREATE VIEW {name} AS {select}")


@pytest.mark.smoke
def test_tick_does_not_run_a_queue_table_owners_code(cluster, attacker):
    """The owner of pgmq's tables turns a queue table and pgmq.meta into
    views over its own function; tick() (the worker's round, as superuser)
    must not run that function as superuser."""
    with scratch_db(cluster, "q", f"OWNER {attacker}") as db:
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE EXTENSION meshhook_limits")
        with cluster.connect(dbname=db, user=attacker) as m:
            m.execute("CREATE SCHEMA pgmq")
            m.execute("CREATE FUNCTION pgmq.evil() RETURNS SETOF text LANGUAGE plpgsql AS $$ "
                      + escalation_payload(attacker).replace("RETURN NULL", "RETURN NEXT 'q'") + " $$")
            table_turned_view(m, "pgmq.meta", "queue_name text", "SELECT pgmq.evil() AS queue_name")
            m.execute("CREATE SCHEMA pgboss")
            m.execute("CREATE TYPE pgboss.job_state AS ENUM ('created', 'retry', 'active', 'completed', 'cancelled', 'failed')")
            m.execute("CREATE TABLE pgboss.job (name text, state pgboss.job_state, created_on timestamptz, "
                      "started_on timestamptz, completed_on timestamptz)")
            m.execute("CREATE FUNCTION pgboss.evil() RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ "
                      + escalation_payload(attacker).replace("RETURN NULL", "RETURN true") + " $$")
            # The planner evaluates an index predicate's immutable functions.
            m.execute("CREATE INDEX ON pgboss.job (name) WHERE pgboss.evil()")
            table_turned_view(m, "pgboss.queue", "name text", "SELECT 'q'::text AS name WHERE pgboss.evil()")
        with cluster.connect(dbname=db) as c:
            c.execute("SET meshhook_limits.queue_scan_budget = 1")
            c.execute("SELECT meshhook_limits.tick()")
            c.execute("SELECT meshhook_limits.tick()")
            assert not is_superuser(c, attacker)


def test_an_impostor_realtime_send_is_never_called(cluster, attacker):
    """On a server without Supabase Realtime, a role with CREATE on the
    database creates realtime.send; events must not call it."""
    t = str(uuid.uuid4())
    with scratch_db(cluster, "rt") as db:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"GRANT CREATE ON DATABASE {db} TO {attacker}")
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE EXTENSION meshhook_limits")
        with cluster.connect(dbname=db, user=attacker) as m:
            m.execute("CREATE SCHEMA realtime")
            m.execute("CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean) "
                      "RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
                      f"EXECUTE 'ALTER ROLE {attacker} SUPERUSER'; END $$")
        with cluster.connect(dbname=db) as c:
            c.execute("SELECT meshhook_limits.set_limit('executions_per_day', 10, window_length => '1 day')")
            c.execute("SELECT meshhook_limits.record_usage(%s, 'executions_per_day', 9)", (t,))
            assert not is_superuser(c, attacker)
            # The event is still kept (and NOTIFYed).
            ev = c.execute("SELECT event FROM meshhook_limits.events WHERE tenant_id = %s", (t,)).fetchall()
            assert ev == [("limit.warning",)]


# --- High: one tenant denies service to others ---------------------------------------------

def test_project_counters_are_per_tenant(cluster, admin):
    """Tenant A acquiring with tenant B's project id must not fill B's project."""
    a, b, project = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    set_limit(admin, "concurrent_executions", 2, b, project)
    with cluster.connect() as c:
        for _ in range(3):
            r = rpc(c, {"app_metadata": {"tenant_id": a}},
                    "SELECT granted FROM meshhook_limits.acquire_execution_slot(%s, %s, lease => '1 minute')",
                    (a, project))
            assert r[0][0] is True
        r = rpc(c, {"app_metadata": {"tenant_id": b}},
                "SELECT granted, reason FROM meshhook_limits.acquire_execution_slot(%s, %s, lease => '1 minute')",
                (b, project))
        assert r[0] == (True, "granted")


def reload_until(cluster, setting: str, value: str) -> None:
    """pg_reload_conf(), then wait until new sessions start with `value`
    (the postmaster reloads when it gets to it: a busy machine takes longer)."""
    cluster.sql("SELECT pg_reload_conf()")
    deadline = time.monotonic() + 30
    while cluster.sql(f"SHOW {setting}") != [(value,)]:
        assert time.monotonic() < deadline, f"{setting} not {value} in new sessions 30 s after the reload"
        time.sleep(0.05)


def test_a_tenant_without_a_limit_cannot_take_the_whole_slot_table(cluster, admin, tenant):
    default = admin.execute("SHOW meshhook_limits.tenant_slot_ceiling").fetchone()[0]
    admin.execute("ALTER SYSTEM SET meshhook_limits.tenant_slot_ceiling = 5")
    reload_until(cluster, "meshhook_limits.tenant_slot_ceiling", "5")
    try:
        with cluster.connect() as c:
            got = [acquire(c, tenant, lease="1 minute") for _ in range(7)]
        assert [g[0] for g in got] == [True] * 5 + [False] * 2
        assert got[5][2] == "tenant_limit" and got[5][4] == 5
        with cluster.connect() as c:
            assert acquire(c, str(uuid.uuid4()))[0] is True
    finally:
        admin.execute("ALTER SYSTEM RESET meshhook_limits.tenant_slot_ceiling")
        reload_until(cluster, "meshhook_limits.tenant_slot_ceiling", default)


def test_lease_is_bounded_by_max_lease(cluster, admin, tenant):
    with pytest.raises(psycopg.Error) as e:
        acquire(admin, tenant, lease="2 days")
    assert sqlstate(e) == "22023" and "max_lease" in str(e.value)


def test_slots_and_counts_are_per_database(cluster, admin, tenant):
    with scratch_db(cluster, "db2") as db:
        set_limit(admin, "concurrent_executions", 1, tenant)
        with cluster.connect(dbname=db) as c2:
            c2.execute("CREATE EXTENSION meshhook_limits")
            set_limit(c2, "concurrent_executions", 1, tenant)
            assert acquire(c2, tenant)[0] is True
            assert c2.execute("SELECT count(*) FROM meshhook_limits.slots() WHERE tenant_id = %s",
                              (tenant,)).fetchone()[0] == 1
        # The other database's slot neither counts nor shows here.
        assert admin.execute("SELECT meshhook_limits.live_slots(%s)", (tenant,)).fetchone()[0] == 0
        assert admin.execute("SELECT count(*) FROM meshhook_limits.slots() WHERE tenant_id = %s",
                             (tenant,)).fetchone()[0] == 0
        assert acquire(admin, tenant)[0] is True


# --- Medium / low ---------------------------------------------------------------------------

def test_errors_do_not_name_the_other_tenant(cluster, admin):
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    slot = acquire(admin, b)[1]
    with cluster.connect() as c:
        with pytest.raises(psycopg.Error) as e:
            rpc(c, {"app_metadata": {"tenant_id": a}},
                "SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (slot,))
        assert sqlstate(e) == "42501"
        assert b not in str(e.value) and b not in (e.value.diag.message_detail or "")


def test_slot_ids_share_no_state_between_calls(admin, tenant):
    ids = [uuid.UUID(str(acquire(admin, tenant, lease="1 minute")[1])) for _ in range(20)]
    heads = {i.bytes[:8] for i in ids}
    assert len(heads) == 20
    # Version 4 shape is kept.
    assert all(i.version == 4 for i in ids)


def test_prepare_transaction_with_slot_changes_is_refused(cluster, tenant):
    with cluster.connect(autocommit=False) as c:
        acquire(c, tenant)
        with pytest.raises(psycopg.Error) as e:
            c.execute("PREPARE TRANSACTION 'mh_test'")
        assert sqlstate(e) == "0A000"
        c.rollback()
    with cluster.connect() as c:
        assert c.execute("SELECT meshhook_limits.live_slots(%s)", (tenant,)).fetchone()[0] == 0


def test_effective_alert_rules_follow_row_level_security(cluster, admin):
    name = "secret_rule_" + uuid.uuid4().hex[:6]
    admin.execute("SELECT meshhook_limits.set_alert_rule(%s, 'pool.utilisation', 0.99)", (name,))
    try:
        with cluster.connect() as c:
            seen = rpc(c, {"app_metadata": {"tenant_id": str(uuid.uuid4())}},
                       "SELECT count(*) FROM meshhook_limits.effective_alert_rules WHERE name = %s", (name,))
            assert seen == [(0,)]
            seen = rpc(c, None, "SELECT count(*) FROM meshhook_limits.effective_alert_rules", role="anon")
            assert seen == [(0,)]
    finally:
        admin.execute("DELETE FROM meshhook_limits.alert_rules WHERE name = %s", (name,))


@pytest.mark.parametrize("call", [
    "SELECT meshhook_limits.set_limit('executions_per_day', 1e400, window_length => '1 day')",
    "SELECT meshhook_limits.set_limit('requests_per_second', 1e-300)",
    "SELECT meshhook_limits.set_limit('requests_per_second', 10, burst => 1e400)",
    "SELECT * FROM meshhook_limits.record_usage('{t}', 'memory_bytes', 1e400)",
    "SELECT * FROM meshhook_limits.record_usage('{t}', 'executions_per_day', 1e19)",
])
def test_absurd_numbers_are_refused_at_the_door(cluster, admin, tenant, call):
    admin.execute("SELECT meshhook_limits.set_limit('executions_per_day', 100, window_length => '1 day')")
    with pytest.raises(psycopg.Error) as e:
        admin.execute(call.replace("{t}", tenant))
    assert sqlstate(e) == "22023", e.value
    assert "backtrace" not in (e.value.diag.message_detail or "").lower()
    # Every reader still works.
    assert "meshhook_limits_" in admin.execute("SELECT meshhook_limits.metrics()").fetchone()[0]
    admin.execute("SELECT meshhook_limits.tick()")


def test_restart_grace_does_not_follow_the_callers_default_lease(cluster, admin, tenant):
    admin.execute("ALTER SYSTEM SET meshhook_limits.restart_grace = -1")
    admin.execute("ALTER SYSTEM SET meshhook_limits.default_lease = 3")
    # A slot held at shutdown: without one, a clean restart has no grace.
    assert acquire(admin, str(uuid.uuid4()), lease="1 minute")[0]
    admin.close()
    cluster.restart()
    try:
        with cluster.connect() as c:
            c.execute("SET meshhook_limits.default_lease = 1")
            time.sleep(1.3)
            r = acquire(c, tenant)
            assert r[0] is False and r[2] == "recovering", r
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET meshhook_limits.restart_grace")
            c.execute("ALTER SYSTEM RESET meshhook_limits.default_lease")
        cluster.restart()


def test_events_are_capped_per_tenant(admin, tenant):
    """A tenant flapping a gauge across its warn ratio gets at most 100
    events a minute; another tenant still gets its own."""
    admin.execute("SELECT meshhook_limits.set_limit('memory_bytes', 100, %s)", (tenant,))
    admin.execute("SELECT count(*) FROM generate_series(1, 150) g, "
                  "LATERAL meshhook_limits.record_usage(%s, 'memory_bytes', CASE WHEN g %% 2 = 0 THEN 90 ELSE 10 END) r",
                  (tenant,))
    n = admin.execute("SELECT count(*) FROM meshhook_limits.events WHERE tenant_id = %s", (tenant,)).fetchone()[0]
    assert n == 100
    other = str(uuid.uuid4())
    admin.execute("SELECT meshhook_limits.set_limit('memory_bytes', 100, %s)", (other,))
    admin.execute("SELECT meshhook_limits.record_usage(%s, 'memory_bytes', 95)", (other,))
    assert admin.execute("SELECT count(*) FROM meshhook_limits.events WHERE tenant_id = %s",
                         (other,)).fetchone()[0] == 1


def test_project_meters_are_capped_per_tenant(admin, tenant):
    meter = "calls_" + uuid.uuid4().hex[:6]
    admin.execute("SELECT meshhook_limits.set_limit(%s, 1e6, window_length => '1 day')", (meter,))
    admin.execute("SELECT count(*) FROM generate_series(1, 1000) g, "
                  "LATERAL meshhook_limits.record_usage(%s, %s, 1, md5(%s || g)::uuid) r", (tenant, meter, tenant))
    with pytest.raises(psycopg.Error) as e:
        admin.execute("SELECT * FROM meshhook_limits.record_usage(%s, %s, 1, gen_random_uuid())", (tenant, meter))
    assert sqlstate(e) == "53400"
    # The tenant total and known projects still meter.
    admin.execute("SELECT * FROM meshhook_limits.record_usage(%s, %s, 1)", (tenant, meter))
    rows = admin.execute("SELECT count(*) FROM meshhook_limits.usage_counters WHERE tenant_id = %s AND resource = %s",
                         (tenant, meter)).fetchone()[0]
    assert rows == 1001  # 1000 projects and the total


def test_stats_functions_are_for_monitors(cluster):
    with cluster.connect() as c:
        for fn in ("slot_stats", "rate_limit_stats"):
            with pytest.raises(psycopg.Error) as e:
                rpc(c, None, f"SELECT * FROM meshhook_limits.{fn}()", role="anon")
            assert sqlstate(e) == "42501"


def test_a_missing_queue_sample_is_not_a_recovery(cluster):
    """A queue table locked past tick()'s lock_timeout cannot be sampled; a
    firing alert on it must stay firing, not resolve and fire again."""
    with scratch_db(cluster, "ms") as db:
        with cluster.connect(dbname=db) as c, cluster.connect(dbname=db, autocommit=False) as locker:
            c.execute("CREATE EXTENSION meshhook_limits")
            c.execute("CREATE SCHEMA pgmq")
            c.execute("CREATE TABLE pgmq.meta (queue_name text)")
            c.execute("INSERT INTO pgmq.meta VALUES ('jobs')")
            c.execute("CREATE TABLE pgmq.q_jobs (msg_id bigint, vt timestamptz, enqueued_at timestamptz, message jsonb)")
            c.execute("INSERT INTO pgmq.q_jobs VALUES (1, now() - interval '1 s', now(), '{}')")
            c.execute("SELECT meshhook_limits.set_alert_rule('backlog', 'queue.queued', 0)")
            c.execute("SELECT meshhook_limits.tick()")
            assert c.execute("SELECT state FROM meshhook_limits.alert_states WHERE rule = 'backlog'").fetchall() \
                == [("firing",)]
            locker.execute("LOCK TABLE pgmq.q_jobs IN ACCESS EXCLUSIVE MODE")
            for _ in range(2):
                c.execute("SELECT meshhook_limits.tick()")
            locker.rollback()
            c.execute("SELECT meshhook_limits.tick()")
            events = [r[0] for r in c.execute("SELECT event FROM meshhook_limits.events ORDER BY id").fetchall()]
            assert events == ["alert.firing"], events


def test_non_utf8_text_in_a_sql_ascii_database_is_22023(cluster, tenant):
    with scratch_db(cluster, "ascii", "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0") as db:
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE EXTENSION meshhook_limits")
            for call in ("SELECT * FROM meshhook_limits.check_rate_limit(%s, E'k\\377')",
                         "SELECT * FROM meshhook_limits.acquire_execution_slot(%s, NULL, E'run\\377')",
                         "SELECT meshhook_limits.pause_rate_limit(%s, E'k\\377', now())",
                         "SELECT * FROM meshhook_limits._acquire_execution_slot(%s, NULL, E'run\\377', NULL)",
                         "SELECT * FROM meshhook_limits._check_rate_limit(%s, E'k\\377', 1)"):
                with pytest.raises(psycopg.Error) as e:
                    c.execute(call, (tenant,))
                assert sqlstate(e) == "22023", (call, e.value)
                assert "UTF-8" in str(e.value)
            assert acquire(c, tenant)[0] is True


def test_slot_revoked_is_announced_exactly_once_by_concurrent_reapers(cluster, admin, tenant):
    import threading
    # 4 tenants x 80 (events are capped at 100 per tenant and minute)
    tenants = [tenant] + [str(uuid.uuid4()) for _ in range(3)]
    ids = [str(acquire(admin, t, lease="1 second")[1]) for t in tenants for _ in range(80)]
    time.sleep(1.3)
    errors = []

    def reaper():
        try:
            with cluster.connect() as c:
                for _ in range(5):
                    c.execute("SELECT meshhook_limits.reap_execution_slots()")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=reaper) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    counts = dict(admin.execute(
        "SELECT payload->>'slot_id', count(*) FROM meshhook_limits.events "
        "WHERE tenant_id = ANY(%s::uuid[]) AND event = 'slot.revoked' GROUP BY 1", (tenants,)).fetchall())
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}


def test_realtime_policy_limits_a_tenant_to_its_own_topic(cluster):
    """With Supabase Realtime installed (as Supabase installs it: by a
    superuser), install_realtime_policy() lets a tenant read its own topic
    of realtime.messages and no other."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    with scratch_db(cluster, "rtp") as db:
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE EXTENSION meshhook_limits")
            c.execute("""
              CREATE SCHEMA realtime;
              CREATE TABLE realtime.messages (id bigserial, topic text, event text, payload jsonb, private boolean);
              ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;
              GRANT USAGE ON SCHEMA realtime TO authenticated;
              GRANT SELECT ON realtime.messages TO authenticated;
              CREATE FUNCTION realtime.topic() RETURNS text LANGUAGE sql STABLE
                AS $$ SELECT current_setting('realtime.topic', true) $$;
              GRANT EXECUTE ON FUNCTION realtime.topic() TO authenticated;
              CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean) RETURNS void
                LANGUAGE sql AS $$ INSERT INTO realtime.messages (topic, event, payload, private)
                                   VALUES (topic, event, payload, private) $$;""")
            assert c.execute("SELECT meshhook_limits.install_realtime_policy()").fetchone() == (True,)
            c.execute("SELECT meshhook_limits.set_limit('executions_per_day', 10, window_length => '1 day')")
            for t in (a, b):
                c.execute("SELECT meshhook_limits.record_usage(%s, 'executions_per_day', 9)", (t,))
            assert c.execute("SELECT count(*) FROM realtime.messages").fetchone() == (2,)
            # Realtime authorises a join of topic T by running the user's
            # SELECT on realtime.messages with realtime.topic() = T.
            for topic_of, allowed in ((a, True), (b, False)):
                with c.transaction():
                    c.execute("SET LOCAL ROLE authenticated")
                    c.execute("SELECT set_config('request.jwt.claims', %s, true)",
                              (json.dumps({"app_metadata": {"tenant_id": a}}),))
                    c.execute("SELECT set_config('realtime.topic', %s, true)", ("meshhook_limits:" + topic_of,))
                    n = c.execute("SELECT count(*) FROM realtime.messages").fetchone()[0]
                assert (n > 0) == allowed, topic_of


def test_a_notification_carries_the_id_of_its_events_row(cluster, admin, tenant):
    """Anyone may pg_notify on the channel; a real event names the events
    row that holds it, a forged one names none."""
    with cluster.connect() as listener:
        listener.execute("LISTEN meshhook_limits")
        admin.execute("SELECT pg_notify('meshhook_limits', %s)",
                      (json.dumps({"event": "limit.exceeded", "tenant_id": tenant, "event_id": 1}),))
        admin.execute("SELECT meshhook_limits.set_limit('memory_bytes', 100, %s)", (tenant,))
        admin.execute("SELECT meshhook_limits.record_usage(%s, 'memory_bytes', 95)", (tenant,))
        got = [json.loads(n.payload) for n in listener.notifies(timeout=2, stop_after=2)]
    assert len(got) == 2
    for p in got:
        row = admin.execute("SELECT payload FROM meshhook_limits.events WHERE id = %s AND tenant_id = %s",
                            (p["event_id"], tenant)).fetchone()
        real = row is not None and {k: v for k, v in p.items() if k != "event_id"} == row[0]
        assert real == (p["event"] == "limit.warning"), p


def test_an_admin_cannot_track_a_table_it_does_not_own(cluster, admin, attacker):
    """A non-superuser admin must not lock, trigger and read another role's
    table (say auth.users) through track_storage."""
    admin.execute(f"GRANT meshhook_limits_admin TO {attacker}")
    tbl = "users_" + uuid.uuid4().hex[:8]
    admin.execute(f"CREATE TABLE {tbl} (id uuid, email text)")
    try:
        with cluster.connect(user=attacker) as m:
            with pytest.raises(psycopg.Error) as e:
                m.execute("SELECT meshhook_limits.track_storage(%s, 'id')", (tbl,))
            assert sqlstate(e) == "42501"
        assert admin.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass", (tbl,)).fetchone() == (0,)
    finally:
        admin.execute(f"DROP TABLE {tbl}")


@pytest.mark.parametrize("call", [
    # NULL keeps a value (issue 22); a value below its warning is refused.
    "SELECT meshhook_limits.set_queue_thresholds('pgmq', 'q', crit_oldest_age => '-1 second')",
    "SELECT meshhook_limits.set_queue_thresholds('pgmq', 'q', crit_error_rate => -1)",
    "SELECT meshhook_limits.set_alert_rule(NULL, 'pool.waiting', 1)",
    "SELECT meshhook_limits.set_alert_rule('r_new_without_metric', threshold => 1)",
    "SELECT meshhook_limits.set_queue_thresholds('pgmq', 'q', warn_error_rate => 'NaN', crit_error_rate => 'NaN')",
    "SELECT meshhook_limits.set_alert_rule('r_nan', 'pool.waiting', 1, '<', resolve_threshold => 'NaN')",
    "SELECT meshhook_limits.set_alert_rule('r_big', 'pool.waiting', 1e400)",
])
def test_alert_and_queue_settings_refuse_null_and_nan(admin, call):
    with pytest.raises(psycopg.Error) as e:
        admin.execute(call)
    assert sqlstate(e) == "22023", e.value


def test_a_hot_standby_grants_no_slots_and_spends_no_rate(cluster, tenant, tmp_path):
    """A standby's shared memory is its own: slots and rate taken there would
    be counted apart from the primary's. Both are refused (25006)."""
    import socket
    import subprocess
    from conftest import PG_BIN
    base = Path(f"/tmp/meshhook_limits/standby-{uuid.uuid4().hex[:8]}")
    data = base / "data"
    base.mkdir(parents=True)
    subprocess.run(["chown", "postgres", str(base)], check=True)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    as_pg = ["runuser", "-u", "postgres", "--"]
    try:
        subprocess.run([*as_pg, f"{PG_BIN}/pg_basebackup", "-h", cluster.host, "-p", str(cluster.port),
                        "-U", "postgres", "-D", str(data), "-R", "-X", "stream"], check=True, capture_output=True)
        with open(data / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {port}\nunix_socket_directories = '{base}'\nmeshhook_limits.worker = off\n")
        subprocess.run([*as_pg, f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "start"],
                       check=True, capture_output=True)
        with psycopg.connect(f"host={base} port={port} user=postgres dbname={cluster.dbname}", autocommit=True) as c:
            assert c.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
            for call in ("SELECT * FROM meshhook_limits.acquire_execution_slot(%s)",
                         "SELECT * FROM meshhook_limits.check_rate_limit(%s)"):
                with pytest.raises(psycopg.Error) as e:
                    c.execute(call, (tenant,))
                assert sqlstate(e) == "25006", (call, e.value)
    finally:
        subprocess.run([*as_pg, f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        subprocess.run(["rm", "-rf", str(base)])


def test_limits_loaded_under_an_old_snapshot_are_not_cached(cluster, admin, tenant):
    """A REPEATABLE READ transaction that loads limits after they changed
    (with its older snapshot) must not leave them cached for later."""
    set_limit(admin, "concurrent_executions", 10, tenant)
    with cluster.connect(autocommit=False) as w:
        w.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        w.execute("SELECT 1")  # the snapshot is taken
        set_limit(admin, "concurrent_executions", 1, tenant)
        acquire(w, tenant, lease="1 minute")
        w.rollback()
        assert acquire(w, tenant, lease="1 minute")[0] is True
        assert acquire(w, tenant, lease="1 minute")[0] is False
        w.rollback()


def test_limits_of_a_rolled_back_change_are_not_cached(cluster, admin, tenant):
    set_limit(admin, "concurrent_executions", 1, tenant)
    with cluster.connect(autocommit=False) as w:
        set_limit(w, "concurrent_executions", 100, tenant)
        acquire(w, tenant, lease="1 minute")  # caches what it sees: 100
        w.rollback()
        assert acquire(w, tenant, lease="1 minute")[0] is True
        assert acquire(w, tenant, lease="1 minute")[0] is False
        w.rollback()


def test_one_failing_alert_rule_does_not_stop_the_others(cluster):
    with scratch_db(cluster, "ar") as db:
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE EXTENSION meshhook_limits")
            c.execute("""CREATE FUNCTION public.boom() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN IF NEW.rule = 'a_boom' THEN RAISE EXCEPTION 'injected'; END IF; RETURN NEW; END $$""")
            c.execute("CREATE TRIGGER boom BEFORE INSERT ON meshhook_limits.alert_states "
                      "FOR EACH ROW EXECUTE FUNCTION public.boom()")
            for name in ("a_boom", "b_fine"):
                c.execute("SELECT meshhook_limits.set_alert_rule(%s, 'pool.utilisation', -1)", (name,))
            errors0 = c.execute("SELECT errors FROM meshhook_limits.worker_state").fetchone()[0]
            c.execute("SELECT meshhook_limits.tick()")
            assert c.execute("SELECT rule, state FROM meshhook_limits.alert_states").fetchall() == [("b_fine", "firing")]
            errors, last = c.execute("SELECT errors, last_error FROM meshhook_limits.worker_state").fetchone()
            assert errors == errors0 + 1 and "a_boom" in last and "injected" in last


def test_renames_no_alter_table_trigger_sees_are_followed_and_drop_forgets(admin, tenant):
    """ALTER INDEX ... RENAME works on tables and ALTER SCHEMA ... RENAME moves
    them; a tracked table renamed so and then dropped must not leave its
    tenants charged for ever."""
    sch = "s_" + uuid.uuid4().hex[:8]
    admin.execute(f"CREATE SCHEMA {sch}")
    try:
        admin.execute(f"CREATE TABLE {sch}.docs (tenant uuid, body text)")
        admin.execute("SELECT meshhook_limits.track_storage(%s, 'tenant')", (f"{sch}.docs",))
        admin.execute(f"INSERT INTO {sch}.docs VALUES (%s, repeat('x', 100))", (tenant,))
        admin.execute(f"ALTER INDEX {sch}.docs RENAME TO docs2")
        admin.execute(f"ALTER SCHEMA {sch} RENAME TO {sch}_b")
        row = admin.execute("SELECT table_schema, table_name FROM meshhook_limits.tracked_tables "
                            "WHERE table_schema LIKE %s", (sch + "%",)).fetchall()
        assert row == [(f"{sch}_b", "docs2")]
        admin.execute(f"DROP TABLE {sch}_b.docs2")
        assert admin.execute("SELECT bytes FROM meshhook_limits.storage_totals WHERE tenant_id = %s",
                             (tenant,)).fetchone() == (0,)
        assert admin.execute("SELECT count(*) FROM meshhook_limits.storage_usage WHERE tenant_id = %s",
                             (tenant,)).fetchone() == (0,)
    finally:
        admin.execute(f"DROP SCHEMA IF EXISTS {sch} CASCADE")
        admin.execute(f"DROP SCHEMA IF EXISTS {sch}_b CASCADE")


def test_limits_of_a_change_rolled_back_to_a_savepoint_are_not_cached(cluster, tenant):
    """Found by the red team: a limit set and then rolled back to a savepoint
    (or a PL/pgSQL exception block) must not stay cached for the rest of the
    transaction, neither for acquire_execution_slot nor for claim_jobs'
    shares (the tenant's weight)."""
    with cluster.connect() as c, c.transaction():
        c.execute("SAVEPOINT s")
        c.execute("SELECT meshhook_limits.set_limit('concurrent_executions', 0, %s)", (tenant,))
        first = c.execute("SELECT granted FROM meshhook_limits.acquire_execution_slot(%s)", (tenant,)).fetchone()[0]
        c.execute("ROLLBACK TO SAVEPOINT s")
        again = c.execute("SELECT granted FROM meshhook_limits.acquire_execution_slot(%s)", (tenant,)).fetchone()[0]
        assert (first, again) == (False, True)
        c.execute("SAVEPOINT t")
        c.execute("SELECT meshhook_limits.set_limit('fair_share_weight', 5, %s)", (tenant,))
        shares = "SELECT weight FROM meshhook_limits._claim_shares(ARRAY[%s::uuid])"
        assert c.execute(shares, (tenant,)).fetchone()[0] == 5.0
        c.execute("ROLLBACK TO SAVEPOINT t")
        assert c.execute(shares, (tenant,)).fetchone()[0] == 1.0
