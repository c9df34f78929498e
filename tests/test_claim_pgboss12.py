"""claim_jobs on pg-boss 12 (12.38.1, the current major; issue 18), next to
the same calls on pg-boss 11 where both have the feature: a claimed job is
left exactly as 12's own fetch leaves it (heartbeat_on too) and carries the
retry_count 12's fenced complete({id, retryCount}) needs; jobs 12's fetch
would not return (blocked by a flow's dependencies) are never claimed; a
key_strict_fifo queue gives one job per key, its head, never a 23505;
pg-boss's own queues stay out of queue_health().

pg-boss runs for real through tests/node (PGBOSS_MAJOR picks the major per
database)."""
import os
import uuid

import pytest

from conftest import set_limit
from test_claim import PGMQ_SQL, bind, boss_rows, claim, live_slots, send, tick, uniq
from test_queues import NODE, PGBOSS_MAJOR, ROOT, boss, create_db, drop_db, health, requires
from test_queues import tick as qtick

S = "meshhook_limits"
pytestmark = requires(NODE is not None and (ROOT / "tests/node/node_modules/pg-boss-12/package.json").exists()
                      and PGMQ_SQL.exists(), "pg-boss 12 (npm) and pgmq's SQL (scripts/install-queue-systems.sh)")


@pytest.fixture(scope="module", params=[11, 12], ids=["pgboss11", "pgboss12"])
def bdb(request, cluster):
    name = f"mlb{request.param}_{os.getpid()}"
    PGBOSS_MAJOR[name] = request.param
    create_db(cluster, name)
    assert boss(cluster, name, "start")["installed"] is True
    assert boss(cluster, name, "version")["schemaVersion"] == (46 if request.param == 12 else 26)
    yield name, request.param
    drop_db(cluster, name)
    PGBOSS_MAJOR.pop(name, None)


@pytest.fixture
def db(cluster, bdb):
    with cluster.connect(dbname=bdb[0]) as c:
        yield c
    with cluster.connect(dbname=bdb[0]) as c:
        c.execute(f"SELECT {S}.release_execution_slot(slot_id) FROM {S}.slots() WHERE state = 'live'")
        c.execute(f"SELECT {S}.unbind_queue(source, queue) FROM {S}.queue_bindings")


def complete(cluster, name, q, job, retry_count, major):
    """boss.complete of one attempt: 12 fences on its retry_count, 11 takes ids."""
    if major == 12:
        return boss(cluster, name, "complete", name=q, jobs=[{"id": job, "retryCount": retry_count}])["affected"]
    return boss(cluster, name, "complete", name=q, ids=[job])["affected"]


def queue(cluster, name, **options):
    q = uniq("q")
    boss(cluster, name, "create-queue", name=q, options=options)
    return q


@pytest.mark.smoke
def test_claimed_job_is_left_as_the_versions_fetch_leaves_it(cluster, bdb, db, tenant):
    name, major = bdb
    q = queue(cluster, name, retryLimit=2)
    a, b = send(cluster, name, q, [{"tenant_id": tenant, "n": 1}, {"tenant_id": tenant, "n": 2}])
    before = boss_rows(db, q)
    bind(db, "pgboss", q)
    [c] = claim(db, "pgboss", q)
    assert c["job_id"] == a and c["retry_count"] == 0
    [fetched] = boss(cluster, name, "fetch", name=q, batchSize=1)
    assert fetched["id"] == b
    after = boss_rows(db, q)

    def changed(i):
        return {k for k in after[i] if k not in ("ctid", "xmin") and after[i][k] != before[i][k]}
    want = {"state", "started_on"} | ({"heartbeat_on"} if major == 12 else set())
    assert changed(a) == changed(b) == want
    if major == 12:
        assert after[a]["heartbeat_on"] == after[a]["started_on"]
    # The claimed attempt completes with the retry_count the claim returned
    # (pg-boss 12 fences complete on it; 11 ignores it).
    assert complete(cluster, name, q, a, c["retry_count"], major) == 1
    tick(db)
    assert live_slots(db, tenant) == {}


def test_retried_job_carries_its_attempt(cluster, bdb, db, tenant):
    name, major = bdb
    q = queue(cluster, name, retryLimit=3, retryDelay=0)
    [a] = send(cluster, name, q, [{"tenant_id": tenant}])
    bind(db, "pgboss", q)
    [c1] = claim(db, "pgboss", q)
    assert c1["retry_count"] == 0
    boss(cluster, name, "fail", name=q, ids=[a])
    tick(db)
    [c2] = claim(db, "pgboss", q)
    assert c2["job_id"] == a and c2["retry_count"] == 1
    assert boss_rows(db, q)[a]["retry_count"] == 1
    if major == 12:
        # The stale attempt's complete is fenced off; the claimed one's is not.
        assert complete(cluster, name, q, a, 0, major) == 0
    assert complete(cluster, name, q, a, 1, major) == 1


def test_jobs_blocked_by_dependencies_are_never_claimed(cluster, bdb, db, tenant):
    name, major = bdb
    if major != 12:
        pytest.skip("flows (dependsOn) are pg-boss 12's")
    q = queue(cluster, name)
    ids = boss(cluster, name, "flow", name=q, data={"tenant_id": tenant}, childData={"tenant_id": tenant})
    parent, child = ids["parent"], ids["child"]
    bind(db, "pgboss", q)
    got = claim(db, "pgboss", q, 10)
    assert [c["job_id"] for c in got] == [parent], "the child waits for its parent"
    assert boss_rows(db, q)[child]["state"] == "created" and boss_rows(db, q)[child]["blocked"] is True
    assert boss(cluster, name, "complete", name=q, jobs=[{"id": parent, "retryCount": 0}])["affected"] == 1
    tick(db)
    assert claim(db, "pgboss", q, 10) == [], "completing the parent does not unblock the child by itself"
    boss(cluster, name, "resolve-flow")
    [c] = claim(db, "pgboss", q, 10)
    assert c["job_id"] == child


def test_key_strict_fifo_gives_each_key_its_head_only(cluster, bdb, db, tenant):
    name, major = bdb
    if major != 12:
        pytest.skip("key_strict_fifo is pg-boss 12's")
    set_limit(db, "concurrent_executions", 100, tenant)
    q = queue(cluster, name, policy="key_strict_fifo")
    k1 = send(cluster, name, q, [{"tenant_id": tenant, "k": 1, "i": i} for i in range(3)], singletonKey="k1")
    k2 = send(cluster, name, q, [{"tenant_id": tenant, "k": 2, "i": i} for i in range(2)], singletonKey="k2")
    bind(db, "pgboss", q)
    got = claim(db, "pgboss", q, 10)          # no 23505 on job_i8
    assert sorted(c["job_id"] for c in got) == sorted([k1[0], k2[0]])
    assert claim(db, "pgboss", q, 10) == []   # each key has its job running
    # pg-boss's own fetch agrees: nothing to take either.
    assert boss(cluster, name, "fetch", name=q, batchSize=10) == []
    by_id = {c["job_id"]: c for c in got}
    assert boss(cluster, name, "complete", name=q,
                jobs=[{"id": k1[0], "retryCount": by_id[k1[0]]["retry_count"]}])["affected"] == 1
    tick(db)
    [c] = claim(db, "pgboss", q, 10)
    assert c["job_id"] == k1[1]


def test_heartbeat_supervision_fails_a_claimed_job_whose_worker_died(cluster, bdb, db, tenant):
    """pg-boss 12 fails a job whose heartbeat stops: the claim starts the
    heartbeat clock as 12's fetch does, so a claimed job whose worker died
    is failed (and retried) by pg-boss's own supervisor."""
    name, major = bdb
    if major != 12:
        pytest.skip("heartbeats are pg-boss 12's")
    q = queue(cluster, name, heartbeatSeconds=10, retryLimit=1, retryDelay=0)
    [a] = send(cluster, name, q, [{"tenant_id": tenant}])
    bind(db, "pgboss", q)
    [c] = claim(db, "pgboss", q)
    # The worker died 11 s ago: move the clock of the job back rather than wait.
    db.execute("UPDATE pgboss.job SET heartbeat_on = heartbeat_on - interval '11 seconds', "
               "started_on = started_on - interval '11 seconds' WHERE id = %s", (a,))
    boss(cluster, name, "supervise", name=q)
    row = boss_rows(db, q)[a]
    assert row["state"] == "retry", row
    tick(db)
    assert live_slots(db, tenant) == {}
    [again] = claim(db, "pgboss", q)
    assert again["job_id"] == a and again["retry_count"] == 1


def test_pgboss_internal_queues_stay_out_of_queue_health(cluster, bdb, db):
    name, _ = bdb
    q = queue(cluster, name)
    # As pg-boss's scheduler creates it (boss.start() with schedule on).
    db.execute("INSERT INTO pgboss.queue SELECT (jsonb_populate_record(q, '{\"name\": \"__pgboss__send-it\"}')).* "
               "FROM pgboss.queue q WHERE q.name = %s ON CONFLICT DO NOTHING", (q,))
    for full in (True, False):
        qtick(db, full)
        got = health(db, "pgboss")
        assert q in got
        assert not any(k.startswith("__pgboss__") for k in got), sorted(got)
