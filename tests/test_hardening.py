"""Attacks on 0.1.0, performed as the attacker would, with real roles, real
claims and real catalog objects. Each test fails on 0.1.0 and passes now.

Routes to superuser are checked the direct way: the attacker's payload runs
`ALTER ROLE <attacker> SUPERUSER`, which only succeeds when it runs as a
superuser; afterwards the attacker must still not be one."""
import json
import time
import uuid

import psycopg
import pytest

from conftest import acquire, rpc, set_limit, sqlstate


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


def test_tick_does_not_run_a_queue_table_owners_code(cluster, attacker):
    """The owner of pgmq's tables turns a queue table and pgmq.meta into
    views over its own function; tick() (the worker's round, as superuser)
    must not run that function as superuser."""
    db = "q_" + uuid.uuid4().hex[:8]
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db} OWNER {attacker}")
    try:
        with cluster.connect(dbname=db) as c:
            c.execute("CREATE EXTENSION meshhook_limits")
        with cluster.connect(dbname=db, user=attacker) as m:
            m.execute("CREATE SCHEMA pgmq")
            m.execute("CREATE FUNCTION pgmq.evil() RETURNS SETOF text LANGUAGE plpgsql AS $$ "
                      + escalation_payload(attacker).replace("RETURN NULL", "RETURN NEXT 'q'") + " $$")
            m.execute("CREATE TABLE pgmq.meta (queue_name text)")
            m.execute("CREATE RULE \"_RETURN\" AS ON SELECT TO pgmq.meta DO INSTEAD SELECT pgmq.evil() AS queue_name")
            m.execute("CREATE SCHEMA pgboss")
            m.execute("CREATE TYPE pgboss.job_state AS ENUM ('created', 'retry', 'active', 'completed', 'cancelled', 'failed')")
            m.execute("CREATE TABLE pgboss.job (name text, state pgboss.job_state, created_on timestamptz, "
                      "started_on timestamptz, completed_on timestamptz)")
            m.execute("CREATE TABLE pgboss.queue (name text)")
            m.execute("CREATE FUNCTION pgboss.evil() RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ "
                      + escalation_payload(attacker).replace("RETURN NULL", "RETURN true") + " $$")
            # The planner evaluates an index predicate's immutable functions.
            m.execute("CREATE INDEX ON pgboss.job (name) WHERE pgboss.evil()")
            m.execute("CREATE RULE \"_RETURN\" AS ON SELECT TO pgboss.queue DO INSTEAD "
                      "SELECT 'q'::text AS name WHERE pgboss.evil()")
        with cluster.connect(dbname=db) as c:
            c.execute("SET meshhook_limits.queue_scan_budget = 1")
            c.execute("SELECT meshhook_limits.tick()")
            c.execute("SELECT meshhook_limits.tick()")
            assert not is_superuser(c, attacker)
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE {db} WITH (FORCE)")


def test_an_impostor_realtime_send_is_never_called(cluster, attacker):
    """On a server without Supabase Realtime, a role with CREATE on the
    database creates realtime.send; events must not call it."""
    db = "rt_" + uuid.uuid4().hex[:8]
    t = str(uuid.uuid4())
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db}")
        c.execute(f"GRANT CREATE ON DATABASE {db} TO {attacker}")
    try:
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
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE {db} WITH (FORCE)")


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


def test_a_tenant_without_a_limit_cannot_take_the_whole_slot_table(cluster, admin, tenant):
    admin.execute("ALTER SYSTEM SET meshhook_limits.tenant_slot_ceiling = 5")
    admin.execute("SELECT pg_reload_conf()")
    time.sleep(0.3)
    try:
        with cluster.connect() as c:
            got = [acquire(c, tenant, lease="1 minute") for _ in range(7)]
        assert [g[0] for g in got] == [True] * 5 + [False] * 2
        assert got[5][2] == "tenant_limit" and got[5][4] == 5
        with cluster.connect() as c:
            assert acquire(c, str(uuid.uuid4()))[0] is True
    finally:
        admin.execute("ALTER SYSTEM RESET meshhook_limits.tenant_slot_ceiling")
        admin.execute("SELECT pg_reload_conf()")


def test_lease_is_bounded_by_max_lease(cluster, admin, tenant):
    with pytest.raises(psycopg.Error) as e:
        acquire(admin, tenant, lease="2 days")
    assert sqlstate(e) == "22023" and "max_lease" in str(e.value)


def test_slots_and_counts_are_per_database(cluster, admin, tenant):
    db = "db2_" + uuid.uuid4().hex[:8]
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db}")
    try:
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
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE {db} WITH (FORCE)")


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
