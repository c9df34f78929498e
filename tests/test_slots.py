"""The guarantees of DESIGN.md, proven against a real server: never
over-admit, never leak, and what happens on restart and crash."""
import json
import random
import threading
import time
import uuid

import psycopg
import pytest

from conftest import PG_BIN, acquire, destroy_cluster, fresh_cluster, set_limit


@pytest.fixture(scope="module", params=["shared_memory", "table"])
def slot_server(request, cluster):
    """The slot tests run twice: on the shared-memory table (the library
    preloaded) and on the table fallback (not preloaded, no worker)."""
    if request.param == "shared_memory":
        yield cluster
        return
    c = fresh_cluster("tableslots", "shared_preload_libraries = ''", "fsync = off")
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
    c.slot_path = "table"
    yield c
    destroy_cluster(c)


@pytest.fixture
def on(slot_server):
    """A superuser connection to the slot server of this run."""
    with slot_server.connect() as c:
        yield c


def path(server) -> str:
    return getattr(server, "slot_path", "shared_memory")


def revoked_as(server, reason: str) -> str:
    """What a holder's heartbeat says of a revoked slot: why, from the
    shared-memory table (it keeps a tombstone); not_found from the table
    fallback, which deletes the row (the slot.revoked event says why)."""
    return reason if path(server) == "shared_memory" else "not_found"


def live(conn, tenant, project=None):
    q = "SELECT count(*) FROM meshhook_limits.slots() WHERE tenant_id = %s AND state = 'live'"
    args = [tenant]
    if project:
        q += " AND project_id = %s"
        args.append(project)
    return conn.execute(q, args).fetchone()[0]


def listen(cluster):
    c = cluster.connect()
    c.execute("LISTEN meshhook_limits")
    return c


def notifications(conn, timeout=30.0, want=1):
    """The first `want` notifications, or fewer if timeout passes first."""
    got = []
    for n in conn.notifies(timeout=timeout, stop_after=want):
        got.append(json.loads(n.payload))
    return got


@pytest.mark.smoke
def test_never_over_admit_under_32_concurrent_clients(slot_server, on, tenant):
    """32 connections hammer one tenant whose limit is 3 (and one project
    capped at 2), a quarter of them rolling back, while a checker samples."""
    limit, project_limit = 3, 2
    project = str(uuid.uuid4())
    set_limit(on, "concurrent_executions", limit, tenant)
    set_limit(on, "concurrent_executions", project_limit, tenant, project)

    stop = time.monotonic() + 6
    held = {"tenant": 0, "project": 0, "max_tenant": 0, "max_project": 0}
    lock = threading.Lock()
    stats = {"granted": 0, "refused": 0, "rolled_back": 0, "errors": []}
    samples = []

    def client(i):
        try:
            with slot_server.connect() as c:
                rnd = random.Random(i)
                while time.monotonic() < stop:
                    proj = project if rnd.random() < 0.5 else None
                    if rnd.random() < 0.25:
                        # Acquire inside a transaction that rolls back.
                        with c.transaction(force_rollback=True):
                            row = acquire(c, tenant, proj)
                        with lock:
                            stats["rolled_back"] += 1
                        continue
                    row = acquire(c, tenant, proj)
                    if not row[0]:
                        with lock:
                            stats["refused"] += 1
                        assert row[2] in ("tenant_limit", "project_limit")
                        assert row[7] is not None
                        continue
                    with lock:
                        stats["granted"] += 1
                        held["tenant"] += 1
                        held["max_tenant"] = max(held["max_tenant"], held["tenant"])
                        if proj:
                            held["project"] += 1
                            held["max_project"] = max(held["max_project"], held["project"])
                    time.sleep(rnd.random() * 0.003)
                    with lock:
                        held["tenant"] -= 1
                        if proj:
                            held["project"] -= 1
                    assert c.execute("SELECT meshhook_limits.release_execution_slot(%s)", (row[1],)).fetchone()[0]
        except Exception as e:  # noqa: BLE001 - reported below
            stats["errors"].append(repr(e))

    def checker():
        with slot_server.connect() as c:
            while time.monotonic() < stop:
                samples.append((live(c, tenant), live(c, tenant, project),
                                c.execute("SELECT meshhook_limits.live_slots(%s)", (tenant,)).fetchone()[0]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)] + [threading.Thread(target=checker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not stats["errors"], stats["errors"][:3]
    assert stats["granted"] > 50 and stats["refused"] > 50 and stats["rolled_back"] > 10, stats
    assert held["max_tenant"] <= limit and held["max_project"] <= project_limit, held
    assert len(samples) > 20
    assert max(s[0] for s in samples) <= limit
    assert max(s[1] for s in samples) <= project_limit
    assert max(s[2] for s in samples) <= limit
    # The limit was actually reached, so the test could have failed.
    assert max(s[0] for s in samples) == limit or held["max_tenant"] == limit
    assert live(on, tenant) == 0
    assert on.execute("SELECT meshhook_limits.live_slots(%s)", (tenant,)).fetchone()[0] == 0


@pytest.mark.smoke
def test_rolled_back_acquire_is_not_held(slot_server, on, tenant):
    set_limit(on, "concurrent_executions", 1, tenant)
    with slot_server.connect(autocommit=False) as c:
        assert acquire(c, tenant)[0]
        if path(slot_server) == "shared_memory":
            assert live(on, tenant) == 1  # counts while the transaction is open
        # (On the table, the uncommitted row is not visible to others; their
        # acquires wait on the tenant's row of fallback_tenants instead.)
        c.rollback()
    assert live(on, tenant) == 0
    assert acquire(on, tenant)[0]


def test_savepoint_rollback_frees_only_its_slots(slot_server, on, tenant):
    set_limit(on, "concurrent_executions", 5, tenant)
    with slot_server.connect(autocommit=False) as c:
        acquire(c, tenant)
        c.execute("SAVEPOINT a")
        acquire(c, tenant)
        c.execute("SAVEPOINT b")
        acquire(c, tenant)
        c.execute("ROLLBACK TO SAVEPOINT a")
        if path(slot_server) == "shared_memory":  # (the table's rows show at commit)
            assert live(on, tenant) == 1
        c.commit()
    assert live(on, tenant) == 1


def test_release_takes_effect_at_commit_and_not_on_rollback(slot_server, on, tenant):
    set_limit(on, "concurrent_executions", 1, tenant)
    slot = acquire(on, tenant)[1]
    with slot_server.connect(autocommit=False) as c:
        assert c.execute("SELECT meshhook_limits.release_execution_slot(%s)", (slot,)).fetchone()[0]
        # A second release in the same transaction is not a second release.
        assert not c.execute("SELECT meshhook_limits.release_execution_slot(%s)", (slot,)).fetchone()[0]
        assert live(on, tenant) == 1
        c.rollback()
    assert live(on, tenant) == 1
    assert on.execute("SELECT meshhook_limits.release_execution_slot(%s)", (slot,)).fetchone()[0]
    assert live(on, tenant) == 0
    assert not on.execute("SELECT meshhook_limits.release_execution_slot(%s)", (slot,)).fetchone()[0]


def test_backend_that_dies_mid_transaction_frees_its_slot(slot_server, on, tenant):
    set_limit(on, "concurrent_executions", 1, tenant)
    c = slot_server.connect(autocommit=False)
    acquire(c, tenant)
    pid = c.info.backend_pid
    on.execute("SELECT pg_terminate_backend(%s)", (pid,))
    deadline = time.monotonic() + 30
    while live(on, tenant) != 0:
        assert time.monotonic() < deadline, "the dead backend's slot still live after 30 s"
        time.sleep(0.05)
    c.close()


def test_lease_expiry_reclaims_and_holder_learns_it(slot_server, on, tenant):
    set_limit(on, "concurrent_executions", 1, tenant)
    listener = listen(slot_server)
    old = acquire(on, tenant, run_id="run-1", lease="1 second")
    assert old[0]
    refused = acquire(on, tenant)
    assert not refused[0] and refused[2] == "tenant_limit"
    # retry_after points at the end of the lease.
    assert refused[7].total_seconds() <= 1.0
    time.sleep(1.1)
    new = acquire(on, tenant)  # the abandoned slot is reclaimed on demand
    assert new[0]
    hb = on.execute("SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (old[1],)).fetchone()
    assert hb[0] is False and hb[1] == revoked_as(slot_server, "lease_expired")
    events = notifications(listener, want=1)
    assert events and events[0]["event"] == "slot.revoked"
    assert events[0]["tenant_id"] == tenant and events[0]["reason"] == "lease_expired"
    assert events[0]["slot_id"] == str(old[1])
    listener.close()


def test_heartbeat_keeps_a_slot_alive_past_its_first_lease(slot_server, on, tenant):
    # Beats 0.4 s apart keep a 3 s lease (a wide margin for a busy machine)
    # alive until well past its first term.
    past = time.monotonic() + 4
    slot = acquire(on, tenant, lease="3 seconds")[1]
    while time.monotonic() < past:
        time.sleep(0.4)
        hb = on.execute("SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (slot,)).fetchone()
        assert hb[0], hb
    on.execute("SELECT meshhook_limits.reap_execution_slots()")
    assert live(on, tenant) == 1


def test_deadline_revokes_and_notifies(slot_server, on, tenant):
    set_limit(on, "execution_seconds", 1, tenant)
    listener = listen(slot_server)
    row = acquire(on, tenant, lease="1 minute")
    assert row[0] and row[5] is not None  # deadline
    assert on.execute("SELECT alive FROM meshhook_limits.heartbeat_execution_slot(%s)", (row[1],)).fetchone()[0]
    time.sleep(1.1)
    assert on.execute("SELECT meshhook_limits.reap_execution_slots()").fetchone()[0] >= 1
    assert live(on, tenant) == 0
    events = [e for e in notifications(listener, want=1) if e["tenant_id"] == tenant]
    assert events and events[0]["event"] == "slot.revoked" and events[0]["reason"] == "deadline_exceeded"
    hb = on.execute("SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (row[1],)).fetchone()
    assert hb[0] is False and hb[1] == revoked_as(slot_server, "deadline_exceeded")
    listener.close()


def test_memory_over_limit_on_heartbeat_revokes(slot_server, on, tenant):
    set_limit(on, "memory_bytes", 1000, tenant)
    slot = acquire(on, tenant)[1]
    ok = on.execute("SELECT alive FROM meshhook_limits.heartbeat_execution_slot(%s, 900)", (slot,)).fetchone()
    assert ok[0]
    hb = on.execute("SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s, 2000)", (slot,)).fetchone()
    assert hb[0] is False and hb[1] == "memory_exceeded"
    assert live(on, tenant) == 0
    ev = on.execute("SELECT payload FROM meshhook_limits.events WHERE tenant_id = %s AND event = 'slot.revoked'",
                       (tenant,)).fetchone()[0]
    assert ev["reason"] == "memory_exceeded" and ev["resource"] == "memory_bytes" and ev["limit"] == 1000


@pytest.mark.smoke
def test_refusal_names_the_binding_limit(slot_server, on, tenant):
    project = str(uuid.uuid4())
    set_limit(on, "concurrent_executions", 5, tenant)
    set_limit(on, "concurrent_executions", 1, tenant, project)
    assert acquire(on, tenant, project)[0]
    r = acquire(on, tenant, project)
    assert (r[0], r[2], r[3], r[4]) == (False, "project_limit", 1, 1)
    assert acquire(on, tenant)[0]  # the tenant still has room


def config_snapshot(conn):
    return (
        conn.execute("SELECT resource, plan, tenant_id, project_id, limit_value, warn_ratio, window_length, burst "
                     "FROM meshhook_limits.limits ORDER BY 1, 2, 3, 4").fetchall(),
        conn.execute("SELECT plan, description FROM meshhook_limits.plans ORDER BY 1").fetchall(),
        conn.execute("SELECT tenant_id, plan FROM meshhook_limits.tenant_plans ORDER BY 1").fetchall(),
    )


def seed_config(admin, tenant):
    admin.execute("SELECT meshhook_limits.create_plan('durable', 'survives everything')")
    admin.execute("SELECT meshhook_limits.set_plan_limit('durable', 'executions_per_day', 500, 0.9, '1 day')")
    admin.execute("SELECT meshhook_limits.assign_plan(%s, 'durable')", (tenant,))
    set_limit(admin, "concurrent_executions", 4, tenant)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_limits_and_plans_survive_restart_and_crash(cluster, admin, tenant, mode):
    seed_config(admin, tenant)
    before = config_snapshot(admin)
    admin.close()
    cluster.restart(mode)
    with cluster.connect() as c:
        assert config_snapshot(c) == before
        eff = c.execute("SELECT resource, limit_value, source FROM meshhook_limits.effective_limits(%s) "
                        "ORDER BY 1", (tenant,)).fetchall()
        assert ("executions_per_day", 500, "plan") in [(r, int(v), s) for r, v, s in eff]


@pytest.mark.smoke
def test_crash_loses_slots_and_grace_prevents_over_admission(cluster, tenant):
    with cluster.connect() as c:
        c.execute("ALTER SYSTEM SET meshhook_limits.restart_grace = 2")
        c.execute("SELECT pg_reload_conf()")
        set_limit(c, "concurrent_executions", 1, tenant)
        # An earlier test may have restarted the server less than 2 s ago.
        c.execute("SELECT pg_sleep(greatest(0, extract(epoch FROM started_at + interval '2.1 s' - clock_timestamp()))) "
                  "FROM meshhook_limits.slot_stats()")
        old = acquire(c, tenant)
        assert old[0], old
    try:
        cluster.restart("immediate")
        with cluster.connect() as c:
            r = acquire(c, tenant)
            assert r[0] is False and r[2] == "recovering"
            assert 0 < r[7].total_seconds() <= 2
            # The holder from before the crash learns its slot is gone.
            hb = c.execute("SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (old[1],)).fetchone()
            assert hb[0] is False and hb[1] == "not_found"
            time.sleep(r[7].total_seconds() + 0.05)
            assert acquire(c, tenant)[0]
            assert not acquire(c, tenant)[0]  # and the limit holds again
    finally:
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM RESET meshhook_limits.restart_grace")
            c.execute("SELECT pg_reload_conf()")


def test_pg_dump_and_restore_keep_configuration(cluster, admin, tenant, tmp_path):
    import subprocess
    seed_config(admin, tenant)
    admin.execute("SELECT * FROM meshhook_limits.record_usage(%s, 'executions_per_day', 7)", (tenant,))
    before = config_snapshot(admin)
    dump = tmp_path / "dump.sql"
    env_args = ["-h", cluster.host, "-p", str(cluster.port), "-U", "postgres"]
    subprocess.run([f"{PG_BIN}/pg_dump", *env_args, "-d", cluster.dbname, "-f", str(dump)], check=True)
    target = "restored_" + uuid.uuid4().hex[:8]
    admin.execute(f"CREATE DATABASE {target}")
    try:
        restore = subprocess.run([f"{PG_BIN}/psql", *env_args, "-d", target, "-v", "ON_ERROR_STOP=1",
                                  "-q", "-f", str(dump)], capture_output=True, text=True)
        assert restore.returncode == 0, restore.stderr
        with cluster.connect(dbname=target) as c:
            assert config_snapshot(c) == before
            used = c.execute("SELECT used FROM meshhook_limits.usage(%s) WHERE resource = 'executions_per_day'",
                             (tenant,)).fetchone()[0]
            assert used == 7
    finally:
        admin.execute(f"DROP DATABASE {target}")


def test_usage_events_are_edge_triggered_and_transactional(cluster, admin, tenant):
    set_limit(admin, "webhooks_per_hour", 10, tenant, window_length="1 hour")
    listener = listen(cluster)
    with cluster.connect(autocommit=False) as c:
        c.execute("SELECT meshhook_limits.record_usage(%s, 'webhooks_per_hour', 9)", (tenant,))
        c.rollback()
    assert notifications(listener, timeout=0.5) == []
    statuses = [admin.execute("SELECT status FROM meshhook_limits.record_usage(%s, 'webhooks_per_hour', %s)",
                              (tenant, n)).fetchone()[0] for n in (8, 0, 1, 5)]
    assert statuses == ["warning", "warning", "warning", "exceeded"]
    events = notifications(listener, want=2)
    assert [e["event"] for e in events] == ["limit.warning", "limit.exceeded"]
    assert events[1]["value"] == 14 and events[1]["limit"] == 10 and events[1]["resource"] == "webhooks_per_hour"
    assert notifications(listener, timeout=0.3) == []
    listener.close()
