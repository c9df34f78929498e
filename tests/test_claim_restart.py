"""Claiming keeps its promise at the edges (issue 18): across a crash and a
clean restart with the claimed jobs still held by workers outside
PostgreSQL, in every database of the cluster (one worker per database,
found without configuration), when a database with claimed jobs is
dropped, and when a queue is unbound while its claimed jobs run.

Each test has its own cluster: restarts and dropped databases would
disturb the session's. The restart grace is long (60 s) on purpose:
claiming must resume as soon as the claimed slots are rebuilt from the
queues, not when the grace ends."""
import json
import os
import signal
import time
import uuid

import psycopg
import pytest

from conftest import destroy_cluster, fresh_cluster, set_limit
from test_claim import (PGMQ_SQL, bind, boss_complete_sql, claim, live_slots, metrics, mq_send, send,
                        tick, uniq)
from test_queues import NODE, PGBOSS_MAJOR, boss, install_pgmq
from conftest import ROOT, requires

S = "meshhook_limits"
pytestmark = requires(NODE is not None and (ROOT / "tests/node/node_modules/pg-boss/package.json").exists()
                      and PGMQ_SQL.exists(), "pg-boss (npm) and pgmq's SQL (scripts/install-queue-systems.sh)")


def wait_for(pred, what: str, timeout: float = 60, step: float = 0.1):
    """Poll until pred() is truthy: a count reached, never a fixed sleep.
    The timeout is generous and fails loudly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except Exception:  # noqa: BLE001 -- a server restarting refuses connections meanwhile
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(step)


def crash(c):
    """kill -9 of a backend: the postmaster resets shared memory (crash recovery)."""
    with c.connect(dbname="postgres") as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        other = c.connect(dbname="postgres")
        victim = other.execute("SELECT pg_backend_pid()").fetchone()[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)
    c.wait_ready(60)
    assert pid != victim


@pytest.fixture
def rc():
    c = fresh_cluster("restart", "meshhook_limits.restart_grace = '60s'", "fsync = off",
                      "meshhook_limits.sample_interval = '200ms'")
    yield c
    destroy_cluster(c)


def setup_db(c, name, pgboss_major=11):
    PGBOSS_MAJOR[name] = pgboss_major
    with c.connect(dbname="postgres") as conn:
        conn.execute(f"CREATE DATABASE {name}")
    with c.connect(dbname=name) as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
    install_pgmq(c, name)
    assert boss(c, name, "start")["installed"] is True


def held(conn, tenant) -> int:
    return conn.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0]


@pytest.mark.smoke
@pytest.mark.parametrize("major", [11, 12], ids=["pgboss11", "pgboss12"])
@pytest.mark.parametrize("how", ["crash", "restart"])
def test_claimed_jobs_still_count_after_a_crash_or_restart(rc, how, major):
    """The operator's reproduction: limit 6, claim 3 from pg-boss and 3 from
    pgmq (the workers keep them), crash or restart, claim again: nothing
    more for the tenant; finish one job of each and two more are claimed at
    once, well within the restart grace."""
    setup_db(rc, "app", major)
    t = str(uuid.uuid4())
    q, mq = uniq("q"), uniq("mq")
    boss(rc, "app", "create-queue", name=q, options={})
    with rc.connect(dbname="app") as db:
        db.execute("SELECT pgmq.create(%s)", (mq,))
        set_limit(db, "concurrent_executions", 6, t)
        bind(db, "pgboss", q)
        bind(db, "pgmq", mq)
        send(rc, "app", q, [{"tenant_id": t, "i": i} for i in range(10)])
        mq_send(db, mq, [{"tenant_id": t, "i": i} for i in range(10)])
        boss_jobs = claim(db, "pgboss", q, 3)
        mq_jobs = claim(db, "pgmq", mq, 3, lease="10 minutes")
        assert len(boss_jobs) == len(mq_jobs) == 3
        assert held(db, t) == 6
    if how == "crash":
        crash(rc)
    else:
        rc.restart("fast")
    with rc.connect(dbname="app") as db:
        # The jobs are still running: 6 held, none more claimed.
        assert claim(db, "pgboss", q, 10) == []
        assert claim(db, "pgmq", mq, 10, lease="10 minutes") == []
        assert held(db, t) == 6
        runs = sorted(s["run_id"].split("/", 2)[2] for s in live_slots(db, t).values())
        assert runs == sorted([j["job_id"] for j in boss_jobs]
                              + [f"{j['job_id']}/1" for j in mq_jobs])
        # A job ends: its rebuilt slot ends with it, and the next is claimed
        # now, not when the 60 s grace is over.
        assert boss_complete_sql(db, q, [boss_jobs[0]["job_id"]]) == 1
        db.execute("SELECT pgmq.archive(%s, %s::bigint)", (mq, int(mq_jobs[0]["job_id"])))
        assert held(db, t) == 4
        assert len(claim(db, "pgboss", q, 10)) == 2
        assert claim(db, "pgmq", mq, 10, lease="10 minutes") == []
        assert held(db, t) == 6
        # A slot taken directly still waits for the grace: its holders have
        # no durable record to rebuild from.
        t2 = str(uuid.uuid4())
        row = db.execute(f"SELECT granted, reason FROM {S}.acquire_execution_slot(%s)", (t2,)).fetchone()
        assert row == (False, "recovering")


def test_rebuild_counts_project_key_total_and_cost(rc):
    """Every limit a claimed job counted under is counted again: project,
    concurrency key, the total, and the job's cost."""
    setup_db(rc, "app")
    t, p = str(uuid.uuid4()), str(uuid.uuid4())
    q = uniq("q")
    boss(rc, "app", "create-queue", name=q, options={})
    with rc.connect(dbname="app") as db:
        bind(db, "pgboss", q, project_path="project", key_path="api", cost_path="units")
        set_limit(db, "concurrent_executions_total", 5)
        send(rc, "app", q, [{"tenant_id": t, "project": p, "api": "stripe", "units": 2} for _ in range(4)])
        assert len(claim(db, "pgboss", q, 4)) == 2          # 2 x cost 2 = 4 of the total 5
        before = db.execute(f"SELECT * FROM {S}.explain_admission(%s, %s, 'stripe')", (t, p)).fetchall()
    rc.restart("immediate")
    with rc.connect(dbname="app") as db:
        assert claim(db, "pgboss", q, 4) == []             # 4 + 2 > 5
        after = db.execute(f"SELECT * FROM {S}.explain_admission(%s, %s, 'stripe')", (t, p)).fetchall()
        assert after == before
        assert [r[3] for r in after if r[1] in ("tenant", "project", "key", "total")][:4] == [4, 4, 4, 4]


def test_unbind_keeps_following_claimed_jobs(rc):
    """An unbound (or re-bound) queue's claimed jobs still count while they
    run, and their slots end when they end: the tick follows them."""
    setup_db(rc, "app")
    t = str(uuid.uuid4())
    q = uniq("q")
    boss(rc, "app", "create-queue", name=q, options={})
    with rc.connect(dbname="app") as db:
        set_limit(db, "concurrent_executions", 2, t)
        bind(db, "pgboss", q)
        send(rc, "app", q, [{"tenant_id": t, "i": i} for i in range(10)])
        jobs = claim(db, "pgboss", q, 10)
        assert len(jobs) == 2
        assert db.execute(f"SELECT {S}.unbind_queue('pgboss', %s)", (q,)).fetchone()[0] is True
        bind(db, "pgboss", q)
        tick(db)
        assert claim(db, "pgboss", q, 10) == []             # the two still run
        assert boss_complete_sql(db, q, [j["job_id"] for j in jobs]) == 2
        tick(db)
        assert held(db, t) == 0
        assert len(claim(db, "pgboss", q, 10)) == 2
        tick(db)    # the retired binding goes once no slot of it is left
        assert db.execute(f"SELECT count(*) FROM {S}.retired_bindings").fetchone()[0] == 0


def test_every_database_with_the_extension_is_served_and_a_dropped_one_leaves_nothing(rc):
    """No meshhook_limits.database: a worker in each of three databases
    within seconds of CREATE EXTENSION (none in a database without it);
    each renews its own database's claimed slots past their lease while
    the jobs run; DROP DATABASE (without FORCE) works with claimed jobs in
    it and leaves none of its slots in shared memory."""
    names = ["db_a", "db_b", "db_c"]
    with rc.connect(dbname="postgres") as conn:
        conn.execute("CREATE DATABASE db_plain")
    for n in names:
        setup_db(rc, n)

    def workers():
        return {r[0] for r in rc.sql("SELECT datname FROM pg_stat_activity "
                                     "WHERE backend_type = 'meshhook_limits worker'", dbname="postgres")}
    wait_for(lambda: workers() == set(names), "a worker in each database with the extension")
    tenants = {}
    for n in names:
        t = tenants[n] = str(uuid.uuid4())
        with rc.connect(dbname=n) as db:
            q = uniq("mq")
            db.execute("SELECT pgmq.create(%s)", (q,))
            bind(db, "pgmq", q)
            set_limit(db, "concurrent_executions", 2, t)
            mq_send(db, q, [{"tenant_id": t} for _ in range(5)])
            # Claimed by several databases at once; the lease is short and
            # only the database's own worker renews it (the message stays
            # invisible for 10 minutes: the job runs).
            assert len(claim(db, "pgmq", q, 5, lease="2 seconds")) == 2
            db.execute(f"UPDATE pgmq.q_{q} SET vt = now() + interval '10 minutes' WHERE read_ct > 0")
    ticks0 = {n: rc.sql(f"SELECT ticks FROM {S}.worker_state", dbname=n)[0][0] for n in names}
    # Past the 2 s lease, several ticks later, every slot is still held.
    for n in names:
        wait_for(lambda: rc.sql(f"SELECT ticks FROM {S}.worker_state", dbname=n)[0][0] >= ticks0[n] + 15,
                 f"15 ticks in {n}")
    for n in names:
        with rc.connect(dbname=n) as db:
            assert held(db, tenants[n]) == 2, n
    with rc.connect(dbname="postgres") as conn, rc.connect(dbname="db_a") as a:
        live_before = metrics_live(a)
        conn.execute("DROP DATABASE db_b")
        wait_for(lambda: metrics_live(a) == live_before - 2, "db_b's slots gone from shared memory", 10)
    assert wait_for(lambda: workers() == {"db_a", "db_c"}, "db_b's worker gone")
    # The other databases keep theirs.
    for n in ("db_a", "db_c"):
        with rc.connect(dbname=n) as db:
            assert held(db, tenants[n]) == 2


def metrics_live(conn) -> float:
    """Live slots of the whole server (every database), as metrics() reports them."""
    return metrics(conn)["meshhook_limits_slots_live"]


def test_the_drop_database_hook_stops_only_our_worker_for_the_databases_owner(rc):
    """The hook that lets DROP DATABASE through a served database runs no
    SQL of the caller's: a role with CREATEDB and its own `=` operators in
    its search_path kills nobody with a DROP DATABASE of a database it does
    not own (red-team finding: it killed every backend); the database's
    owner, not a superuser, drops it without FORCE while its worker serves
    it; CREATE DATABASE ... TEMPLATE DEFAULT still works."""
    with rc.connect(dbname="postgres") as su:
        su.execute("CREATE ROLE mallory LOGIN CREATEDB")
        su.execute("CREATE ROLE owner_o LOGIN CREATEDB")
        su.execute("CREATE DATABASE victim")
        su.execute("CREATE DATABASE owned OWNER owner_o")
    for db in ("victim", "owned"):
        with rc.connect(dbname=db) as conn:
            conn.execute("CREATE EXTENSION meshhook_limits")

    def worker_in(db):
        return rc.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker' "
                      "AND datname = %s", (db,), dbname="postgres")
    wait_for(lambda: worker_in("victim") and worker_in("owned"), "workers in victim and owned")
    with rc.connect(dbname="postgres") as bystander:
        pid = bystander.execute("SELECT pg_backend_pid()").fetchone()[0]
        with rc.connect(dbname="postgres", user="mallory") as m:
            m.execute("CREATE DATABASE mdb")
        with rc.connect(dbname="mdb", user="mallory") as m:
            m.execute("CREATE SCHEMA evil")
            for left, right in (("text", "text"), ("name", "text"), ("oid", "oid"), ("name", "name")):
                m.execute(f"CREATE FUNCTION evil.t(a {left}, b {right}) RETURNS boolean LANGUAGE sql "
                          "AS 'SELECT true'")
                m.execute(f"CREATE OPERATOR evil.= (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = evil.t)")
            m.execute("SET search_path = evil, pg_catalog")
            for stmt in ("DROP DATABASE IF EXISTS no_such_db", "DROP DATABASE victim"):
                try:
                    m.execute(stmt)
                except psycopg.Error:
                    pass                                      # not the owner: refused, as it must be
            m.execute("CREATE DATABASE mdb2 TEMPLATE DEFAULT")
        assert bystander.execute("SELECT pg_backend_pid()").fetchone()[0] == pid   # still alive
    assert worker_in("victim"), "a non-owner's DROP DATABASE stopped the victim's worker"
    with rc.connect(dbname="postgres", user="owner_o") as o:
        o.execute("DROP DATABASE owned")                      # no FORCE, worker serving it
    assert rc.sql("SELECT count(*) FROM pg_database WHERE datname = 'owned'", dbname="postgres") == [(0,)]


def test_advisory_locks_any_role_can_take_hold_up_neither_rebuild_nor_worker(rc):
    """Any role can take advisory locks; a plain role holding every key the
    extension might use neither holds up claiming after a restart nor keeps
    the worker out of its database (red-team finding)."""
    setup_db(rc, "app")
    t = str(uuid.uuid4())
    q = uniq("mq")
    with rc.connect(dbname="app") as db:
        db.execute("CREATE ROLE bob LOGIN")
        db.execute("SELECT pgmq.create(%s)", (q,))
        bind(db, "pgmq", q)
        mq_send(db, q, [{"tenant_id": t}] * 3)
    rc.restart("fast")
    with rc.connect(dbname="app", user="bob") as bob:
        bob.execute("SELECT pg_advisory_lock(k) FROM (VALUES (7882833615114562817), (7882833615114562818)) v(k)")
        with rc.connect(dbname="app") as db:
            db.execute("SET statement_timeout = '20s'")
            assert len(claim(db, "pgmq", q, 3)) == 3
        wait_for(lambda: rc.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                                "'meshhook_limits worker' AND datname = 'app'", dbname="postgres") == [(1,)],
                 "the worker serves app")


def test_hostile_in_flight_rows_neither_fail_the_rebuild_nor_fill_the_table(rc):
    """Whoever may send to a bound pgmq queue may write any vt and read_ct:
    an infinite vt does not fail the rebuild after a restart (claiming goes
    on), and 1,100 rows in flight for one victim rebuild at most the
    tenant's ceiling of slots, with a lease of at most a day: the slot table
    stays open to every other database (red-team findings)."""
    setup_db(rc, "app")
    setup_db(rc, "other")
    victim, t = str(uuid.uuid4()), str(uuid.uuid4())
    q = uniq("mq")
    with rc.connect(dbname="app") as db:
        db.execute("SELECT pgmq.create(%s)", (q,))
        bind(db, "pgmq", q)
        db.execute(f"INSERT INTO pgmq.q_{q} (read_ct, vt, message) VALUES (1, 'infinity', %s::jsonb)",
                   (json.dumps({"tenant_id": t}),))
        db.execute(f"INSERT INTO pgmq.q_{q} (read_ct, vt, message) "
                   "SELECT 1, now() + interval '30 days', %s::jsonb FROM generate_series(1, 1100)",
                   (json.dumps({"tenant_id": victim}),))
        mq_send(db, q, [{"tenant_id": t}])
    rc.restart("fast")
    with rc.connect(dbname="app") as db:
        assert len(claim(db, "pgmq", q, 5)) == 1               # the rebuild did not fail
        ceiling = int(db.execute("SHOW meshhook_limits.tenant_slot_ceiling").fetchone()[0])
        assert held(db, victim) == ceiling
        longest = db.execute(f"SELECT max(lease_expires_at) - now() FROM {S}.slots() WHERE state = 'live'"
                             ).fetchone()[0]
        assert longest.total_seconds() <= 86400 + 5
    with rc.connect(dbname="other") as db:
        # Past the restart grace? Direct slots wait for it; a claim does not.
        mq2 = uniq("mq")
        db.execute("SELECT pgmq.create(%s)", (mq2,))
        bind(db, "pgmq", mq2)
        mq_send(db, mq2, [{"tenant_id": t}] * 3)
        assert len(claim(db, "pgmq", mq2, 3)) == 3


def test_databases_created_back_to_back_are_all_served_at_once(rc):
    """CREATE DATABASE then CREATE EXTENSION at once, in five databases one
    after the other: each gets its worker within seconds, not after the
    launcher's minute between probes (one wake stands for all of them, a
    probe that looked just before the commit is followed by another, and a
    start refused for want of a free max_worker_processes slot, as the
    probes of the other databases take some, is tried again in 5 s)."""
    names = [f"fast_{i}" for i in range(5)]
    for n in names:
        with rc.connect(dbname="postgres") as conn:
            conn.execute(f"CREATE DATABASE {n}")
        with rc.connect(dbname=n) as conn:
            conn.execute("CREATE EXTENSION meshhook_limits")

    def served():
        return {r[0] for r in rc.sql("SELECT datname FROM pg_stat_activity "
                                     "WHERE backend_type = 'meshhook_limits worker'", dbname="postgres")}
    wait_for(lambda: set(names) <= served(), "a worker in each of the five databases", timeout=30)
