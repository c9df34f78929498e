"""Claiming keeps its promise at the edges (issue 18): across a crash and a
clean restart with the claimed jobs still held by workers outside
PostgreSQL, in every database of the cluster (one worker per database,
found without configuration), when a database with claimed jobs is
dropped, and when a queue is unbound while its claimed jobs run.

Each test has its own cluster: restarts and dropped databases would
disturb the session's. The restart grace is long (60 s) on purpose:
claiming must resume as soon as the claimed slots are rebuilt from the
queues, not when the grace ends."""
import os
import signal
import time
import uuid

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
