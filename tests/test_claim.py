"""Claiming (sql/claim*.sql, src/claim/, src/slots/claimed.rs): bind_queue, claim_jobs, the
tick ending a claim's slot with its job, explain_admission/explain_queues,
against the real queue systems: pg-boss 11 through its own Node API
(tests/node/pgboss_driver.mjs, tests/node/claim_driver.mjs) and pgmq from
its SQL (.cache/pgmq/pgmq.sql).

Everything runs in a database of this module. The session cluster's worker
ticks in `postgres`, so the tests call `meshhook_limits.tick()` themselves.
Each test uses fresh tenants and queue names; the `db` fixture releases every
slot, clears the global limits and unbinds every queue afterwards, since
concurrent_executions_total counts all of the database's slots.
"""
import json
import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict

import psycopg
import pytest
from psycopg import sql

from conftest import ROOT, Cluster, requires, rpc, set_limit, sqlstate
from test_queues import PGBOSS_MAJOR, PgBossError, boss, boss_env, create_db, drop_db, install_pgmq

S = "meshhook_limits"
CLAIM_DRIVER = ROOT / "tests" / "node" / "claim_driver.mjs"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"
NODE = shutil.which("node")

pytestmark = requires(NODE is not None and (ROOT / "tests/node/node_modules/pg-boss/package.json").exists()
                      and PGMQ_SQL.exists(), "pg-boss (npm) and pgmq's SQL (scripts/install-queue-systems.sh)")

CLAIM_COLS = ["job_id", "tenant_id", "project_id", "concurrency_key", "slot_id", "lease_expires_at", "data",
              "retry_count"]


# --------------------------------------------------------------------------- helpers

def _node(script, c: Cluster, db: str, command: str, args: dict):
    p = subprocess.run([NODE, str(script), c.dsn(db), command, "-"], input=json.dumps(args),
                       capture_output=True, text=True, timeout=120, env=boss_env(db))
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"{script.name} {command} failed: rc={p.returncode} stdout={p.stdout!r} "
                             f"stderr={p.stderr!r}")
    if p.returncode != 0:
        raise PgBossError(out.get("error"), out.get("code"))
    return out


def send(c: Cluster, db: str, queue: str, datas: list, **options) -> list[str]:
    """boss.insert(queue, jobs) with one job per data, in one statement: they
    share created_on, so their ids (sorted here) make the queue's order the
    order of `datas`. Returns the ids in that order."""
    ids = sorted(str(uuid.uuid4()) for _ in datas)
    out = _node(CLAIM_DRIVER, c, db, "insert", {"name": queue, "jobs": [{"id": i, "data": d, **options}
                                                                         for i, d in zip(ids, datas)]})
    assert out == {"inserted": len(ids)}
    return ids


def uniq(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def claim(conn, source: str, queue: str, batch: int = 1, lease: str | None = None) -> list[dict]:
    rows = conn.execute(f"SELECT * FROM {S}.claim_jobs(%s, %s, %s, %s::interval)",
                        (source, queue, batch, lease)).fetchall()
    return [dict(zip(CLAIM_COLS, r)) for r in rows]


def tick(conn) -> list[str]:
    """One tick; returns the warnings it raised."""
    warnings = []
    handler = lambda d: warnings.append(d.message_primary)  # noqa: E731
    conn.add_notice_handler(handler)
    try:
        conn.execute(f"SELECT {S}.tick()")
    finally:
        conn.remove_notice_handler(handler)
    return warnings


def live_slots(conn, tenant=None) -> dict:
    """Live slots of this database: slot_id (text) -> row dict."""
    q = f"SELECT slot_id::text, tenant_id::text, project_id::text, run_id, lease_expires_at FROM {S}.slots() " \
        "WHERE state = 'live'"
    args = []
    if tenant is not None:
        q += " AND tenant_id = %s"
        args.append(tenant)
    return {r[0]: {"tenant": r[1], "project": r[2], "run_id": r[3], "lease": r[4]}
            for r in conn.execute(q, args).fetchall()}


def binding_id(conn, source: str, queue: str) -> int:
    return conn.execute(f"SELECT id FROM {S}.queue_bindings WHERE source = %s AND queue = %s",
                        (source, queue)).fetchone()[0]


def bind(conn, source: str, queue: str, **paths) -> int:
    args = ", ".join(f"{k} => %({k})s" for k in paths)
    conn.execute(f"SELECT {S}.bind_queue(%(s)s, %(q)s{', ' + args if args else ''})",
                 {"s": source, "q": queue, **paths})
    return binding_id(conn, source, queue)


def metrics(conn) -> dict:
    text = conn.execute(f"SELECT {S}.metrics()").fetchone()[0]
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def blocked(m: dict, reason: str) -> float:
    return m[f'meshhook_limits_claim_blocked_total{{reason="{reason}"}}']


def boss_rows(conn, queue: str, ids=None) -> dict:
    """pgboss.job rows by id: every column (to_jsonb), plus ctid and xmin,
    which any UPDATE changes."""
    q = ("SELECT id::text, ctid::text, xmin::text, to_jsonb(j) FROM pgboss.job j WHERE name = %s"
         + (" AND id = ANY(%s::uuid[])" if ids is not None else ""))
    rows = conn.execute(q, (queue, list(ids)) if ids is not None else (queue,)).fetchall()
    return {r[0]: {"ctid": r[1], "xmin": r[2], **r[3]} for r in rows}


def qtable(conn, queue: str) -> str:
    return "pgmq." + sql.Identifier(("q_" + queue).lower()).as_string(conn)


def mq_rows(conn, queue: str) -> dict:
    rows = conn.execute(f"SELECT msg_id, ctid::text, xmin::text, to_jsonb(j) FROM {qtable(conn, queue)} j").fetchall()
    return {r[0]: {"ctid": r[1], "xmin": r[2], **r[3]} for r in rows}


def mq_send(conn, queue: str, messages: list) -> list[int]:
    return [r[0] for r in conn.execute("SELECT * FROM pgmq.send_batch(%s, %s::jsonb[])",
                                       (queue, [json.dumps(m) for m in messages])).fetchall()]


def boss_complete_sql(conn, queue: str, ids) -> int:
    """pg-boss 11's completeJobs statement (plans.js), for threads that
    cannot afford a Node process per call."""
    return conn.execute("UPDATE pgboss.job SET completed_on = now(), state = 'completed', output = NULL "
                        "WHERE name = %s AND id IN (SELECT unnest(%s::uuid[])) AND state = 'active'",
                        (queue, list(ids))).rowcount


def explain(conn, tenant, project=None, key=None) -> dict:
    rows = conn.execute(f"SELECT resource, scope, limit_value, in_use, source, blocking "
                        f"FROM {S}.explain_admission(%s, %s, %s)", (tenant, project, key)).fetchall()
    # By scope; the fair_share_weight row (scope 'tenant' too) as "weight".
    return {("weight" if r[0] == "fair_share_weight" else r[1]):
            {"resource": r[0], "limit": r[2], "in_use": r[3], "source": r[4], "blocking": r[5]} for r in rows}


def claims_of(tenant) -> dict:
    return {"role": "authenticated", "sub": str(uuid.uuid4()), "app_metadata": {"tenant_id": tenant}}


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=[11, 12], ids=["pgboss11", "pgboss12"])
def cdb(cluster, request):
    """The module's database: meshhook_limits, pgmq and pg-boss (11, then
    12: every test runs on both majors)."""
    name = f"mlclaim{request.param}_{os.getpid()}"
    PGBOSS_MAJOR[name] = request.param
    create_db(cluster, name)
    install_pgmq(cluster, name)
    assert boss(cluster, name, "start")["installed"] is True
    yield name
    drop_db(cluster, name)


@pytest.fixture
def db(cluster, cdb):
    """A superuser connection to the module's database; afterwards every
    slot is released, every queue unbound and the global claim limits
    cleared (the next test starts with an empty database total)."""
    with cluster.connect(dbname=cdb) as c:
        yield c
    with cluster.connect(dbname=cdb) as c:
        c.execute(f"SELECT {S}.release_execution_slot(slot_id) FROM {S}.slots() WHERE state = 'live'")
        c.execute(f"SELECT {S}.unbind_queue(source, queue) FROM {S}.queue_bindings")
        c.execute(f"SELECT {S}.clear_limit(resource) FROM {S}.limits "
                  "WHERE tenant_id IS NULL AND plan IS NULL "
                  "AND (resource = 'concurrent_executions_total' OR resource LIKE 'concurrent_executions.%')")


def new_boss_queue(cluster, cdb, prefix="q", **options) -> str:
    q = uniq(prefix)
    boss(cluster, cdb, "create-queue", name=q, options=options)
    return q


# --------------------------------------------------------------------------- 1. pg-boss: a claim is a fetch

@pytest.mark.smoke
def test_pgboss_claimed_job_is_a_fetched_job(cluster, cdb, db, tenant):
    q = new_boss_queue(cluster, cdb, retryLimit=2)
    a, b = send(cluster, cdb, q, [{"tenant_id": tenant, "n": 1}, {"tenant_id": tenant, "n": 2}])
    before = boss_rows(db, q)
    bid = bind(db, "pgboss", q)

    [c] = claim(db, "pgboss", q)
    assert c["job_id"] == a and str(c["tenant_id"]) == tenant
    assert c["data"] == {"tenant_id": tenant, "n": 1}
    assert c["project_id"] is None and c["concurrency_key"] is None
    slots = live_slots(db, tenant)
    assert list(slots) == [str(c["slot_id"])]
    assert slots[str(c["slot_id"])]["run_id"] == f"claim/{bid}/{a}"
    assert db.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0] == 1

    # pg-boss's own fetch does not see the claimed job: it takes the next.
    [fetched] = boss(cluster, cdb, "fetch", name=q, batchSize=1)
    assert fetched["id"] == b
    after = boss_rows(db, q)

    def changed(i):
        return {k for k in after[i] if k not in ("ctid", "xmin") and after[i][k] != before[i][k]}
    # The claim changed exactly what pg-boss's fetch changed, to the same
    # values (pg-boss 12 also starts the job's heartbeat clock).
    want = {"state", "started_on"} | ({"heartbeat_on"} if PGBOSS_MAJOR[cdb] == 12 else set())
    assert changed(a) == changed(b) == want
    for i in (a, b):
        assert after[i]["state"] == "active" and after[i]["started_on"] is not None
        assert after[i]["retry_count"] == 0
    # getJobById: the same job as pg-boss sees a job it fetched itself.
    ja, jb = boss(cluster, cdb, "job", name=q, id=a), boss(cluster, cdb, "job", name=q, id=b)
    assert ja["state"] == jb["state"] == "active"
    assert ja["startedOn"] and ja["retryCount"] == jb["retryCount"] == 0
    assert set(ja) == set(jb)

    # boss.complete works on the claimed job (it completes only active jobs);
    # the next tick ends the slot.
    assert tick(db) == []
    assert list(live_slots(db, tenant)) == [str(c["slot_id"])]       # still running
    assert boss(cluster, cdb, "complete", name=q, ids=[a])["affected"] == 1
    assert tick(db) == []
    assert live_slots(db, tenant) == {}
    assert db.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0] == 0
    assert boss(cluster, cdb, "job", name=q, id=a)["state"] == "completed"


def test_pgboss_fail_retry_and_fetched_again(cluster, cdb, db, tenant):
    """A failed job (retry) ends its slot; claimed again, its retry_count
    goes up exactly as under pg-boss's own fetch; a claim whose job was
    taken again (by a later claim, or by pg-boss's own fetch) ends at the
    next tick while the job is active."""
    q = new_boss_queue(cluster, cdb, retryLimit=3, retryDelay=0)
    [a] = send(cluster, cdb, q, [{"tenant_id": tenant}])
    bind(db, "pgboss", q)
    [c1] = claim(db, "pgboss", q)
    assert c1["job_id"] == a
    # A job of pg-boss's own in the same queue (and tenant), the control.
    [b] = send(cluster, cdb, q, [{"tenant_id": tenant}])
    [fb] = boss(cluster, cdb, "fetch", name=q, batchSize=1)
    assert fb["id"] == b

    assert boss(cluster, cdb, "fail", name=q, ids=[a, b])["affected"] == 2
    rows = boss_rows(db, q)
    assert rows[a]["state"] == rows[b]["state"] == "retry"
    assert tick(db) == []
    assert live_slots(db, tenant) == {}

    time.sleep(0.01)
    [c2] = claim(db, "pgboss", q, batch=1)
    assert c2["job_id"] == a                              # the retry is claimable again
    [fb2] = boss(cluster, cdb, "fetch", name=q, batchSize=1)
    assert fb2["id"] == b
    rows = boss_rows(db, q)
    assert rows[a]["state"] == rows[b]["state"] == "active"
    assert rows[a]["retry_count"] == rows[b]["retry_count"] == 1
    assert tick(db) == []
    assert list(live_slots(db, tenant)) == [str(c2["slot_id"])]

    # Failed and claimed again before any tick: the tick (if the failure did
    # not already) ends the older slot and keeps the new one.
    boss(cluster, cdb, "fail", name=q, ids=[a])
    time.sleep(0.01)
    [c3] = claim(db, "pgboss", q)
    assert c3["job_id"] == a and boss_rows(db, q, [a])[a]["retry_count"] == 2
    assert str(c3["slot_id"]) in live_slots(db, tenant)
    assert set(live_slots(db, tenant)) <= {str(c2["slot_id"]), str(c3["slot_id"])}
    assert tick(db) == []
    assert list(live_slots(db, tenant)) == [str(c3["slot_id"])]

    # Failed, then fetched by pg-boss's own worker: the job is active again,
    # but no longer ours. The claim's slot ends.
    boss(cluster, cdb, "fail", name=q, ids=[a])
    time.sleep(0.01)
    [fa] = boss(cluster, cdb, "fetch", name=q, batchSize=1)
    assert fa["id"] == a and boss_rows(db, q, [a])[a]["state"] == "active"
    assert tick(db) == []
    assert live_slots(db, tenant) == {}

    # Out of retries: failed for good, and never claimed again.
    boss(cluster, cdb, "fail", name=q, ids=[a])
    assert boss(cluster, cdb, "job", name=q, id=a)["state"] == "failed"
    assert claim(db, "pgboss", q, batch=10) == []


def test_pgboss_cancel_delete_expire_and_explicit_release(cluster, cdb, db, tenant):
    q = new_boss_queue(cluster, cdb, retryLimit=0, expireInSeconds=1)
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "i": i} for i in range(4)])
    bind(db, "pgboss", q)
    got = claim(db, "pgboss", q, batch=4)
    assert [c["job_id"] for c in got] == ids
    slot = {c["job_id"]: str(c["slot_id"]) for c in got}
    cancelled, deleted, expiring, released = ids

    assert boss(cluster, cdb, "cancel", name=q, ids=[cancelled])["affected"] == 1
    assert _node(CLAIM_DRIVER, cluster, cdb, "delete", {"name": q, "ids": [deleted]})["affected"] == 1
    assert db.execute(f"SELECT {S}.release_execution_slot(%s)", (slot[released],)).fetchone()[0] is True
    assert tick(db) == []
    # The expiring job is still active until pg-boss's supervisor expires it.
    assert set(live_slots(db, tenant)) == {slot[expiring]}
    assert boss_rows(db, q, [released])[released]["state"] == "active"   # release does not touch the job

    started = db.execute("SELECT started_on FROM pgboss.job WHERE name = %s AND id = %s",
                         (q, expiring)).fetchone()[0]
    wait = 1.2 - (db.execute("SELECT now() - %s::timestamptz", (started,)).fetchone()[0]).total_seconds()
    if wait > 0:
        time.sleep(wait)
    boss(cluster, cdb, "supervise", name=q)
    j = boss(cluster, cdb, "job", name=q, id=expiring)
    assert j["state"] == "failed" and j["output"]["value"]["message"] == "job timed out"
    assert tick(db) == []
    assert live_slots(db, tenant) == {}
    # The explicitly released one stays released; later ticks are quiet.
    assert tick(db) == [] and live_slots(db, tenant) == {}
    assert db.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0] == 0


def test_pgboss_tick_renews_a_running_claim(cluster, cdb, db, tenant):
    q = new_boss_queue(cluster, cdb)
    [a] = send(cluster, cdb, q, [{"tenant_id": tenant}])
    bind(db, "pgboss", q)
    [c] = claim(db, "pgboss", q, lease="3 seconds")
    first = c["lease_expires_at"]
    # Ticked every 0.2 s (the worker samples once a second by default) until a tick after
    # the first lease has passed: the slot is kept all along. (A fixed count
    # of ticks 0.7 s apart lost the slot on a busy CI machine: a stall of
    # 1.3 s was a missed heartbeat.)
    while True:
        passed = db.execute("SELECT clock_timestamp() > %s", (first,)).fetchone()[0]
        time.sleep(0.2)
        assert tick(db) == []
        s = live_slots(db, tenant)
        assert list(s) == [str(c["slot_id"])], "a running claim's slot was not kept by the tick"
        if passed:
            break
    assert s[str(c["slot_id"])]["lease"] > first
    boss(cluster, cdb, "complete", name=q, ids=[a])
    assert tick(db) == [] and live_slots(db, tenant) == {}


def test_pgboss_claims_in_pgboss_order(cluster, cdb, db, tenant):
    """Within a tenant, claims come in the order boss.fetch() gives: priority,
    then age; deferred jobs (start_after in the future) are skipped, not
    touched. Checked against pg-boss itself on a twin queue (a partitioned
    one: the claim index lives on every partition)."""
    jobs = [({"n": "deferred"}, {"startAfter": 3600}), ({"n": "low"}, {"priority": -1}),
            ({"n": "plain1"}, {}), ({"n": "high"}, {"priority": 5}), ({"n": "plain2"}, {}),
            ({"n": "deferred-high"}, {"priority": 9, "startAfter": 3600})]
    order = {}
    for who in ("boss", "claim"):
        q = new_boss_queue(cluster, cdb, partition=(who == "claim"))
        for data, opts in jobs:
            send(cluster, cdb, q, [{"tenant_id": tenant, **data}], **opts)
        if who == "boss":
            # One at a time: the order of a batch fetch's result is not its order.
            order[who] = []
            while got := boss(cluster, cdb, "fetch", name=q, batchSize=1):
                order[who].append(got[0]["data"]["n"])
        else:
            deferred = boss_rows(db, q)
            bind(db, "pgboss", q)
            order[who] = [c["data"]["n"] for c in claim(db, "pgboss", q, batch=10)]
            after = boss_rows(db, q)
            for k, row in deferred.items():
                if row["data"]["n"].startswith("deferred"):
                    assert after[k] == row
    assert order["boss"] == ["high", "plain1", "plain2", "low"]
    assert order["claim"] == order["boss"]


def test_pgboss_singleton_queue_never_fails_the_call(cluster, cdb, db, tenant):
    """A pg-boss queue with policy 'singleton' runs one job at a time (a
    unique index on its active jobs). boss.fetch() then returns one job and
    after that nothing; claim_jobs must not fail the call (nor hold a slot
    for a job it could not take)."""
    q = new_boss_queue(cluster, cdb, policy="singleton")
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "i": i} for i in range(3)])
    bind(db, "pgboss", q)
    got = claim(db, "pgboss", q, batch=3)
    assert [c["job_id"] for c in got] == ids[:1]
    assert claim(db, "pgboss", q, batch=3) == []
    assert list(live_slots(db, tenant)) == [str(got[0]["slot_id"])]
    rows = boss_rows(db, q)
    assert [rows[i]["state"] for i in ids] == ["active", "created", "created"]


def test_uncommitted_rolled_back_and_killed_claims(cluster, cdb, db, tenant):
    """The tick leaves a claim whose transaction is still open alone (its job
    looks untaken to every other transaction until commit); a claim rolled
    back (also to a savepoint) or whose backend is terminated holds no slot
    and leaves its job as it was, at once, without a tick."""
    q = new_boss_queue(cluster, cdb)
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "i": i} for i in range(3)])
    bind(db, "pgboss", q)
    before = boss_rows(db, q)

    with cluster.connect(dbname=cdb, autocommit=False) as w:
        [c] = claim(w, "pgboss", q)
        assert c["job_id"] == ids[0]
        assert tick(db) == []
        assert str(c["slot_id"]) in live_slots(db, tenant), "the tick ended a claim still being made"
        w.commit()
    assert tick(db) == []
    assert list(live_slots(db, tenant)) == [str(c["slot_id"])]

    with cluster.connect(dbname=cdb, autocommit=False) as w:
        [c2] = claim(w, "pgboss", q)
        w.rollback()
    assert list(live_slots(db, tenant)) == [str(c["slot_id"])]
    with cluster.connect(dbname=cdb, autocommit=False) as w:
        w.execute("SAVEPOINT s")
        [c3] = claim(w, "pgboss", q)
        w.execute("ROLLBACK TO SAVEPOINT s")
        assert live_slots(w, tenant).keys() == {str(c["slot_id"])}
        w.commit()
    assert c2["job_id"] == c3["job_id"] == ids[1]
    w = cluster.connect(dbname=cdb, autocommit=False)
    try:
        [c4] = claim(w, "pgboss", q, batch=1)
        assert c4["job_id"] == ids[1]
        db.execute("SELECT pg_terminate_backend(%s)", (w.info.backend_pid,))
        deadline = time.time() + 5
        while db.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                         (w.info.backend_pid,)).fetchone()[0] and time.time() < deadline:
            time.sleep(0.02)
    finally:
        w.close()
    assert list(live_slots(db, tenant)) == [str(c["slot_id"])]
    after = boss_rows(db, q)
    assert after[ids[1]] == before[ids[1]] and after[ids[2]] == before[ids[2]]
    assert db.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0] == 1


def test_job_end_releases_the_slot_with_its_transaction(cluster, cdb, db, tenant):
    """The end of a claimed job (pg-boss's complete/fail statements, pgmq's
    archive/delete) releases its slot when that transaction commits, no tick
    needed; not before (the room is not handed out while the end may still
    roll back), and not at all if it rolls back, also to a savepoint."""
    other = str(uuid.uuid4())
    set_limit(db, "concurrent_executions", 1, tenant)
    q = new_boss_queue(cluster, cdb, retryLimit=1)
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "i": i} for i in range(4)])
    mq = uniq("mqend")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    bind(db, "pgboss", q)
    bind(db, "pgmq", mq)
    [c] = claim(db, "pgboss", q)

    complete = ("UPDATE pgboss.job SET completed_on = now(), state = 'completed' "
                "WHERE name = %s AND id = %s::uuid AND state = 'active'")
    with cluster.connect(dbname=cdb, autocommit=False) as w:
        w.execute(complete, (q, c["job_id"]))
        # Not committed yet: the tenant is still full.
        assert claim(db, "pgboss", q) == []
        assert str(c["slot_id"]) in live_slots(db, tenant)
        w.rollback()
    assert list(live_slots(db, tenant)) == [str(c["slot_id"])]
    with cluster.connect(dbname=cdb, autocommit=False) as w:
        w.execute("SAVEPOINT s")
        w.execute(complete, (q, c["job_id"]))
        w.execute("ROLLBACK TO SAVEPOINT s")
        w.commit()
    assert boss_rows(db, q, [c["job_id"]])[c["job_id"]]["state"] == "active"
    assert list(live_slots(db, tenant)) == [str(c["slot_id"])], \
        "a completion rolled back to a savepoint released the slot of a job still running"
    assert claim(db, "pgboss", q) == []
    # Committed through pg-boss itself: the slot is gone at once.
    assert boss(cluster, cdb, "complete", name=q, ids=[c["job_id"]])["affected"] == 1
    assert live_slots(db, tenant) == {}
    [c] = claim(db, "pgboss", q)
    assert boss(cluster, cdb, "fail", name=q, ids=[c["job_id"]])["affected"] == 1    # DELETE + INSERT
    assert live_slots(db, tenant) == {}
    # pgmq: archive and delete.
    db.execute(f"SELECT {S}.set_limit('concurrent_executions', 1, %s)", (other,))
    m1, m2 = mq_send(db, mq, [{"tenant_id": other}, {"tenant_id": other}])
    [cm] = claim(db, "pgmq", mq)
    with cluster.connect(dbname=cdb, autocommit=False) as w:
        w.execute("SAVEPOINT s")
        w.execute("SELECT pgmq.archive(%s, %s::bigint)", (mq, m1))
        w.execute("ROLLBACK TO SAVEPOINT s")
        w.commit()
    assert list(live_slots(db, other)) == [str(cm["slot_id"])]
    db.execute("SELECT pgmq.archive(%s, %s::bigint)", (mq, m1))
    assert live_slots(db, other) == {}
    [cm] = claim(db, "pgmq", mq)
    assert cm["job_id"] == str(m2)
    db.execute("SELECT pgmq.delete(%s, %s::bigint)", (mq, m2))
    assert live_slots(db, other) == {}
    assert tick(db) == []


def test_queue_clients_that_are_not_admins_end_claimed_jobs(cluster, cdb, db, tenant):
    """pg-boss and pgmq usually connect as a role of their own, neither a
    superuser nor an admin of meshhook_limits (Supabase's postgres is not a
    superuser): their complete, fail, cancel, delete, archive must work on
    claimed jobs as on any, and end the slots."""
    role = uniq("queue_client")
    db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute(f"GRANT USAGE ON SCHEMA pgboss, pgmq TO {role}")
    db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgboss, pgmq TO {role}")
    db.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgboss, pgmq TO {role}")
    q = new_boss_queue(cluster, cdb, retryLimit=1)
    mq = uniq("mqcl")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgmq TO {role}")
    db.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO {role}")
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "i": i} for i in range(4)])
    ms = mq_send(db, mq, [{"tenant_id": tenant}] * 2)
    bind(db, "pgboss", q)
    bind(db, "pgmq", mq)
    got = claim(db, "pgboss", q, batch=4) + claim(db, "pgmq", mq, batch=2)
    assert len(got) == 6
    as_client = type("AsClient", (), {"dsn": lambda self, d=None, user=None: cluster.dsn(d, role)})()
    try:
        assert boss(as_client, cdb, "complete", name=q, ids=[ids[0]])["affected"] == 1
        assert boss(as_client, cdb, "fail", name=q, ids=[ids[1]])["affected"] == 1
        assert boss(as_client, cdb, "cancel", name=q, ids=[ids[2]])["affected"] == 1
        assert _node(CLAIM_DRIVER, as_client, cdb, "delete", {"name": q, "ids": [ids[3]]})["affected"] == 1
        with cluster.connect(dbname=cdb, user=role) as c:
            assert c.execute("SELECT pgmq.archive(%s, %s::bigint)", (mq, ms[0])).fetchone()[0] is True
            assert c.execute("SELECT pgmq.delete(%s, %s::bigint)", (mq, ms[1])).fetchone()[0] is True
        assert live_slots(db, tenant) == {}      # ended with their jobs' transactions
        assert tick(db) == []
        assert live_slots(db, tenant) == {}
    finally:
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


# --------------------------------------------------------------------------- 2. pgmq: a claim is a read

@pytest.mark.smoke
def test_pgmq_claimed_message_is_a_read_message(cluster, cdb, db, tenant):
    q = uniq("mq")
    db.execute("SELECT pgmq.create(%s)", (q,))
    m1, m2, m3 = mq_send(db, q, [{"tenant_id": tenant, "n": n} for n in range(3)])
    before = mq_rows(db, q)
    bid = bind(db, "pgmq", q)

    [c] = claim(db, "pgmq", q)
    assert c["job_id"] == str(m1) and str(c["tenant_id"]) == tenant and c["data"] == {"tenant_id": tenant, "n": 0}
    s = live_slots(db, tenant)
    assert s[str(c["slot_id"])]["run_id"] == f"claim/{bid}/{m1}/1"
    [(r2,)] = db.execute("SELECT msg_id FROM pgmq.read(%s, 30, 1)", (q,)).fetchall()
    assert r2 == m2                               # pgmq's read does not see the claimed message
    after = mq_rows(db, q)

    def changed(i):
        return {k for k in after[i] if k not in ("ctid", "xmin") and after[i][k] != before[i][k]}
    assert changed(m1) == changed(m2) == {"vt", "read_ct", "last_read_at"}
    assert after[m1]["read_ct"] == after[m2]["read_ct"] == 1
    # vt = last_read_at + 30 s for both (the default lease is pgmq.read's 30).
    for m in (m1, m2):
        gap = db.execute("SELECT extract(epoch FROM %s::timestamptz - %s::timestamptz)",
                         (after[m]["vt"], after[m]["last_read_at"])).fetchone()[0]
        assert float(gap) == pytest.approx(30, abs=0.05)
    assert abs((c["lease_expires_at"] - db.execute("SELECT %s::timestamptz", (after[m1]["vt"],)).fetchone()[0])
               .total_seconds()) < 0.5

    assert tick(db) == [] and str(c["slot_id"]) in live_slots(db, tenant)
    assert db.execute("SELECT pgmq.archive(%s, %s::bigint)", (q, m1)).fetchone()[0] is True
    assert tick(db) == []
    assert live_slots(db, tenant) == {}

    [c3] = claim(db, "pgmq", q)
    assert c3["job_id"] == str(m3)
    assert db.execute("SELECT pgmq.delete(%s, %s::bigint)", (q, m3)).fetchone()[0] is True
    assert tick(db) == []
    assert live_slots(db, tenant) == {}


def test_pgmq_visible_again_ends_the_claim(cluster, cdb, db, tenant):
    """A message whose vt passes (the worker crashed or overran) ends its
    claim and is claimable again, with read_ct 2."""
    q = uniq("mqvt")
    db.execute("SELECT pgmq.create(%s)", (q,))
    [m] = mq_send(db, q, [{"tenant_id": tenant}])
    bid = bind(db, "pgmq", q)

    # vt made to pass at once (pgmq.set_vt 0) while the slot's lease is 30 s:
    # the tick ends the slot because the message is visible, not by lease.
    [c1] = claim(db, "pgmq", q)
    db.execute("SELECT pgmq.set_vt(%s, %s::bigint, 0)", (q, m))
    assert tick(db) == []
    assert live_slots(db, tenant) == {}
    # A claim with a 1 second lease: vt and slot lease both 1 s.
    [c2] = claim(db, "pgmq", q, lease="1 second")
    assert c2["job_id"] == str(m)
    row = mq_rows(db, q)[m]
    assert row["read_ct"] == 2
    assert live_slots(db, tenant)[str(c2["slot_id"])]["run_id"] == f"claim/{bid}/{m}/2"
    assert claim(db, "pgmq", q) == []                  # invisible for now
    time.sleep(1.1)
    assert tick(db) == []
    assert live_slots(db, tenant) == {}
    [c3] = claim(db, "pgmq", q)
    assert c3["job_id"] == str(m) and mq_rows(db, q)[m]["read_ct"] == 3
    # set_vt further out (a worker extending its visibility): the claim lives on.
    db.execute("SELECT pgmq.set_vt(%s, %s::bigint, 60)", (q, m))
    assert tick(db) == [] and str(c3["slot_id"]) in live_slots(db, tenant)
    db.execute("SELECT pgmq.archive(%s, %s::bigint)", (q, m))
    assert tick(db) == [] and live_slots(db, tenant) == {}


def test_pgmq_queue_purged_or_dropped_ends_its_claims(cluster, cdb, db, tenant):
    """pgmq.purge_queue (a TRUNCATE: no row trigger) and pgmq.drop_queue take
    the claimed messages away: their slots end at the next tick (not only
    when their leases run out), quietly."""
    q = uniq("mqdrop")
    db.execute("SELECT pgmq.create(%s)", (q,))
    mq_send(db, q, [{"tenant_id": tenant}] * 2)
    bind(db, "pgmq", q)
    assert len(claim(db, "pgmq", q, batch=2)) == 2
    db.execute("SELECT pgmq.purge_queue(%s)", (q,))
    assert tick(db) == []
    assert live_slots(db, tenant) == {}
    mq_send(db, q, [{"tenant_id": tenant}])
    [c] = claim(db, "pgmq", q)
    db.execute("SELECT pgmq.drop_queue(%s)", (q,))
    warnings = tick(db)
    assert live_slots(db, tenant) == {}, f"the claim of a dropped queue's message lives on (tick: {warnings})"
    assert warnings == []


def test_pgmq_queue_created_again_under_a_bound_name(cluster, cdb, db, tenant):
    """A bound pgmq queue dropped and created again under the same name is
    either claimed from correctly (its slot ends with its message) or refused
    with a message that says to bind it again; never a syntax error."""
    q = uniq("mqagain")
    db.execute("SELECT pgmq.create(%s)", (q,))
    bind(db, "pgmq", q)
    db.execute("SELECT pgmq.drop_queue(%s)", (q,))
    db.execute("SELECT pgmq.create(%s)", (q,))
    [m] = mq_send(db, q, [{"tenant_id": tenant}])
    with cluster.connect(dbname=cdb) as fresh:        # a backend with nothing prepared
        try:
            got = claim(fresh, "pgmq", q)
        except psycopg.Error as e:
            assert e.sqlstate in ("22023", "55000"), f"{e.sqlstate}: {e}"
            assert "bind_queue" in f"{e.diag.message_primary} {e.diag.message_hint}", str(e)
        else:
            assert [x["job_id"] for x in got] == [str(m)]
            fresh.execute("SELECT pgmq.archive(%s, %s::bigint)", (q, m))
            assert tick(fresh) == []
            assert live_slots(fresh, tenant) == {}


# --------------------------------------------------------------------------- 3. blocked jobs are untouched

def test_blocked_jobs_are_untouched(cluster, cdb, db, tenant):
    other = str(uuid.uuid4())
    set_limit(db, "concurrent_executions", 1, tenant)
    q = new_boss_queue(cluster, cdb, retryLimit=1)
    mq = uniq("mqblk")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    send(cluster, cdb, q, [{"tenant_id": tenant, "i": i} for i in range(3)])
    send(cluster, cdb, q, [{"tenant_id": tenant, "p": 1}], priority=5)
    # A job that was started and failed once (started_on, retry_count set).
    [r] = send(cluster, cdb, q, [{"tenant_id": tenant, "retry": True}], priority=9)
    [f] = boss(cluster, cdb, "fetch", name=q, batchSize=1)
    assert f["id"] == r
    boss(cluster, cdb, "fail", name=q, ids=[r])
    [ob] = send(cluster, cdb, q, [{"tenant_id": other}])
    mq_send(db, mq, [{"tenant_id": tenant, "i": i} for i in range(3)])
    [om] = mq_send(db, mq, [{"tenant_id": other}])
    bind(db, "pgboss", q)
    bind(db, "pgmq", mq)

    # The tenant is at its limit through a plain slot.
    held = db.execute(f"SELECT slot_id FROM {S}.acquire_execution_slot(%s)", (tenant,)).fetchone()[0]
    before_b, before_m = boss_rows(db, q), mq_rows(db, mq)
    time.sleep(0.01)
    got = claim(db, "pgboss", q, batch=10)
    assert [(c["job_id"], str(c["tenant_id"])) for c in got] == [(ob, other)]   # past the blocked tenant
    got = claim(db, "pgmq", mq, batch=10)
    assert [(c["job_id"], str(c["tenant_id"])) for c in got] == [(str(om), other)]
    after_b, after_m = boss_rows(db, q), mq_rows(db, mq)
    for k in before_b:
        if k != ob:
            assert after_b[k] == before_b[k], f"blocked pg-boss job {k} was changed"
    for k in before_m:
        if k != om:
            assert after_m[k] == before_m[k], f"blocked pgmq message {k} was changed"
    e = explain(db, tenant)
    assert (e["tenant"]["limit"], e["tenant"]["in_use"], e["tenant"]["blocking"]) == (1, 1, True)
    rows = {(r[0], r[1]): r for r in db.execute(
        f"SELECT source, queue, waiting, running, runnable, blocked, blocked_by FROM {S}.explain_queues(%s)",
        (tenant,)).fetchall()}
    assert rows[("pgboss", q)][2:] == (5, 0, 0, 5, "concurrent_executions")
    assert rows[("pgmq", mq)][2:] == (3, 0, 0, 3, "concurrent_executions")

    # Room again: the tenant's next job in pg-boss's order (priority first).
    db.execute(f"SELECT {S}.release_execution_slot(%s)", (held,))
    [c] = claim(db, "pgboss", q, batch=10)
    assert c["job_id"] == r and boss_rows(db, q, [r])[r]["retry_count"] == 1


def test_blocked_metric_counts_a_tenant_already_at_its_limit(cluster, cdb, db, tenant):
    """claim_blocked_total{reason="tenant_limit"} counts the jobs claim_jobs
    passes over because their tenant is full, also when the tenant was full
    before the call (the steady state of a saturated tenant: otherwise the
    counter stays at 0 however long its jobs wait)."""
    set_limit(db, "concurrent_executions", 1, tenant)
    q = new_boss_queue(cluster, cdb)
    send(cluster, cdb, q, [{"tenant_id": tenant}] * 3)
    bind(db, "pgboss", q)
    assert len(claim(db, "pgboss", q, batch=1)) == 1        # now full
    m0 = metrics(db)
    for _ in range(3):
        assert claim(db, "pgboss", q, batch=5) == []
    assert blocked(metrics(db), "tenant_limit") >= blocked(m0, "tenant_limit") + 3


# --------------------------------------------------------------------------- 4. limits

def _claim_one_by_one(conn, source, queue, most=50) -> list[dict]:
    out = []
    for _ in range(most):
        got = claim(conn, source, queue)
        if not got:
            return out
        out += got
    raise AssertionError("claim_jobs never stopped")


def test_tenant_limit_refuses_exactly_at_the_limit(cluster, cdb, db, tenant):
    set_limit(db, "concurrent_executions", 3, tenant)
    q = new_boss_queue(cluster, cdb)
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "i": i} for i in range(6)])
    bind(db, "pgboss", q)
    m0 = metrics(db)
    got = claim(db, "pgboss", q) + claim(db, "pgboss", q)
    e = explain(db, tenant)["tenant"]
    assert (e["limit"], e["in_use"], e["source"], e["blocking"]) == (3, 2, "tenant", False)
    # One more fits; the batch stops at the limit (and counts the refusal).
    got += claim(db, "pgboss", q, batch=10)
    assert [c["job_id"] for c in got] == ids[:3]
    assert claim(db, "pgboss", q) == []
    assert db.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0] == 3
    e = explain(db, tenant)["tenant"]
    assert (e["limit"], e["in_use"], e["source"], e["blocking"]) == (3, 3, "tenant", True)
    m1 = metrics(db)
    assert m1["meshhook_limits_claims_total"] - m0["meshhook_limits_claims_total"] == 3
    assert blocked(m1, "tenant_limit") > blocked(m0, "tenant_limit")
    boss(cluster, cdb, "complete", name=q, ids=[ids[1]])
    tick(db)
    assert [c["job_id"] for c in claim(db, "pgboss", q, batch=10)] == [ids[3]]


def test_project_limit(cluster, cdb, db, tenant):
    p1, p2 = str(uuid.uuid4()), str(uuid.uuid4())
    set_limit(db, "concurrent_executions", 2, tenant, p1)
    q = new_boss_queue(cluster, cdb)
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "project": p1}] * 4
               + [{"tenant_id": tenant, "project": p2}] * 2 + [{"tenant_id": tenant}])
    bind(db, "pgboss", q, project_path="project")
    m0 = metrics(db)
    got = claim(db, "pgboss", q, batch=20)
    # Two of p1, then past the full project to p2's and the project-less job.
    assert [c["job_id"] for c in got] == ids[:2] + ids[4:]
    assert [str(c["project_id"]) if c["project_id"] else None for c in got] == [p1, p1, p2, p2, None]
    e = explain(db, tenant, p1)
    assert (e["project"]["limit"], e["project"]["in_use"], e["project"]["blocking"]) == (2, 2, True)
    assert e["tenant"]["in_use"] == 5 and not e["tenant"]["blocking"]
    assert blocked(metrics(db), "project_limit") > blocked(m0, "project_limit")
    assert claim(db, "pgboss", q, batch=20) == []
    by_project = Counter(s["project"] for s in live_slots(db, tenant).values())
    assert by_project == {p1: 2, p2: 2, None: 1}


def test_key_limit_global_and_per_tenant(cluster, cdb, db, tenant):
    other = str(uuid.uuid4())
    key, free = uniq("api"), uniq("free")
    set_limit(db, f"concurrent_executions.{key}", 1)              # every tenant: 1 at a time
    set_limit(db, f"concurrent_executions.{key}", 2, tenant)      # this one: 2
    q = new_boss_queue(cluster, cdb)
    ids = {}
    for t in (tenant, other):
        ids[t] = send(cluster, cdb, q, [{"tenant_id": t, "key": key}] * 4 + [{"tenant_id": t, "key": free}])
    bind(db, "pgboss", q, key_path="key")
    m0 = metrics(db)
    got = claim(db, "pgboss", q, batch=20)
    mine = [c["job_id"] for c in got if str(c["tenant_id"]) == tenant]
    theirs = [c["job_id"] for c in got if str(c["tenant_id"]) == other]
    assert mine == ids[tenant][:2] + ids[tenant][4:]
    assert theirs == ids[other][:1] + ids[other][4:]
    assert {c["concurrency_key"] for c in got} == {key, free}
    e = explain(db, tenant, None, key)["key"]
    assert (e["resource"], e["limit"], e["in_use"], e["source"], e["blocking"]) == \
        (f"concurrent_executions.{key}", 2, 2, "tenant", True)
    e = explain(db, other, None, key)["key"]
    assert (e["limit"], e["in_use"], e["source"], e["blocking"]) == (1, 1, "global", True)
    assert explain(db, other, None, free)["key"]["in_use"] == 1
    assert blocked(metrics(db), "key_limit") > blocked(m0, "key_limit")
    assert claim(db, "pgboss", q, batch=20) == []


def test_total_limit(cluster, cdb, db):
    tenants = [str(uuid.uuid4()) for _ in range(3)]
    set_limit(db, "concurrent_executions_total", 4)
    q = new_boss_queue(cluster, cdb)
    for t in tenants:
        send(cluster, cdb, q, [{"tenant_id": t}] * 3)
    bind(db, "pgboss", q)
    m0 = metrics(db)
    got = _claim_one_by_one(db, "pgboss", q)
    assert len(got) == 4
    assert sorted(Counter(str(c["tenant_id"]) for c in got).values()) == [1, 1, 2]     # fair, too
    e = explain(db, tenants[0])["total"]
    assert (e["resource"], e["limit"], e["in_use"], e["source"], e["blocking"]) == \
        ("concurrent_executions_total", 4, 4, "global", True)
    assert blocked(metrics(db), "total_limit") > blocked(m0, "total_limit")
    # A plain slot is refused by the total too.
    row = db.execute(f"SELECT granted, reason FROM {S}.acquire_execution_slot(%s)", (str(uuid.uuid4()),)).fetchone()
    assert row == (False, "total_limit")


def test_cost_counts_against_every_limit(cluster, cdb, db, tenant):
    t2, t3 = str(uuid.uuid4()), str(uuid.uuid4())
    set_limit(db, "concurrent_executions", 5, tenant)
    q = new_boss_queue(cluster, cdb)
    ids = send(cluster, cdb, q, [{"tenant_id": tenant, "cost": c} for c in (3, 2, 1)])
    bind(db, "pgboss", q, cost_path="cost")
    m0 = metrics(db)
    got = claim(db, "pgboss", q, batch=10)
    assert [c["job_id"] for c in got] == ids[:2]              # 3 + 2 = 5; the 1 would make 6
    assert db.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0] == 5
    assert explain(db, tenant)["tenant"]["in_use"] == 5
    m1 = metrics(db)
    assert m1["meshhook_limits_claimed_cost_total"] - m0["meshhook_limits_claimed_cost_total"] == 5
    assert m1["meshhook_limits_claims_total"] - m0["meshhook_limits_claims_total"] == 2
    # The cost-3 job ends: 2 in use, the cost-1 job fits.
    boss(cluster, cdb, "complete", name=q, ids=[ids[0]])
    tick(db)
    assert [c["job_id"] for c in claim(db, "pgboss", q, batch=10)] == [ids[2]]
    assert explain(db, tenant)["tenant"]["in_use"] == 3

    # Total 4 (the tenant holds 3): a cost-2 job of t2 is refused, a cost-1
    # job of t3 behind it in the same batch is claimed.
    set_limit(db, "concurrent_executions_total", 4)
    [big] = send(cluster, cdb, q, [{"tenant_id": t2, "cost": 2}])
    [small] = send(cluster, cdb, q, [{"tenant_id": t3, "cost": 1}])
    time.sleep(0.12)        # claim_jobs reuses the tenants it found for 100 ms: these are new
    got = claim(db, "pgboss", q, batch=10)
    assert [c["job_id"] for c in got] == [small]
    assert explain(db, t2)["total"]["in_use"] == 4
    assert boss_rows(db, q, [big])[big]["state"] == "created"
    # A job costing more than its tenant's whole limit is never claimed.
    db.execute(f"SELECT {S}.clear_limit('concurrent_executions_total')")
    set_limit(db, "concurrent_executions", 2, t3)
    [huge] = send(cluster, cdb, q, [{"tenant_id": t3, "cost": 3}])
    got = claim(db, "pgboss", q, batch=10)
    assert [c["job_id"] for c in got] == [big]
    assert boss_rows(db, q, [huge])[huge]["state"] == "created"


# --------------------------------------------------------------------------- 5. never over-admit

def test_never_over_admit_under_concurrent_claimers(cluster, cdb, db):
    """16 claimers (autocommit; transactions that commit or roll back;
    backends terminated mid-transaction, also mid-claim) on a pg-boss and a
    pgmq queue against tenant, project, key and total limits with costs,
    while a ticker ends finished claims, pg-boss's own fetch takes jobs from
    the same queue, and a sampler checks every limit on slots() (and the
    counters explain_admission reads) at each instant."""
    rnd = random.Random(1234)
    T = [str(uuid.uuid4()) for _ in range(4)]
    P = str(uuid.uuid4())
    key = uniq("k")
    total = 9
    tenant_limit = {T[0]: 4, T[1]: 3, T[2]: 6}
    set_limit(db, "concurrent_executions", 4, T[0])
    set_limit(db, "concurrent_executions", 3, T[1])
    set_limit(db, "concurrent_executions", 2, T[1], P)
    set_limit(db, "concurrent_executions", 6, T[2])
    set_limit(db, f"concurrent_executions.{key}", 2)
    set_limit(db, "concurrent_executions_total", total)
    paths = dict(project_path="meta.project", key_path="meta.key", cost_path="meta.cost")

    def job(t):
        meta = {"cost": rnd.choice([1, 1, 2, 3])}
        if rnd.random() < 0.4:
            meta["key"] = key
        if t == T[1] and rnd.random() < 0.6:
            meta["project"] = P
        elif rnd.random() < 0.3:
            meta["project"] = str(uuid.uuid4())
        return {"tenant_id": t, "meta": meta}

    q = new_boss_queue(cluster, cdb, retryLimit=0)
    mq = uniq("mqc")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    info = {}          # (binding, job id) -> (tenant, project, key, cost)
    bdatas = [job(t) for t in T for _ in range(250)]
    rnd.shuffle(bdatas)
    bids = send(cluster, cdb, q, bdatas)
    mdatas = [job(t) for t in T for _ in range(100)]
    mids = mq_send(db, mq, mdatas)
    bb = bind(db, "pgboss", q, **paths)
    bm = bind(db, "pgmq", mq, **paths)
    for b, ids, datas in ((bb, bids, bdatas), (bm, mids, mdatas)):
        for i, d in zip(ids, datas):
            m = d["meta"]
            info[(b, str(i))] = (d["tenant_id"], m.get("project"), m.get("key"), m["cost"])

    m0 = metrics(db)
    stop = threading.Event()
    errors, violations = [], []
    stats = Counter()
    lock = threading.Lock()
    maxima = Counter()

    def note(k, n=1):
        with lock:
            stats[k] += n

    def finish(conn, rows, source, release_some, r):
        if source == "pgboss":
            ids = [c["job_id"] for c in rows]
            assert boss_complete_sql(conn, q, ids) == len(ids)
        else:
            for c in rows:
                if r.random() < 0.3:      # a crashed worker: visible again
                    conn.execute("SELECT pgmq.set_vt(%s, %s::bigint, 0)", (mq, int(c["job_id"])))
                else:
                    conn.execute("SELECT pgmq.archive(%s, %s::bigint)", (mq, int(c["job_id"])))
        if release_some:
            for c in rows:
                conn.execute(f"SELECT {S}.release_execution_slot(%s)", (c["slot_id"],))

    claimed_ids, fetched_ids = set(), set()

    def committed(source, rows):
        if source == "pgboss":
            with lock:
                claimed_ids.update(c["job_id"] for c in rows)

    def fetcher():
        """pg-boss's own workers on the same queue (fetchNextJob's statement),
        taking jobs without slots: claims and fetches never share a job."""
        with cluster.connect(dbname=cdb) as c:
            while not stop.is_set():
                try:
                    ids = [str(r[0]) for r in c.execute(
                        "WITH next AS (SELECT id FROM pgboss.job WHERE name = %s AND state < 'active' "
                        "  AND start_after < now() ORDER BY priority DESC, created_on, id LIMIT 2 "
                        "  FOR UPDATE SKIP LOCKED) "
                        "UPDATE pgboss.job j SET state = 'active', started_on = now(), "
                        "  retry_count = CASE WHEN started_on IS NOT NULL THEN retry_count + 1 ELSE retry_count END "
                        "FROM next WHERE name = %s AND j.id = next.id RETURNING j.id", (q, q)).fetchall()]
                    with lock:
                        fetched_ids.update(ids)
                    time.sleep(0.01)
                    if ids:
                        boss_complete_sql(c, q, ids)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"fetcher: {e!r}")
                time.sleep(0.05)

    def claimer(i):
        r = random.Random(i)
        conn = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = cluster.connect(dbname=cdb, application_name=f"claimer{i}")
                source = r.choice(["pgboss", "pgmq"])
                queue = q if source == "pgboss" else mq
                batch = r.randint(1, 3)
                mode = r.random()
                if mode < 0.5:
                    rows = claim(conn, source, queue, batch, "30 seconds")
                    note("claimed", len(rows))
                    committed(source, rows)
                    time.sleep(r.random() * 0.02)
                    finish(conn, rows, source, r.random() < 0.3, r)
                elif mode < 0.85:
                    conn.execute("BEGIN")
                    rows = claim(conn, source, queue, batch, "30 seconds")
                    time.sleep(r.random() * 0.01)
                    if r.random() < 0.5:
                        conn.execute("ROLLBACK")
                        note("rolled_back", len(rows))
                    else:
                        conn.execute("COMMIT")
                        note("claimed", len(rows))
                        committed(source, rows)
                        time.sleep(r.random() * 0.02)
                        finish(conn, rows, source, False, r)
                else:
                    # Terminated mid-transaction, after the claim or while it runs.
                    pid = conn.info.backend_pid
                    conn.execute("BEGIN")
                    with cluster.connect(dbname=cdb) as killer:
                        if r.random() < 0.5:
                            claim(conn, source, queue, batch, "30 seconds")
                            killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
                        else:
                            t = threading.Timer(r.random() * 0.003,
                                                lambda: killer.execute("SELECT pg_terminate_backend(%s)", (pid,)))
                            t.start()
                            try:
                                claim(conn, source, queue, batch, "30 seconds")
                            except psycopg.OperationalError:
                                pass
                            t.join()
                    try:
                        conn.execute("COMMIT")
                    except psycopg.OperationalError:
                        pass
                    note("killed")
                    conn.close()
                    conn = None
            except psycopg.OperationalError as e:      # a termination we asked for
                if "terminat" not in str(e) and "closed" not in str(e) and "consuming input" not in str(e):
                    errors.append(f"claimer {i}: {e!r}")
                if conn is not None:
                    conn.close()
                conn = None
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"claimer {i}: {e!r}")
                if conn is not None and not conn.closed:
                    try:
                        conn.rollback()
                    except psycopg.Error:
                        conn.close()
        if conn is not None:
            conn.close()

    def ticker():
        with cluster.connect(dbname=cdb) as c:
            while not stop.is_set():
                try:
                    w = tick(c)
                    if w:
                        errors.append(f"tick warnings: {w}")
                    note("ticks")
                except Exception as e:  # noqa: BLE001
                    errors.append(f"tick: {e!r}")
                time.sleep(0.05)

    def sampler():
        with cluster.connect(dbname=cdb) as c:
            while not stop.is_set():
                rows = c.execute(f"SELECT tenant_id::text, project_id::text, run_id FROM {S}.slots() "
                                 "WHERE state = 'live'").fetchall()
                ten, proj, keyu, tot = Counter(), Counter(), Counter(), 0
                for t, p, run in rows:
                    if not run or not run.startswith("claim/"):
                        violations.append(f"a slot not of a claim: {t} {run}")
                        continue
                    _, b, j = run.split("/", 2)
                    jt, jp, jk, cost = info[(int(b), j.split("/")[0])]
                    if jt != t or (jp or None) != (p or None):
                        violations.append(f"slot {run} has tenant {t} project {p}, its job {jt} {jp}")
                    ten[t] += cost
                    tot += cost
                    if jp:
                        proj[(t, jp)] += cost
                    if jk:
                        keyu[(t, jk)] += cost
                if tot > total:
                    violations.append(f"total {tot} > {total}: {rows}")
                for t, n in ten.items():
                    if n > tenant_limit.get(t, 1024):
                        violations.append(f"tenant {t} runs {n} > {tenant_limit.get(t)}")
                if proj[(T[1], P)] > 2:
                    violations.append(f"project runs {proj[(T[1], P)]} > 2")
                for (t, k), n in keyu.items():
                    if n > 2:
                        violations.append(f"key {k} of {t} runs {n} > 2")
                with lock:
                    maxima["total"] = max(maxima["total"], tot)
                    for t, n in ten.items():
                        maxima[t] = max(maxima[t], n)
                    stats["samples"] += 1
                # The counters explain_admission reads, too.
                for t in T:
                    for e in c.execute(f"SELECT scope, limit_value, in_use FROM {S}.explain_admission(%s, %s, %s)",
                                       (t, P if t == T[1] else None, key)).fetchall():
                        if e[1] is not None and e[2] is not None and e[2] > e[1]:
                            violations.append(f"explain_admission {t} {e}")

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=ticker), threading.Thread(target=sampler), threading.Thread(target=fetcher)]
    for t in threads:
        t.start()

    def enough():
        with lock:
            return (stats["claimed"] >= 100 and stats["rolled_back"] >= 10 and stats["killed"] >= 10
                    and stats["samples"] >= 100 and fetched_ids and claimed_ids)
    # Until every count is reached (a busy machine takes longer), at least
    # 6 s, at most 120 s.
    started = time.monotonic()
    while time.monotonic() - started < 120 and (time.monotonic() - started < 6 or not enough()):
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a claimer hung"
    assert errors == [], errors[:5]
    assert violations == [], violations[:5]
    m1 = metrics(db)
    assert stats["claimed"] >= 100 and stats["rolled_back"] >= 10 and stats["killed"] >= 10, stats
    assert stats["samples"] >= 100, stats
    assert blocked(m1, "total_limit") + blocked(m1, "tenant_limit") > blocked(m0, "total_limit") + \
        blocked(m0, "tenant_limit"), "the claimers never pressed a limit"
    assert maxima["total"] >= total - 2, maxima
    assert fetched_ids and claimed_ids and not (fetched_ids & claimed_ids), \
        f"{len(fetched_ids & claimed_ids)} jobs both claimed and fetched by pg-boss"

    # Every claimed job ends: nothing is left.
    db.execute("UPDATE pgboss.job SET state = 'completed', completed_on = now() WHERE name = %s AND state = 'active'",
               (q,))
    db.execute(f"SELECT pgmq.archive(%s, msg_id) FROM {qtable(db, mq)} WHERE read_ct > 0 AND vt > clock_timestamp()",
               (mq,))
    assert tick(db) == []
    left = live_slots(db)
    assert left == {}, f"{len(left)} slots left after every job ended: {list(left.values())[:3]}"
    for t in T:
        e = explain(db, t, P, key)
        assert (e["tenant"]["in_use"], e["key"]["in_use"], e["project"]["in_use"], e["total"]["in_use"]) == \
            (0, 0, 0, 0)
    # No job claimed by a rolled-back or killed transaction stayed taken.
    assert db.execute("SELECT count(*) FROM pgboss.job WHERE name = %s AND state = 'active'", (q,)).fetchone()[0] == 0


# --------------------------------------------------------------------------- 6. fairness

@pytest.mark.smoke
def test_quiet_tenants_are_not_behind_a_noisy_backlog(cluster, cdb, db):
    noisy = str(uuid.uuid4())
    quiet = [str(uuid.uuid4()) for _ in range(5)]
    q = new_boss_queue(cluster, cdb)
    noisy_ids = send(cluster, cdb, q, [{"tenant_id": noisy}] * 2000)       # enqueued first
    quiet_ids = {}
    for t in quiet:
        quiet_ids[t] = send(cluster, cdb, q, [{"tenant_id": t}] * 20)
    bind(db, "pgboss", q)
    # FIFO would serve the 2000 noisy jobs first: pg-boss's own order.
    order = []
    for rnd_ in range(20):
        got = claim(db, "pgboss", q, batch=6)
        assert len(got) == 6
        assert {str(c["tenant_id"]) for c in got} == {noisy, *quiet}, \
            f"batch {rnd_} is not one job of each of the 6 tenants: {Counter(str(c['tenant_id']) for c in got)}"
        order += got
    by_tenant = defaultdict(list)
    for c in order:
        by_tenant[str(c["tenant_id"])].append(c["job_id"])
    assert by_tenant[noisy] == noisy_ids[:20]                 # each in its queue order
    for t in quiet:
        assert by_tenant[t] == quiet_ids[t]
    # The quiet tenants are served out: only the noisy one is left.
    got = claim(db, "pgboss", q, batch=6)
    assert [str(c["tenant_id"]) for c in got] == [noisy] * 6
    assert [c["job_id"] for c in got] == noisy_ids[20:26]
    # The first of the queue was served first: the noisy tenant's oldest job.
    assert order[0]["job_id"] == noisy_ids[0]


def test_weights_share_contended_capacity(cluster, cdb, db):
    """Three saturated tenants of weights 1, 2, 4 behind a total limit of 7:
    whoever's jobs end, the claimed counts stay within one job of 1/7, 2/7,
    4/7 of all claims, and are exactly that every 7 claims (start-time fair
    queuing; ties to the heavier)."""
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    set_limit(db, "fair_share_weight", 1, a)
    set_limit(db, "fair_share_weight", 2, b)
    set_limit(db, "fair_share_weight", 4, c)
    set_limit(db, "concurrent_executions_total", 7)
    q = new_boss_queue(cluster, cdb)
    for t in (a, b, c):                      # a's jobs are the oldest: FIFO would give it all 7
        send(cluster, cdb, q, [{"tenant_id": t}] * 30)
    bind(db, "pgboss", q)
    assert db.execute(f"SELECT limit_value, source FROM {S}.explain_admission(%s) "
                      "WHERE resource = 'fair_share_weight'", (c,)).fetchone() == (4, "tenant")
    running, claimed = {}, Counter()

    def claim_all():
        for x in claim(db, "pgboss", q, batch=7):
            running[x["job_id"]] = str(x["tenant_id"])
            claimed[str(x["tenant_id"])] += 1
        n = sum(claimed.values())
        for t, w in ((a, 1), (b, 2), (c, 4)):
            assert abs(claimed[t] - n * w / 7) <= 1, (n, claimed[a], claimed[b], claimed[c])
        return n
    assert claim_all() == 7
    assert (claimed[a], claimed[b], claimed[c]) == (1, 2, 4)
    # Jobs end at random, three at a time (a tenant may run more or fewer
    # than its share for a while; its claims follow its weight).
    r = random.Random(7)
    for _ in range(7):
        done = r.sample(sorted(running), 3)
        boss(cluster, cdb, "complete", name=q, ids=done)
        for j in done:
            del running[j]
        tick(db)
        claim_all()
    assert (claimed[a], claimed[b], claimed[c]) == (4, 8, 16)
    assert len(running) == 7
    assert claim(db, "pgboss", q, batch=7) == []


def test_a_tenant_that_claimed_alone_is_not_held_back_when_others_come(cluster, cdb, db):
    """Start-time fair queuing gives no credit for idleness and takes none
    for claiming alone: a tenant that claimed 20 jobs while nobody else had
    any is one claim ahead of a newcomer, not 20. The two then take turns."""
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    q = new_boss_queue(cluster, cdb)
    send(cluster, cdb, q, [{"tenant_id": a}] * 30)
    bind(db, "pgboss", q)
    for _ in range(20):
        [x] = claim(db, "pgboss", q)
        assert str(x["tenant_id"]) == a
    send(cluster, cdb, q, [{"tenant_id": b}] * 10)
    time.sleep(0.15)                       # the backend's tenant list is renewed
    got = [str(x["tenant_id"]) for _ in range(6) for x in claim(db, "pgboss", q)]
    assert got == [b, a, b, a, b, a], got


def test_a_batch_claims_what_single_claims_would(cluster, cdb, db):
    """Tenants a and b at equal start tags: the tie goes to the tenant that
    has waited longest, since its next job was queued or since its last
    claim, whichever is later. In one batch, as in one claim at a time, the
    order is a1 b1 a2 b2 (a was served before b, so a2 goes before b2,
    though b2 is older: equal tenants take turns)."""
    orders = []
    for batch in (1, 4):
        a, b = str(uuid.uuid4()), str(uuid.uuid4())
        q = new_boss_queue(cluster, cdb)
        [a1] = send(cluster, cdb, q, [{"tenant_id": a, "n": "a1"}])
        [b1] = send(cluster, cdb, q, [{"tenant_id": b, "n": "b1"}])
        [b2] = send(cluster, cdb, q, [{"tenant_id": b, "n": "b2"}])
        [a2] = send(cluster, cdb, q, [{"tenant_id": a, "n": "a2"}])
        bind(db, "pgboss", q)
        got = []
        while len(got) < 4:
            more = claim(db, "pgboss", q, batch=batch)
            assert more
            got += more
        orders.append([x["data"]["n"] for x in got])
    assert orders[0] == ["a1", "b1", "a2", "b2"]
    assert orders[1] == orders[0], f"one claim at a time: {orders[0]}, one batch: {orders[1]}"


# --------------------------------------------------------------------------- 7. invalid jobs

def test_invalid_jobs_are_never_claimed_and_never_fail_the_call(cluster, cdb, db, tenant):
    p = str(uuid.uuid4())
    q = new_boss_queue(cluster, cdb)
    bad = [{}, {"tenant_id": "bogus"}, {"tenant_id": None}, {"tenant_id": 123},
           {"tenant_id": {"id": tenant}},
           {"tenant_id": tenant, "project": "nope"},
           {"tenant_id": tenant, "project": {"id": p}},
           {"tenant_id": tenant, "cost": 0},
           {"tenant_id": tenant, "cost": -1},
           {"tenant_id": tenant, "cost": "x"},
           {"tenant_id": tenant, "cost": 1.5},
           {"tenant_id": tenant, "cost": 1000001},
           {"tenant_id": tenant, "key": ""},
           {"tenant_id": tenant, "key": "k" * 201}]
    good = [{"tenant_id": tenant, "project": p, "key": "k" * 200, "cost": 2},
            {"tenant_id": tenant}]
    bad_ids = send(cluster, cdb, q, bad)
    good_ids = send(cluster, cdb, q, good)
    bind(db, "pgboss", q, project_path="project", key_path="key", cost_path="cost")
    mq = uniq("mqbad")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    mbad = mq_send(db, mq, bad)
    mgood = mq_send(db, mq, good)
    bind(db, "pgmq", mq, project_path="project", key_path="key", cost_path="cost")
    before = boss_rows(db, q, bad_ids)
    mbefore = mq_rows(db, mq)
    m0 = metrics(db)
    got = claim(db, "pgboss", q, batch=100)
    assert [c["job_id"] for c in got] == good_ids
    assert got[0]["concurrency_key"] == "k" * 200 and str(got[0]["project_id"]) == p
    m1 = metrics(db)
    # 9 invalid jobs of the tenant, 3 tenants that are not uuids (the
    # missing and null tenants: see test_jobs_without_a_tenant_count_as_invalid).
    assert blocked(m1, "invalid_job") - blocked(m0, "invalid_job") >= 1
    # Left exactly as they were: out of their tenant's range of the claim
    # index, so they stand in front of nothing.
    assert boss_rows(db, q, bad_ids) == before
    assert explain(db, tenant)["tenant"]["in_use"] == 3
    got = claim(db, "pgmq", mq, batch=100)
    assert [c["job_id"] for c in got] == [str(m) for m in mgood]
    after = mq_rows(db, mq)
    assert {m: after[m] for m in mbad} == {m: mbefore[m] for m in mbad}
    eq = {r[0]: r[1:] for r in db.execute(f"SELECT source, waiting, invalid, runnable FROM {S}.explain_queues(%s)",
                                          (tenant,)).fetchall()}
    assert eq["pgboss"] == (9, 9, 0) and eq["pgmq"] == (9, 9, 0), eq
    # Again: nothing left to claim, still no error.
    assert claim(db, "pgboss", q, batch=100) == []
    assert claim(db, "pgmq", mq, batch=1000) == []


def test_many_invalid_jobs_do_not_stall_claiming(cluster, cdb, db, tenant):
    """A tenant whose queue head is 1,000 invalid jobs (a bad cost, say) must
    not make every claim_jobs call on the queue slow: the other tenants'
    jobs are claimed, and so is nothing after them, each call looking at no
    more than 16 of the invalid jobs (the most passed over per tenant per
    call), not all 1,000. Counted (claim_blocked_total{reason=invalid_job}),
    not timed, so a busy machine cannot fail it."""
    other = str(uuid.uuid4())
    q = new_boss_queue(cluster, cdb)
    send(cluster, cdb, q, [{"tenant_id": tenant, "cost": "x"}] * 1000)
    [good] = send(cluster, cdb, q, [{"tenant_id": other}])
    bind(db, "pgboss", q, cost_path="cost")
    db.execute("SET statement_timeout = '60s'")   # guard: the test must not hang
    try:
        for want in ([good], []):
            seen = blocked(metrics(db), "invalid_job")
            got = claim(db, "pgboss", q, batch=10)
            looked_at = blocked(metrics(db), "invalid_job") - seen
            assert [c["job_id"] for c in got] == want
            assert looked_at <= 16, f"claim_jobs looked at {looked_at:.0f} invalid jobs of one tenant"
    finally:
        db.execute("RESET statement_timeout")


def test_invalid_jobs_at_the_head_do_not_hold_back_the_tenants_valid_job(cluster, cdb, db, tenant):
    """Forty jobs that can never be claimed (a bad cost, project or key)
    ahead of a valid one of the same tenant (higher priority; pgmq: sent
    first): the valid job is claimed by the first call (before, 16 invalid
    jobs a call were passed over, and the valid one never came), and the
    invalid ones are left as they are."""
    q = new_boss_queue(cluster, cdb)
    bads = [{"tenant_id": tenant, "cost": "x"}, {"tenant_id": tenant, "project": "nope"},
            {"tenant_id": tenant, "api": ""}, {"tenant_id": tenant, "cost": 0}] * 10
    bad = send(cluster, cdb, q, bads, priority=5)
    [good] = send(cluster, cdb, q, [{"tenant_id": tenant}])
    bind(db, "pgboss", q, cost_path="cost", project_path="project", key_path="api")
    mq = uniq("mqhead")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    mq_send(db, mq, bads)
    [mgood] = mq_send(db, mq, [{"tenant_id": tenant}])
    bind(db, "pgmq", mq, cost_path="cost", project_path="project", key_path="api")
    before = boss_rows(db, q, bad)
    assert [c["job_id"] for c in claim(db, "pgboss", q)] == [good]
    assert [c["job_id"] for c in claim(db, "pgmq", mq)] == [str(mgood)]
    assert boss_rows(db, q, bad) == before


def test_jobs_without_a_tenant_count_as_invalid(cluster, cdb, db):
    """A job without a tenant (missing or JSON null) is never claimed; like
    any invalid job it is counted in claim_blocked_total{reason=invalid_job},
    or an operator never learns it sits in the queue forever."""
    q = new_boss_queue(cluster, cdb)
    send(cluster, cdb, q, [{}, {"tenant_id": None}])
    bind(db, "pgboss", q)
    m0 = metrics(db)
    assert claim(db, "pgboss", q, batch=10) == []
    assert blocked(metrics(db), "invalid_job") > blocked(m0, "invalid_job")


# --------------------------------------------------------------------------- 8. bad input and security

def _refusal(conn, query, params=None):
    try:
        with conn.transaction():
            conn.execute(query, params)
    except psycopg.Error as e:
        return e.sqlstate, e.diag.message_primary, e.diag.message_hint
    return None


def test_bad_input(cluster, cdb, db, tenant):
    q = new_boss_queue(cluster, cdb)
    mq = uniq("mqin")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    n0 = db.execute(f"SELECT count(*) FROM {S}.queue_bindings").fetchone()[0]
    idx0 = db.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'meshhook_claim_%'").fetchone()[0]
    cases = [
        # (call, params, message fragment, hint fragment)
        (f"SELECT {S}.bind_queue('rabbitmq', %s)", (q,), "unknown queue source", "'pgboss' or 'pgmq'"),
        (f"SELECT {S}.bind_queue(NULL, %s)", (q,), "unknown queue source", "'pgboss' or 'pgmq'"),
        (f"SELECT {S}.bind_queue('pgboss', %s)", (uniq("nope"),), "unknown pg-boss queue", "createQueue"),
        (f"SELECT {S}.bind_queue('pgmq', %s)", (uniq("nope"),), "unknown pgmq queue", "pgmq.create"),
        (f"SELECT {S}.bind_queue('pgmq', %s)", (q,), "unknown pgmq queue", "pgmq.create"),
        (f"SELECT {S}.bind_queue('pgboss', %s)", ("",), "queue", None),
        (f"SELECT {S}.bind_queue('pgboss', %s, NULL)", (q,), "tenant_path", None),
    ]
    for path_arg in ("tenant_path", "project_path", "key_path", "cost_path"):
        for bad in ("", "a..b", "a b", "a'b", ".a", "a.", "a;b", "a" * 64, ".".join("abcdefghi"), "é"):
            cases.append((f"SELECT {S}.bind_queue('pgboss', %s, {path_arg} => %s)", (q, bad),
                          f"invalid {path_arg}", "dot-separated"))
    cases += [
        (f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,), "is not bound", "bind_queue"),
        (f"SELECT * FROM {S}.claim_jobs('pgmq', %s)", (mq,), "is not bound", "bind_queue"),
        (f"SELECT * FROM {S}.claim_jobs('rabbitmq', %s)", (q,), "is not bound", "bind_queue"),
        (f"SELECT * FROM {S}.claim_jobs('pgboss', %s, 0)", (q,), "batch", None),
        (f"SELECT * FROM {S}.claim_jobs('pgboss', %s, 1001)", (q,), "batch", None),
        (f"SELECT * FROM {S}.claim_jobs('pgboss', %s, NULL)", (q,), "batch", None),
        (f"SELECT {S}.set_limit('concurrent_executions_total', 5, %s)", (tenant,), "global only", None),
        (f"SELECT {S}.set_limit('fair_share_weight', 0.0009, %s)", (tenant,), "fair_share_weight", "relative"),
        (f"SELECT {S}.set_limit('fair_share_weight', 1000001, %s)", (tenant,), "fair_share_weight", "relative"),
        (f"SELECT {S}.set_limit('concurrent_executions.x', 1.5, %s)", (tenant,), "whole number", None),
    ]
    plan = uniq("claimplan")
    db.execute(f"SELECT {S}.create_plan(%s)", (plan,))
    try:
        cases.append((f"SELECT {S}.set_plan_limit(%s, 'concurrent_executions_total', 5)", (plan,),
                      "concurrent_executions_total", None))
        for call, params, msg, hint in cases:
            got = _refusal(db, call, params)
            assert got is not None, f"accepted: {call} {params}"
            assert got[0] == "22023", (call, params, got)
            assert msg in got[1], (call, params, got)
            if hint:
                assert got[2] and hint in got[2], (call, params, got)
    finally:
        db.execute(f"SELECT {S}.drop_plan(%s)", (plan,))
    assert db.execute(f"SELECT count(*) FROM {S}.queue_bindings").fetchone()[0] == n0
    assert db.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'meshhook_claim_%'").fetchone()[0] == idx0
    assert db.execute(f"SELECT {S}.unbind_queue('pgboss', %s)", (q,)).fetchone()[0] is False
    # The accepted edges.
    db.execute(f"SELECT {S}.set_limit('fair_share_weight', 0.001, %s)", (tenant,))
    db.execute(f"SELECT {S}.set_limit('fair_share_weight', 1000000, %s)", (tenant,))
    bind(db, "pgboss", q, tenant_path=".".join("abcdefgh"), project_path="A-b_9", key_path="x", cost_path="y")


def test_set_limit_refuses_an_empty_concurrency_key(db):
    """concurrent_executions.<key> with an empty key: no job can have that key
    (claim_jobs treats key '' as invalid), so the limit could never apply."""
    got = _refusal(db, f"SELECT {S}.set_limit('concurrent_executions.', 1)")
    if got is None:
        db.execute(f"SELECT {S}.clear_limit('concurrent_executions.')")
    assert got is not None and got[0] == "22023", got


def test_bind_rebind_unbind_manage_the_index(cluster, cdb, db, tenant):
    q = new_boss_queue(cluster, cdb)
    [j] = send(cluster, cdb, q, [{"tenant_id": tenant, "k": "x", "meta": {"t": tenant}}])

    def triggers(bid):
        return db.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'pgboss.job'::regclass "
                          "AND tgname LIKE %s", (f"meshhook\\_claim\\_{bid}\\_%",)).fetchone()[0]

    def indexes():
        """The claim index of q (each comes with its _due and _at indexes,
        checked here)."""
        all_ = db.execute("SELECT c.relname, pg_get_indexdef(c.oid) FROM pg_index i "
                          "JOIN pg_class c ON c.oid = i.indexrelid "
                          "WHERE i.indrelid = 'pgboss.job'::regclass AND c.relname LIKE 'meshhook_claim_%%' "
                          "AND pg_get_indexdef(c.oid) LIKE %s ORDER BY 1", (f"%{q}%",)).fetchall()
        main = [(n, d) for n, d in all_ if not n.endswith(("_due", "_at"))]
        for suffix in ("_due", "_at"):
            assert sorted(n for n, _ in all_ if n.endswith(suffix)) == [n + suffix for n, _ in main]
        return main
    b1 = bind(db, "pgboss", q)
    [(name, ddl)] = indexes()
    assert name == f"meshhook_claim_{b1}" and f"'{q}'" in ddl and "'active'" in ddl
    # The same paths again: nothing changes.
    assert bind(db, "pgboss", q) == b1
    assert indexes() == [(name, ddl)]
    # Another key path: a new binding and index (the index leaves out jobs
    # whose key, project or cost can never be claimed), the old index gone.
    bk = bind(db, "pgboss", q, key_path="k")
    assert bk != b1
    [(namek, ddlk)] = indexes()
    assert namek == f"meshhook_claim_{bk}" and "'{k}'" in ddlk
    assert db.execute(f"SELECT key_path FROM {S}.queue_bindings WHERE id = %s", (bk,)).fetchone()[0] == ["k"]
    # Another tenant path: a new binding and index, the old index gone.
    b2 = bind(db, "pgboss", q, tenant_path="meta.t")
    assert b2 != bk
    [(name2, _)] = indexes()
    assert name2 == f"meshhook_claim_{b2}"
    assert triggers(b1) == 0 and triggers(bk) == 0 and triggers(b2) >= 1
    # Another bound queue keeps its own (unbinding one is not unbinding all).
    q2 = new_boss_queue(cluster, cdb)
    b3 = bind(db, "pgboss", q2)
    [c] = claim(db, "pgboss", q)
    assert c["job_id"] == j and str(c["tenant_id"]) == tenant
    assert db.execute(f"SELECT {S}.unbind_queue('pgboss', %s)", (q,)).fetchone()[0] is True
    assert indexes() == [] and triggers(b2) == 0 and triggers(b3) >= 1
    assert db.execute(f"SELECT {S}.unbind_queue('pgboss', %s)", (q,)).fetchone()[0] is False
    # Its claims keep their slots (until their lease), and ticks stay quiet.
    assert tick(db) == [] and str(c["slot_id"]) in live_slots(db, tenant)


def test_only_admins_bind_and_claim(cluster, cdb, db, tenant):
    q = new_boss_queue(cluster, cdb)
    send(cluster, cdb, q, [{"tenant_id": tenant}] * 3)
    bind(db, "pgboss", q)
    other = new_boss_queue(cluster, cdb)
    plain = uniq("claim_plain")
    db.execute(f"CREATE ROLE {plain} LOGIN")
    # The right to the queue tables is not what is missing.
    db.execute(f"GRANT USAGE ON SCHEMA pgboss TO {plain}")
    db.execute(f"GRANT SELECT, UPDATE ON ALL TABLES IN SCHEMA pgboss TO {plain}")
    calls = [(f"SELECT {S}.bind_queue('pgboss', %s)", (other,)),
             (f"SELECT {S}.unbind_queue('pgboss', %s)", (q,)),
             (f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,)),
             (f"SELECT * FROM {S}.claim_jobs('pgboss', %s, 5, '1 minute')", (q,))]
    before = boss_rows(db, q)
    try:
        with cluster.connect(dbname=cdb, user=plain) as c:
            for call, params in calls:
                got = _refusal(c, call, params)
                assert got and got[0] == "42501" and "only administrators" in got[1], (call, got)
        with cluster.connect(dbname=cdb, user="authenticator") as c:
            for role, claims in (("authenticated", claims_of(tenant)), ("anon", None)):
                for call, params in calls:
                    with pytest.raises(psycopg.Error) as e:
                        rpc(c, claims, call, params, role=role)
                    assert sqlstate(e) == "42501" and "only administrators" in str(e.value), (role, call)
                assert rpc(c, claims, f"SELECT * FROM {S}.queue_bindings", role=role) == []
    finally:
        db.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA pgboss FROM {plain}")
        db.execute(f"REVOKE USAGE ON SCHEMA pgboss FROM {plain}")
        db.execute(f"DROP ROLE {plain}")
    assert boss_rows(db, q) == before
    assert db.execute(f"SELECT count(*) FROM {S}.queue_bindings WHERE queue = %s", (other,)).fetchone()[0] == 0
    assert live_slots(db, tenant) == {}


def test_service_role_and_admin_members_claim(cluster, cdb, db, tenant):
    """claim_jobs runs as its caller: an admin that is not a superuser
    (service_role over RPC, a login role granted meshhook_limits_admin),
    with rights on the queue tables, claims."""
    q = new_boss_queue(cluster, cdb)
    ids = send(cluster, cdb, q, [{"tenant_id": tenant}] * 2)
    mq = uniq("mqadm")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    [m] = mq_send(db, mq, [{"tenant_id": tenant}])
    bind(db, "pgboss", q)
    bind(db, "pgmq", mq)
    member = uniq("claim_admin")
    db.execute(f"CREATE ROLE {member} LOGIN IN ROLE meshhook_limits_admin")
    roles = f"service_role, {member}"
    db.execute(f"GRANT USAGE ON SCHEMA pgboss, pgmq TO {roles}")
    db.execute(f"GRANT SELECT, UPDATE ON pgboss.job, {qtable(db, mq)} TO {roles}")
    try:
        with cluster.connect(dbname=cdb, user="authenticator") as c:
            got = rpc(c, {"role": "service_role"}, f"SELECT job_id FROM {S}.claim_jobs('pgboss', %s)", (q,),
                      role="service_role")
            assert got == [(ids[0],)]
        with cluster.connect(dbname=cdb, user=member) as c:
            assert claim(c, "pgboss", q)[0]["job_id"] == ids[1]
            assert claim(c, "pgmq", mq)[0]["job_id"] == str(m)
            c.execute(f"SELECT {S}.bind_queue('pgboss', %s, key_path => 'k')", (q,))
        # An admin without the queue system's rights on its tables: 42501 from
        # PostgreSQL, also in a backend where a superuser claimed before
        # (claim_jobs keeps its statements prepared).
        bare = uniq("claim_bare")
        db.execute(f"CREATE ROLE {bare} LOGIN IN ROLE meshhook_limits_admin")
        try:
            send(cluster, cdb, q, [{"tenant_id": tenant}] * 2)
            time.sleep(0.01)
            with cluster.connect(dbname=cdb) as c:
                assert len(claim(c, "pgboss", q)) == 1
                c.execute(f"SET ROLE {bare}")
                got = _refusal(c, f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,))
                assert got and got[0] == "42501" and "permission denied" in got[1], got
            with cluster.connect(dbname=cdb, user=bare) as c:
                got = _refusal(c, f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,))
                assert got and got[0] == "42501" and "permission denied" in got[1], got
                # The hint gives the GRANTs for this role (issue 22).
                assert f"GRANT USAGE ON SCHEMA pgboss TO {bare}" in got[2], got
                assert f"GRANT SELECT, UPDATE ON pgboss.job TO {bare}" in got[2], got
        finally:
            db.execute(f"DROP ROLE {bare}")
    finally:
        db.execute(f"REVOKE ALL ON pgboss.job, {qtable(db, mq)} FROM {roles}")
        db.execute(f"REVOKE USAGE ON SCHEMA pgboss, pgmq FROM {roles}")
        db.execute(f"DROP ROLE {member}")
    assert db.execute(f"SELECT {S}.live_slots(%s)", (tenant,)).fetchone()[0] == 4
    assert db.execute("SELECT count(*) FROM pgboss.job WHERE name = %s AND state = 'created'", (q,)).fetchone()[0] == 1


def test_hostile_queue_names(cluster, cdb, db, tenant):
    """A pg-boss queue whose name has a quote (made through pg-boss's own SQL
    function: its JS wrapper breaks on quotes) and a pgmq queue with every
    character pgmq allows that SQL cares about: bound and claimed as data."""
    db.execute("CREATE TABLE IF NOT EXISTS public.claim_canary (id int)")
    suffix = uuid.uuid4().hex[:4]
    bq = f"it's'); DROP TABLE public.claim_canary; --{suffix}"
    db.execute("SELECT pgboss.create_queue(%s, '{\"policy\": \"standard\"}'::jsonb)", (bq,))
    db.execute("INSERT INTO pgboss.job (name, data) SELECT %s, jsonb_build_object('tenant_id', %s::text, 'i', g) "
               "FROM generate_series(1, 3) g", (bq, tenant))
    mq = f'Odd "Q".x-%I %s\\ (é) {suffix}'
    db.execute("SELECT pgmq.create(%s)", (mq,))
    assert db.execute("SELECT queue_name FROM pgmq.meta WHERE queue_name = %s", (mq,)).fetchone()
    [m] = mq_send(db, mq, [{"tenant_id": tenant}])
    bb = bind(db, "pgboss", bq, key_path="i")
    bm = bind(db, "pgmq", mq)
    time.sleep(0.01)
    got = claim(db, "pgboss", bq, batch=2)
    assert len({c["data"]["i"] for c in got}) == 2
    assert [c["concurrency_key"] for c in got] == [str(c["data"]["i"]) for c in got]
    assert db.execute("SELECT count(*) FROM pgboss.job WHERE name = %s AND state = 'active'", (bq,)).fetchone()[0] == 2
    [cm] = claim(db, "pgmq", mq)
    assert cm["job_id"] == str(m)
    runs = {s["run_id"] for s in live_slots(db, tenant).values()}
    assert runs == {f"claim/{bb}/{c['job_id']}" for c in got} | {f"claim/{bm}/{m}/1"}
    rows = db.execute(f"SELECT queue, waiting, running FROM {S}.explain_queues(%s) ORDER BY 1", (tenant,)).fetchall()
    assert (bq, 1, 2) in rows
    # The tick finds them: completing ends exactly those slots.
    db.execute("UPDATE pgboss.job SET state = 'completed' WHERE name = %s AND id = %s::uuid", (bq, got[0]["job_id"]))
    db.execute("SELECT pgmq.archive(%s, %s::bigint)", (mq, m))
    assert tick(db) == []
    assert {s["run_id"] for s in live_slots(db, tenant).values()} == {f"claim/{bb}/{got[1]['job_id']}"}
    assert db.execute(f"SELECT {S}.unbind_queue('pgboss', %s)", (bq,)).fetchone()[0] is True
    assert db.execute(f"SELECT {S}.unbind_queue('pgmq', %s)", (mq,)).fetchone()[0] is True
    assert db.execute("SELECT to_regclass('public.claim_canary')::text").fetchone()[0] == "claim_canary"
    assert db.execute("SELECT count(*) FROM pg_class WHERE relname IN (%s, %s)",
                      (f"meshhook_claim_{bb}", f"meshhook_claim_{bm}")).fetchone()[0] == 0


def test_explain_as_a_tenant(cluster, cdb, db, tenant):
    other = str(uuid.uuid4())
    set_limit(db, "concurrent_executions", 1, tenant)
    q = new_boss_queue(cluster, cdb)
    send(cluster, cdb, q, [{"tenant_id": tenant}] * 3 + [{"tenant_id": other}] * 2)
    bind(db, "pgboss", q)
    got = claim(db, "pgboss", q, batch=2)
    assert sorted(str(c["tenant_id"]) for c in got) == sorted([tenant, other])
    cols = "source, queue, tenant_id::text, waiting, running, runnable, blocked, blocked_by"
    admin_rows = db.execute(f"SELECT {cols} FROM {S}.explain_queues() WHERE queue = %s ORDER BY 3", (q,)).fetchall()
    assert sorted(admin_rows) == sorted([("pgboss", q, tenant, 2, 1, 0, 2, "concurrent_executions"),
                                         ("pgboss", q, other, 1, 1, 1, 0, None)])
    with cluster.connect(dbname=cdb, user="authenticator") as c:
        mine = rpc(c, claims_of(tenant), f"SELECT {cols} FROM {S}.explain_queues()")
        assert mine == [("pgboss", q, tenant, 2, 1, 0, 2, "concurrent_executions")]
        assert rpc(c, claims_of(tenant), f"SELECT {cols} FROM {S}.explain_queues(%s)", (tenant,)) == mine
        for call, params in ((f"SELECT * FROM {S}.explain_queues(%s)", (other,)),
                             (f"SELECT * FROM {S}.explain_admission(%s)", (other,)),
                             (f"SELECT * FROM {S}.explain_admission(%s, NULL, 'k')", (other,))):
            with pytest.raises(psycopg.Error) as e:
                rpc(c, claims_of(tenant), call, params)
            assert sqlstate(e) == "42501" and other not in str(e.value), call
        rows = rpc(c, claims_of(tenant), f"SELECT scope, limit_value, in_use, blocking FROM {S}.explain_admission(%s)",
                   (tenant,))
        assert ("tenant", 1, 1, True) in rows
        with pytest.raises(psycopg.Error) as e:
            rpc(c, None, f"SELECT * FROM {S}.explain_queues()", role="anon")
        assert sqlstate(e) == "42501"


def test_explain_queues_lists_a_tenant_with_only_running_jobs(cluster, cdb, db, tenant):
    """A tenant whose jobs are all claimed (none waiting) still has a row:
    running is what explain_queues is asked for when a tenant wonders where
    its capacity went."""
    q = new_boss_queue(cluster, cdb)
    send(cluster, cdb, q, [{"tenant_id": tenant}] * 2)
    bind(db, "pgboss", q)
    assert len(claim(db, "pgboss", q, batch=2)) == 2
    rows = db.execute(f"SELECT queue, waiting, running FROM {S}.explain_queues(%s)", (tenant,)).fetchall()
    assert rows == [(q, 0, 2)]
