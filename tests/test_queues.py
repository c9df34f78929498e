"""Queue health (DESIGN.md "queue_health()" and "Background worker") against
the real queue systems: pg-boss 11 driven through its own Node API
(tests/node/pgboss_driver.mjs) and pgmq installed from the crate's SQL
(.cache/pgmq/pgmq.sql, scripts/install-queue-systems.sh).

Everything runs in databases of its own (pg-boss and pgmq schemas never leak
into other test modules). The session cluster's worker ticks in `postgres`, so
these tests call `meshhook_limits.tick()` themselves to sample
deterministically; the worker itself is exercised on a second cluster whose
`meshhook_limits.database` is a database of this module.
"""
import datetime as dt
import json
import os
import shutil
import subprocess
import time
import uuid

import psycopg
import pytest
from psycopg import sql

from conftest import PG_BIN, PG_SH, ROOT, Cluster, requires, rpc, sqlstate

S = "meshhook_limits"
DRIVER = ROOT / "tests" / "node" / "pgboss_driver.mjs"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"
NODE = shutil.which("node")

pytestmark = requires(NODE is not None and (ROOT / "tests/node/node_modules/pg-boss/package.json").exists()
                      and PGMQ_SQL.exists(), "pg-boss (npm) and pgmq's SQL (scripts/install-queue-systems.sh)")

HEALTH_COLS = ["source", "queue", "queued", "active", "failed_recent", "oldest_age", "p50_ms", "p95_ms",
               "throughput_per_min", "error_rate", "status", "sampled_at", "stats_sampled_at"]


# --------------------------------------------------------------------------- helpers

class PgBossError(Exception):
    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# The pg-boss major each test database runs (default 11): the Node drivers
# load pg-boss 11.1.2 or 12.38.1 by PGBOSS_MAJOR (tests/node/conn.mjs).
PGBOSS_MAJOR: dict[str, int] = {}


def boss_env(db: str) -> dict:
    return {**os.environ, "PGBOSS_MAJOR": str(PGBOSS_MAJOR.get(db, 11))}


def boss(c: Cluster, db: str, command: str, **args):
    """One pg-boss API call through the Node driver; returns its JSON result."""
    p = subprocess.run([NODE, str(DRIVER), c.dsn(db), command, json.dumps(args)],
                       capture_output=True, text=True, timeout=180, env=boss_env(db))
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"driver {command} failed: rc={p.returncode} stdout={p.stdout!r} stderr={p.stderr!r}")
    if p.returncode != 0:
        raise PgBossError(out.get("error"), out.get("code"))
    return out


def js_time(s: str) -> dt.datetime:
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def install_pgmq(c: Cluster, db: str) -> None:
    subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", c.host, "-p", str(c.port),
                    "-U", "postgres", "-d", db, "-f", str(PGMQ_SQL)],
                   check=True, capture_output=True, text=True, timeout=60)


def create_db(c: Cluster, name: str) -> None:
    with c.connect(dbname="postgres") as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    with c.connect(dbname=name) as conn:
        conn.execute(f"CREATE EXTENSION {S}")


def drop_db(c: Cluster, name: str) -> None:
    with c.connect(dbname="postgres") as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def tick(conn, full: bool = True) -> list[str]:
    """Run one tick as superuser; return the warnings it raised. full: with
    a full pass over the queue tables (queue_scan_budget = 1); otherwise the
    budget decides (test_cheap_ticks_between_full_passes)."""
    warnings = []
    handler = lambda d: warnings.append(d.message_primary)  # noqa: E731
    conn.add_notice_handler(handler)
    try:
        if full:
            conn.execute("SET meshhook_limits.queue_scan_budget = 1")
        conn.execute(f"SELECT {S}.tick()")
    finally:
        conn.execute("RESET meshhook_limits.queue_scan_budget")
        conn.remove_notice_handler(handler)
    return warnings


def health(conn, source: str | None = None) -> dict:
    """queue_health() keyed by queue name (optionally of one source)."""
    rows = conn.execute(f"SELECT * FROM {S}.queue_health()").fetchall()
    out = {}
    for r in rows:
        d = dict(zip(HEALTH_COLS, r))
        if source is None or d["source"] == source:
            out[(d["source"], d["queue"]) if source is None else d["queue"]] = d
    return out


def percentile_cont(values: list[float], p: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between order statistics."""
    v = sorted(values)
    pos = p * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def secs(x: dt.timedelta) -> float:
    return x.total_seconds()


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=[11, 12], ids=["pgboss11", "pgboss12"])
def qdb(cluster, request):
    """The module's database: meshhook_limits, pgmq and pg-boss (11, then 12:
    every test of it runs on both majors)."""
    name = f"mlqueues{request.param}_{os.getpid()}"
    PGBOSS_MAJOR[name] = request.param
    create_db(cluster, name)
    install_pgmq(cluster, name)
    assert boss(cluster, name, "start")["installed"] is True
    yield name
    drop_db(cluster, name)


@pytest.fixture
def qconn(cluster, qdb):
    with cluster.connect(dbname=qdb) as c:
        yield c


@pytest.fixture
def fresh_db(cluster):
    """A database with only the extension."""
    name = f"mlq_fresh_{uuid.uuid4().hex[:8]}"
    create_db(cluster, name)
    yield name
    drop_db(cluster, name)


def worker_pid(c: Cluster):
    rows = c.sql("SELECT pid, datname FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker'",
                 dbname="postgres")
    return rows


# --------------------------------------------------------------------------- pg-boss 11

def test_pgboss_counts_match_pgboss_own_stats(cluster, qdb, qconn):
    q = f"orders_{uuid.uuid4().hex[:6]}"
    # retryLimit 0: a failed (or expired) job goes straight to `failed`;
    # expireInSeconds 1: an active job not completed within 1 s expires.
    boss(cluster, qdb, "create-queue", name=q, options={"retryLimit": 0, "expireInSeconds": 1})
    ids = boss(cluster, qdb, "send", name=q, count=10)
    assert len(ids) == 10 and all(ids)
    fetched = boss(cluster, qdb, "fetch", name=q, batchSize=4)
    assert sorted(j["id"] for j in fetched) == sorted(ids[:4])   # the oldest four
    time.sleep(0.15)
    boss(cluster, qdb, "complete", name=q, ids=[ids[0]])
    time.sleep(0.35)
    boss(cluster, qdb, "complete", name=q, ids=[ids[1]])
    r = boss(cluster, qdb, "fail", name=q, ids=[ids[2]])
    assert r["affected"] == 1
    jobs = {i: boss(cluster, qdb, "job", name=q, id=i) for i in ids[:5]}
    assert [jobs[i]["state"] for i in ids[:5]] == ["completed", "completed", "failed", "active", "created"]

    # Phase A: 6 queued, 1 active, 2 completed, 1 failed.
    tick(qconn)
    stats = boss(cluster, qdb, "stats", name=q)["stats"]
    h = health(qconn, "pgboss")[q]
    assert (stats["queuedCount"], stats["activeCount"]) == (6, 1)
    assert h["queued"] == stats["queuedCount"]
    assert h["active"] == stats["activeCount"]
    assert h["failed_recent"] == 1
    assert float(h["error_rate"]) == pytest.approx(1 / 3, abs=1e-4)
    # throughput_per_min (completions only): see test_pgboss_throughput_counts_completions.
    oldest = js_time(jobs[ids[4]]["createdOn"])
    assert secs(h["oldest_age"]) == pytest.approx(secs(h["sampled_at"] - oldest), abs=0.01)
    durations = [(js_time(jobs[i]["completedOn"]) - js_time(jobs[i]["startedOn"])).total_seconds() * 1000
                 for i in ids[:2]]
    assert durations[0] >= 100 and durations[1] >= 450
    assert float(h["p50_ms"]) == pytest.approx(percentile_cont(durations, 0.5), abs=3)
    assert float(h["p95_ms"]) == pytest.approx(percentile_cont(durations, 0.95), abs=3)
    assert 0 < h["p50_ms"] <= h["p95_ms"] < 60_000   # milliseconds (slow pg-boss calls on a busy machine)

    # Phase B: the active job's 1 s expiry passes; pg-boss's supervisor
    # (boss.supervise(name), what its timer runs) fails it: `job timed out`.
    started = js_time(jobs[ids[3]]["startedOn"])
    wait = 1.3 - secs(dt.datetime.now(dt.timezone.utc) - started)
    if wait > 0:
        time.sleep(wait)
    boss(cluster, qdb, "supervise", name=q)
    expired = boss(cluster, qdb, "job", name=q, id=ids[3])
    assert expired["state"] == "failed" and expired["output"]["value"]["message"] == "job timed out"
    tick(qconn)
    both = boss(cluster, qdb, "stats", name=q)
    stats = both["stats"]
    h = health(qconn, "pgboss")[q]
    assert (stats["queuedCount"], stats["activeCount"]) == (6, 0)
    assert (h["queued"], h["active"]) == (stats["queuedCount"], stats["activeCount"])
    assert h["failed_recent"] == 2
    assert float(h["error_rate"]) == pytest.approx(0.5, abs=1e-4)
    assert float(h["p50_ms"]) == pytest.approx(percentile_cont(durations, 0.5), abs=3)  # unchanged: no new completions
    # pgboss.queue's cached counts (getQueue) are refreshed only by supervise,
    # before it expires jobs: the cache still says 1 active. queue_health()
    # gives the true count, not the cache.
    assert both["queue"]["activeCount"] == 1
    assert h["active"] == 0

    # Status under the default thresholds: an error rate of 0.5 is past the
    # default critical error rate (0.20), so 'critical' — not 'ok'.
    assert h["status"] == "critical"
    qconn.execute(f"SELECT {S}.set_queue_thresholds('pgboss', %s, warn_queued => 3, crit_queued => 100)", (q,))
    tick(qconn)
    assert health(qconn, "pgboss")[q]["status"] == "critical"  # error rate still past its (default) 0.20
    qconn.execute(f"SELECT {S}.set_queue_thresholds('pgboss', %s, warn_queued => 3, crit_queued => 100, "
                  "warn_error_rate => 0.6, crit_error_rate => 0.9)", (q,))
    tick(qconn)
    assert health(qconn, "pgboss")[q]["status"] == "warning"   # 6 queued >= 3


def test_pgboss_throughput_counts_completions(cluster, qdb, qconn):
    """throughput_per_min = jobs completed in the last minute; failed jobs
    (which pg-boss also stamps with completed_on) are errors, not throughput."""
    q = f"tput_{uuid.uuid4().hex[:6]}"
    boss(cluster, qdb, "create-queue", name=q, options={"retryLimit": 0})
    ids = boss(cluster, qdb, "send", name=q, count=5)
    boss(cluster, qdb, "fetch", name=q, batchSize=5)
    boss(cluster, qdb, "complete", name=q, ids=ids[:2])
    boss(cluster, qdb, "fail", name=q, ids=ids[2:])
    tick(qconn)
    h = health(qconn, "pgboss")[q]
    assert (h["failed_recent"], float(h["error_rate"])) == (3, 0.6)
    assert h["throughput_per_min"] == 2, (
        f"throughput_per_min is {h['throughput_per_min']}: completed in the last minute 2, failed 3")


def test_pgboss_status_ok_then_warning_with_thresholds(cluster, qdb, qconn):
    q = f"clean_{uuid.uuid4().hex[:6]}"
    boss(cluster, qdb, "create-queue", name=q)
    ids = boss(cluster, qdb, "send", name=q, count=10)
    boss(cluster, qdb, "fetch", name=q, batchSize=4)
    boss(cluster, qdb, "complete", name=q, ids=ids[:4])
    tick(qconn)
    h = health(qconn, "pgboss")[q]
    assert (h["queued"], h["active"], h["failed_recent"]) == (6, 0, 0)
    assert h["error_rate"] == 0 and h["throughput_per_min"] == 4
    assert h["status"] == "ok"
    qconn.execute(f"SELECT {S}.set_queue_thresholds('pgboss', %s, warn_queued => 3, crit_queued => 100)", (q,))
    tick(qconn)
    assert health(qconn, "pgboss")[q]["status"] == "warning"
    qconn.execute(f"SELECT {S}.set_queue_thresholds('pgboss', %s, warn_queued => 3, crit_queued => 6)", (q,))
    tick(qconn)
    assert health(qconn, "pgboss")[q]["status"] == "critical"
    # The per-queue row wins over a stricter default for the source.
    qconn.execute(f"SELECT {S}.set_queue_thresholds('pgboss', %s, warn_queued => 3, crit_queued => 100)", (q,))
    qconn.execute(f"SELECT {S}.set_queue_thresholds('pgboss', NULL, warn_queued => 1, crit_queued => 2)")
    try:
        tick(qconn)
        assert health(qconn, "pgboss")[q]["status"] == "warning"
    finally:
        qconn.execute(f"DELETE FROM {S}.queue_thresholds WHERE source = 'pgboss' AND queue IS NULL")


def test_pgboss_names_that_need_care(cluster, qdb, qconn):
    """pg-boss 11.1.2 checks names with an unanchored /[\\w-]/ (any name with
    one word character passes), then interpolates them into SQL literals:
    spaces, semicolons, double quotes, dots, non-ASCII all work; a single
    quote does not (syntax error from pg-boss's own SQL). pg-boss 12 refuses
    such names itself."""
    if PGBOSS_MAJOR[qdb] >= 12:
        pytest.skip("pg-boss 12 takes only letters, digits, _ - . / in queue names")
    q = f'Bad name; "x".y-é {uuid.uuid4().hex[:4]}'
    created = boss(cluster, qdb, "create-queue", name=q, options={"partition": True})
    assert created["partition"] is True and created["table"] != "job_common"  # a partition of its own
    ids = boss(cluster, qdb, "send", name=q, count=3)
    boss(cluster, qdb, "send", name=q, count=1, options={"startAfter": 3600})  # deferred: still queued
    [job] = boss(cluster, qdb, "fetch", name=q, batchSize=1)
    assert job["id"] == ids[0]
    boss(cluster, qdb, "fail", name=q, ids=[ids[0]])          # retryLimit 2: goes to `retry`
    assert boss(cluster, qdb, "job", name=q, id=ids[0])["state"] == "retry"
    [job] = boss(cluster, qdb, "fetch", name=q, batchSize=1)  # the retry comes back first
    tick(qconn)
    stats = boss(cluster, qdb, "stats", name=q)["stats"]
    h = health(qconn, "pgboss")[q]
    assert (stats["queuedCount"], stats["activeCount"], stats["deferredCount"]) == (3, 1, 1)
    assert (h["queued"], h["active"]) == (stats["queuedCount"], stats["activeCount"])
    assert h["failed_recent"] == 0   # a retry is not a failure yet

    with pytest.raises(PgBossError) as e:
        boss(cluster, qdb, "create-queue", name="it's")
    assert e.value.code == "42601"
    with pytest.raises(PgBossError) as e:
        boss(cluster, qdb, "create-queue", name="***")
    assert "alphanumeric" in str(e.value)
    assert qconn.execute("SELECT count(*) FROM pgboss.queue WHERE name IN ('it''s', '***')").fetchone()[0] == 0

    # A name with a quote made through pg-boss's own SQL function (which binds
    # it as a value; only the JS wrapper breaks): sampled as data, not SQL.
    qconn.execute("CREATE TABLE IF NOT EXISTS public.canary_boss (id int)")
    evil = f"it's'); DROP TABLE public.canary_boss; --{uuid.uuid4().hex[:4]}"
    qconn.execute("SELECT pgboss.create_queue(%s, '{\"policy\": \"standard\"}'::jsonb)", (evil,))
    qconn.execute("INSERT INTO pgboss.job (name, data) SELECT %s, '{}' FROM generate_series(1, 2)", (evil,))
    tick(qconn)
    h = health(qconn, "pgboss")
    assert (h[evil]["queued"], h[evil]["active"]) == (2, 0)
    assert h[q]["queued"] == 3
    assert qconn.execute("SELECT to_regclass('public.canary_boss')::text").fetchone()[0] == "canary_boss"


def test_cheap_ticks_between_full_passes(cluster, qdb, qconn):
    """queue_scan_budget: between two full passes a tick counts waiting jobs
    through pg-boss's own index (exact queued and oldest_age, also for names
    that need quoting, deferred and retry jobs) and carries the rest, with the
    time it was computed (stats_sampled_at); the budget then brings the next
    full pass."""
    c = qconn
    suffix = uuid.uuid4().hex[:4]
    plain, spaced = f"cheap_{suffix}", f'Cheap "q"; {suffix}'
    if PGBOSS_MAJOR[qdb] >= 12:
        spaced = f"Cheap.q/{suffix}-x"    # 12 allows letters, digits, _ - . / only
    boss(cluster, qdb, "create-queue", name=plain, options={"retryLimit": 1})
    boss(cluster, qdb, "create-queue", name=spaced, options={"partition": True})
    ids = boss(cluster, qdb, "send", name=plain, count=5)
    boss(cluster, qdb, "send", name=spaced, count=2)
    boss(cluster, qdb, "fetch", name=plain, batchSize=2)
    boss(cluster, qdb, "complete", name=plain, ids=[ids[0]])
    mq = f"cheap_mq_{suffix}"
    c.execute("SELECT pgmq.create(%s)", (mq,))
    c.execute("SELECT pgmq.send_batch(%s, array_fill('{}'::jsonb, ARRAY[3]))", (mq,))
    [msg] = c.execute("SELECT msg_id FROM pgmq.read(%s, 0, 1)", (mq,)).fetchone()
    c.execute("SELECT pgmq.archive(%s, %s::bigint)", (mq, msg))
    tick(c)                                         # a full pass
    ws = c.execute(f"SELECT queue_stats_at, queue_stats_ms, queues_sampled_at FROM {S}.worker_state").fetchone()
    assert ws[0] == ws[2] and ws[1] > 0
    h = health(c, "pgboss")
    assert (h[plain]["queued"], h[plain]["active"], h[plain]["throughput_per_min"]) == (3, 1, 1)
    assert h[plain]["stats_sampled_at"] == h[plain]["sampled_at"]
    full_at = h[plain]["sampled_at"]
    m = health(c, "pgmq")[mq]
    assert (m["queued"], m["active"], m["throughput_per_min"], m["stats_sampled_at"]) == (2, 0, 1, full_at)

    # The last full pass "took" 10 minutes: under the default budget (0.5%)
    # the next one is days away, so these ticks are cheap ones.
    c.execute(f"UPDATE {S}.worker_state SET queue_stats_ms = 600000")
    boss(cluster, qdb, "send", name=plain, count=4)
    boss(cluster, qdb, "send", name=plain, count=1, options={"startAfter": 3600})   # deferred: still queued
    [job] = boss(cluster, qdb, "fetch", name=plain, batchSize=1)
    boss(cluster, qdb, "fail", name=plain, ids=[job["id"]])                      # retryLimit 1: `retry`
    boss(cluster, qdb, "complete", name=plain, ids=[ids[1]])
    boss(cluster, qdb, "fetch", name=spaced, batchSize=1)
    c.execute("SELECT pgmq.send_batch(%s, array_fill('{}'::jsonb, ARRAY[2]))", (mq,))
    c.execute("SELECT pgmq.read(%s, 30, 1)", (mq,))
    time.sleep(0.05)
    tick(c, full=False)
    m = health(c, "pgmq")[mq]
    assert (m["queued"], m["active"]) == pgmq_counts(c, mq) == (3, 1)   # pgmq's counts: every tick
    assert (m["throughput_per_min"], m["stats_sampled_at"]) == (1, full_at)   # the archive's: carried
    stats = boss(cluster, qdb, "stats", name=plain)["stats"]
    h = health(c, "pgboss")
    # 3 waiting + 4 + 1 deferred, one fetched and failed into `retry` (waiting again)
    assert h[plain]["queued"] == stats["queuedCount"] == 8, (h[plain], stats)
    assert h[spaced]["queued"] == 1
    oldest = min(js_time(boss(cluster, qdb, "job", name=plain, id=i)["createdOn"]) for i in ids[2:])
    assert secs(h[plain]["oldest_age"]) == pytest.approx(secs(h[plain]["sampled_at"] - oldest), abs=0.01)
    # ... and the rest as of the full pass, which says so.
    assert (h[plain]["active"], h[plain]["throughput_per_min"], h[spaced]["active"]) == (1, 1, 0)
    assert h[plain]["sampled_at"] > full_at and h[plain]["stats_sampled_at"] == full_at
    assert c.execute(f"SELECT queue_stats_at FROM {S}.worker_state").fetchone()[0] == full_at

    # A pass that took 1 ms is due again 200 ms later.
    c.execute(f"UPDATE {S}.worker_state SET queue_stats_ms = 1")
    time.sleep(0.25)
    tick(c, full=False)
    h = health(c, "pgboss")
    stats = boss(cluster, qdb, "stats", name=plain)["stats"]
    assert h[plain]["stats_sampled_at"] == h[plain]["sampled_at"] > full_at
    assert (h[plain]["active"], h[plain]["throughput_per_min"], h[spaced]["active"]) == (0, 2, 1)
    assert h[plain]["active"] == stats["activeCount"]


def pgmq_counts(conn, q):
    """(visible, invisible) from pgmq's own metrics()."""
    total, visible = pgmq_metrics(conn, q)
    return visible, total - visible


# --------------------------------------------------------------------------- pgmq

def pgmq_metrics(conn, q):
    return conn.execute("SELECT queue_length, queue_visible_length FROM pgmq.metrics(%s)", (q,)).fetchone()


def test_pgmq_counts_match_pgmq_metrics(cluster, qdb, qconn):
    suffix = uuid.uuid4().hex[:6]
    plain, spaced = f"mq_{suffix}", f"With Space {suffix}"   # pgmq allows spaces and capitals
    c = qconn
    for q in (plain, spaced):
        c.execute("SELECT pgmq.create(%s)", (q,))
    assert c.execute("SELECT to_regclass(format('pgmq.%%I', %s::text))", (f"q_with space {suffix}",)).fetchone()[0]
    for q, n in ((plain, 8), (spaced, 5)):
        c.execute("SELECT pgmq.send_batch(%s, array_fill('{}'::jsonb, ARRAY[%s::int]))", (q, n))
    time.sleep(0.2)
    # plain: read 3 with a 30 s visibility timeout (invisible), archive 2 of
    # them, delete 1 visible; spaced: read 1, archive 1 more later.
    read = [r[0] for r in c.execute("SELECT msg_id FROM pgmq.read(%s, 30, 3)", (plain,)).fetchall()]
    assert len(read) == 3
    assert c.execute("SELECT pgmq.archive(%s, %s::bigint)", (plain, read[0])).fetchone()[0]
    time.sleep(0.3)
    assert c.execute("SELECT pgmq.archive(%s, %s::bigint)", (plain, read[1])).fetchone()[0]
    visible_one = c.execute(f"SELECT max(msg_id) FROM pgmq.{sql.Identifier('q_' + plain).as_string(c)}"
                            ).fetchone()[0]
    assert c.execute("SELECT pgmq.delete(%s, %s::bigint)", (plain, visible_one)).fetchone()[0]
    [sread] = c.execute("SELECT msg_id FROM pgmq.read(%s, 30, 1)", (spaced,)).fetchall()
    assert c.execute("SELECT pgmq.archive(%s, ARRAY[%s::bigint])", (spaced, sread[0])).fetchall() == [(sread[0],)]

    tick(c)
    hs = health(c, "pgmq")
    for q, (length, visible, invisible, archived) in {plain: (5, 4, 1, 2), spaced: (4, 4, 0, 1)}.items():
        h = hs[q]
        assert pgmq_metrics(c, q) == (length, visible)
        assert h["queued"] == visible, (q, h)                 # == queue_visible_length
        assert h["queued"] + h["active"] == length, (q, h)    # == queue_length
        assert h["active"] == invisible
        assert h["failed_recent"] == 0 and h["error_rate"] is None
        assert h["throughput_per_min"] == archived
        atable = sql.Identifier("a_" + q.lower()).as_string(c)
        lat = [float(r[0]) for r in c.execute(
            f"SELECT extract(epoch FROM archived_at - enqueued_at) * 1000 FROM pgmq.{atable}").fetchall()]
        assert len(lat) == archived
        assert float(h["p50_ms"]) == pytest.approx(percentile_cont(lat, 0.5), abs=0.01)
        assert float(h["p95_ms"]) == pytest.approx(percentile_cont(lat, 0.95), abs=0.01)
        assert 100 < h["p50_ms"] <= h["p95_ms"] < 10_000
        oldest = c.execute(f"SELECT min(enqueued_at) FROM pgmq.{sql.Identifier('q_' + q.lower()).as_string(c)}"
                           " WHERE vt <= %s", (h["sampled_at"],)).fetchone()[0]
        assert h["oldest_age"] == h["sampled_at"] - oldest
        assert h["status"] == "ok"


def _hostile_setup(c, suffix):
    """Queue names pgmq itself refuses (quotes, semicolons), written straight
    into pgmq.meta with tables made with format('%I'); plus a meta row whose
    tables do not exist. Returns (hostile names with tables, missing name)."""
    c.execute("CREATE TABLE IF NOT EXISTS public.canary (id int)")
    hostile = [f"x'); DROP TABLE public.canary; --{suffix}",
               f'Q"; DELETE FROM pgmq.meta; -- {suffix}',
               f"%I %L $1 \\ {suffix}"]
    for name in hostile:
        with pytest.raises(psycopg.errors.RaiseException):
            c.execute("SELECT pgmq.send(%s, '{}'::jsonb)", (name,))  # pgmq's own validation refuses these
        for p in ("q", "a"):
            ddl = c.execute(f"SELECT format('CREATE TABLE pgmq.%%I (LIKE pgmq.{p}_good_ref INCLUDING ALL)', "
                            f"lower('{p}_' || %s))", (name,)).fetchone()[0]
            c.execute(ddl)
        c.execute("INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged) VALUES (%s, false, false)", (name,))
    missing = f"gone'; DROP TABLE public.canary; --{suffix}"
    c.execute("INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged) VALUES (%s, false, false)", (missing,))
    return hostile, missing


def _fill_hostile(c, name, visible, invisible, archived):
    # No bind parameters here: psycopg would parse the % of the names.
    q = sql.Identifier(("q_" + name).lower()).as_string(c)
    a = sql.Identifier(("a_" + name).lower()).as_string(c)
    c.execute(f"INSERT INTO pgmq.{q} (vt, message) SELECT now() - interval '1 second', '{{}}' "
              f"FROM generate_series(1, {int(visible)})")
    c.execute(f"INSERT INTO pgmq.{q} (vt, message) SELECT now() + interval '1 hour', '{{}}' "
              f"FROM generate_series(1, {int(invisible)})")
    c.execute(f"INSERT INTO pgmq.{a} (msg_id, vt, enqueued_at, archived_at, message) "
              f"SELECT g, now(), now() - interval '2 seconds', now(), '{{}}' FROM generate_series(1, {int(archived)}) g")


def test_pgmq_hostile_queue_names(cluster, qdb, qconn):
    c = qconn
    c.execute("DO $$ BEGIN IF to_regclass('pgmq.q_good_ref') IS NULL THEN PERFORM pgmq.create('good_ref'); END IF; END $$")
    suffix = uuid.uuid4().hex[:4]
    hostile, missing = _hostile_setup(c, suffix)
    expected = {}
    for i, name in enumerate(hostile):
        _fill_hostile(c, name, visible=i + 1, invisible=2, archived=3)
        expected[name] = (i + 1, 2, 3)
    c.execute("SELECT pgmq.send('good_ref', '{}'::jsonb)")
    meta_before = c.execute("SELECT count(*) FROM pgmq.meta").fetchone()[0]
    try:
        warnings = tick(c)
        hs = health(c, "pgmq")
        assert warnings == []
        assert c.execute("SELECT to_regclass('public.canary')").fetchone()[0] == "canary"
        assert c.execute("SELECT count(*) FROM pgmq.meta").fetchone()[0] == meta_before
        assert hs["good_ref"]["queued"] == pgmq_metrics(c, "good_ref")[1]
        for name, (visible, invisible, archived) in expected.items():
            assert name in hs, f"hostile queue {name!r} not sampled: {sorted(hs)}"
            h = hs[name]
            assert (h["queued"], h["active"], h["throughput_per_min"]) == (visible, invisible, archived)
            assert float(h["p50_ms"]) == pytest.approx(2000, abs=50)
        assert missing not in hs          # no table: skipped, not an error
    finally:
        for name in hostile + [missing]:
            c.execute("DELETE FROM pgmq.meta WHERE queue_name = %s", (name,))
            for p in ("q_", "a_"):
                c.execute(f"DROP TABLE IF EXISTS pgmq.{sql.Identifier((p + name).lower()).as_string(c)}")


def test_pgmq_one_broken_queue_does_not_hide_the_others(cluster, qdb, qconn):
    """A pgmq.meta row whose table exists but is not a queue table (no `vt`):
    its sample fails; the other queues must still be sampled in that tick."""
    c = qconn
    c.execute("DO $$ BEGIN IF to_regclass('pgmq.q_good_ref') IS NULL THEN PERFORM pgmq.create('good_ref'); END IF; END $$")
    broken = f"broken_{uuid.uuid4().hex[:4]}"
    c.execute(f"CREATE TABLE pgmq.q_{broken} (id int)")
    c.execute("INSERT INTO pgmq.meta (queue_name, is_partitioned, is_unlogged) VALUES (%s, false, false)", (broken,))
    try:
        warnings = tick(c)
        hs = health(c, "pgmq")
        assert "good_ref" in hs, (f"one broken pgmq queue hid every pgmq queue from the tick: pgmq rows {sorted(hs)}, "
                                  f"warnings {warnings}")
        assert broken not in hs
    finally:
        c.execute("DELETE FROM pgmq.meta WHERE queue_name = %s", (broken,))
        c.execute(f"DROP TABLE pgmq.q_{broken}")


def test_a_queue_whose_owner_lacks_usage_is_said_once_with_a_hint(cluster, qdb, qconn):
    """A pgmq queue table owned by an admin role without USAGE on schema pgmq
    cannot be read as its owner: the tick says so once per queue and cause
    (not every second), with the GRANT to run, and again after it was read."""
    c = qconn
    name = f"nousage_{uuid.uuid4().hex[:6]}"
    owner = f"nousage_owner_{uuid.uuid4().hex[:6]}"
    c.execute(f"CREATE ROLE {owner} IN ROLE meshhook_limits_admin")
    c.execute("SELECT pgmq.create(%s)", (name,))
    c.execute(f"ALTER TABLE pgmq.q_{name} OWNER TO {owner}")
    c.execute(f"ALTER TABLE pgmq.a_{name} OWNER TO {owner}")
    public_usage = c.execute("SELECT has_schema_privilege('public', 'pgmq', 'USAGE')").fetchone()[0]
    c.execute("REVOKE USAGE ON SCHEMA pgmq FROM PUBLIC")
    hints = []
    c.add_notice_handler(lambda d: hints.append((d.message_primary or "", d.message_hint or "")))
    try:
        assert not c.execute(f"SELECT has_schema_privilege('{owner}', 'pgmq', 'USAGE')").fetchone()[0]
        mine = lambda ws: [w for w in ws if name in w]  # noqa: E731
        first = mine(tick(c))
        assert len(first) == 1 and "permission denied" in first[0], first
        [(_, hint)] = [h for h in hints if name in h[0]]
        assert f"GRANT USAGE ON SCHEMA pgmq TO {owner}" in hint and "once per queue and cause" in hint, hint
        for _ in range(3):
            assert mine(tick(c)) == []
        # Read again once it may: then a new failure is said again.
        c.execute(f"GRANT USAGE ON SCHEMA pgmq TO {owner}")
        assert mine(tick(c)) == [] and name in health(c, "pgmq")
        c.execute(f"REVOKE USAGE ON SCHEMA pgmq FROM {owner}")
        assert len(mine(tick(c))) == 1
    finally:
        if public_usage:
            c.execute("GRANT USAGE ON SCHEMA pgmq TO PUBLIC")
        c.execute(f"ALTER TABLE pgmq.q_{name} OWNER TO postgres")
        c.execute(f"ALTER TABLE pgmq.a_{name} OWNER TO postgres")
        c.execute("SELECT pgmq.drop_queue(%s)", (name,))
        c.execute(f"DROP OWNED BY {owner}")
        c.execute(f"DROP ROLE {owner}")


def test_locked_queue_table_does_not_stall_tick(cluster, qdb, qconn):
    """The worker keeps each transaction short: a queue table held under an
    ACCESS EXCLUSIVE lock by another transaction (TRUNCATE via
    pgmq.purge_queue, ALTER TABLE, VACUUM FULL in a long transaction) must not
    block tick() — pool sampling, slot reaping and alerts run in it too."""
    suffix = uuid.uuid4().hex[:4]
    locked, other = f"locked_{suffix}", f"other_{suffix}"
    for q in (locked, other):
        qconn.execute("SELECT pgmq.create(%s)", (q,))
        qconn.execute("SELECT pgmq.send(%s, '{}'::jsonb)", (q,))
    with cluster.connect(dbname=qdb, autocommit=False) as holder:
        holder.execute(f"LOCK TABLE pgmq.q_{locked} IN ACCESS EXCLUSIVE MODE")
        qconn.execute("SET statement_timeout = '60s'")   # guard: the test must not hang
        t0 = time.monotonic()
        try:
            tick(qconn)
            took = time.monotonic() - t0
        except psycopg.errors.QueryCanceled:
            took = None
        finally:
            qconn.execute("RESET statement_timeout")
            holder.rollback()
    assert took is not None, "tick() waited on the locked queue table until statement_timeout (60 s) cancelled it"
    # Blocked, it would wait until the lock's holder ends (here: the 60 s
    # statement_timeout); half of that is margin for a busy machine.
    assert took < 30, f"tick() took {took:.2f} s behind a lock"
    assert other in health(qconn, "pgmq")


# --------------------------------------------------------------------------- absent, late, removed

def test_no_queue_system_then_installed_later(cluster, fresh_db):
    with cluster.connect(dbname=fresh_db) as c:
        for _ in range(2):
            assert tick(c) == []       # no warnings: an absent queue system is normal
        assert health(c) == {}
        assert c.execute(f"SELECT ticks FROM {S}.worker_state").fetchone()[0] == 2
        # pg-boss installed afterwards: shows up at the next tick, no restart.
        boss(cluster, fresh_db, "start")
        boss(cluster, fresh_db, "create-queue", name="late")
        boss(cluster, fresh_db, "send", name="late", count=2)
        assert tick(c) == []
        h = health(c)
        assert list(h) == [("pgboss", "late")]
        assert (h["pgboss", "late"]["queued"], h["pgboss", "late"]["active"]) == (2, 0)
        # pgmq too.
        install_pgmq(cluster, fresh_db)
        c.execute("SELECT pgmq.create('late_mq')")
        c.execute("SELECT pgmq.send('late_mq', '{}'::jsonb)")
        tick(c)
        assert sorted(health(c)) == [("pgboss", "late"), ("pgmq", "late_mq")]


def test_removed_queues_leave_queue_health(cluster, fresh_db):
    """Counts are true counts at sampling time: a queue dropped since the last
    tick is gone from queue_health() after the next one — also when it was the
    last queue (queue_health() must not fall back to an older tick)."""
    with cluster.connect(dbname=fresh_db) as c:
        install_pgmq(cluster, fresh_db)
        c.execute("SELECT pgmq.create('a')")
        c.execute("SELECT pgmq.create('b')")
        tick(c)
        assert sorted(health(c, "pgmq")) == ["a", "b"]
        c.execute("SELECT pgmq.drop_queue('a')")
        tick(c)
        assert sorted(health(c, "pgmq")) == ["b"]
        c.execute("SELECT pgmq.drop_queue('b')")
        tick(c)
        assert health(c) == {}, "queue_health() still shows queues dropped before the latest tick"


# --------------------------------------------------------------------------- who may read it

def test_queue_health_is_for_monitors_only(cluster, qdb, qconn):
    boss(cluster, qdb, "create-queue", name="visible_to_admins")
    tick(qconn)
    assert health(qconn)                       # the superuser sees rows
    t = str(uuid.uuid4())
    claims = {"role": "authenticated", "sub": str(uuid.uuid4()), "app_metadata": {"tenant_id": t}}
    with cluster.connect(dbname=qdb) as c:
        # A tenant through RPC is refused, not answered "no queues" (queue
        # names are not tenant data); so is every reader of health.
        for reader in ("queue_health()", "pool_pressure()", "pool_recommendation()", "pooler_health()",
                       "pooler_recommendation()"):
            for who, role in ((claims, "authenticated"), (None, "anon")):
                with pytest.raises(psycopg.Error) as e:
                    rpc(c, who, f"SELECT * FROM {S}.{reader}", role=role)
                assert sqlstate(e) == "42501", reader
                assert "only monitoring roles may read" in e.value.diag.message_primary
                assert "meshhook_limits_monitor" in e.value.diag.message_hint
        c.execute("DROP ROLE IF EXISTS qh_monitor")
        c.execute("CREATE ROLE qh_monitor LOGIN IN ROLE meshhook_limits_monitor")
    with cluster.connect(dbname=qdb, user="qh_monitor") as m:
        assert ("visible_to_admins",) in m.execute(f"SELECT queue FROM {S}.queue_health()").fetchall()
        m.execute(f"SELECT * FROM {S}.pool_pressure()")
    with cluster.connect(dbname=qdb) as c:
        assert rpc(c, claims, f"SELECT * FROM {S}.queue_samples") == []          # RLS
        with pytest.raises(psycopg.Error) as e:
            rpc(c, claims, f"SELECT {S}.tick()")
        assert sqlstate(e) == "42501"
        with pytest.raises(psycopg.Error) as e:
            rpc(c, claims, f"SELECT {S}.set_queue_thresholds('pgboss', 'x', warn_queued => 0)")
        assert sqlstate(e) == "42501"
        # service_role is an admin: it sees them.
        rows = rpc(c, {"role": "service_role"}, f"SELECT queue FROM {S}.queue_health()", role="service_role")
        assert ("visible_to_admins",) in rows


# --------------------------------------------------------------------------- the background worker

@pytest.mark.parametrize("major", [11, 12], ids=["pgboss11", "pgboss12"])
def test_background_worker_ticks_through_queue_systems(cluster, major):
    """A second cluster whose worker ticks in a database of this module every
    200 ms: it waits for the extension, picks pg-boss and pgmq up when they
    are installed (no restart), and keeps ticking without errors through
    hostile pgmq names and a meta row without tables."""
    name = f"pytest-queues-worker-{os.getpid()}"
    w = Cluster(name)
    w.dbname = "mlworker"
    PGBOSS_MAJOR["mlworker"] = major
    subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)
    try:
        w.start("meshhook_limits.restart_grace = 0", "fsync = off", "meshhook_limits.database = 'mlworker'",
                "meshhook_limits.sample_interval = 200")
        with w.connect(dbname="postgres") as c:
            c.execute("CREATE DATABASE mlworker")
        with w.connect() as c:
            c.execute(f"CREATE EXTENSION {S}")

        def state():
            return w.sql(f"SELECT ticks, errors, last_error FROM {S}.worker_state")[0]

        def wait_ticks(more_than, timeout=10):
            deadline = time.time() + timeout
            while time.time() < deadline:
                s = state()
                if s[0] > more_than:
                    return s
                time.sleep(0.1)
            raise AssertionError(f"worker did not tick past {more_than}: {state()}")

        s0 = wait_ticks(0)
        assert w.sql(f"SELECT count(*) FROM {S}.queue_samples")[0][0] == 0
        pid = w.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker'")

        install_pgmq(w, "mlworker")
        boss(w, "mlworker", "start")
        boss(w, "mlworker", "create-queue", name="wq")
        boss(w, "mlworker", "send", name="wq", count=3)
        with w.connect() as c:
            c.execute("SELECT pgmq.create('good_ref')")
            c.execute("SELECT pgmq.send('good_ref', '{}'::jsonb)")
            hostile, missing = _hostile_setup(c, "w")
            for n in hostile:
                _fill_hostile(c, n, visible=1, invisible=1, archived=1)
        s1 = state()
        s2 = wait_ticks(s1[0] + 3)
        assert s2[1] == 0 and s2[2] is None, f"worker errors: {s2}"
        assert s2[0] > s0[0]
        rows = w.sql(f"SELECT source, queue, queued, active FROM {S}.queue_health()")
        got = {(r[0], r[1]): (r[2], r[3]) for r in rows}
        assert got[("pgboss", "wq")] == (3, 0)
        assert got[("pgmq", "good_ref")] == (1, 0)
        for n in hostile:
            assert got[("pgmq", n)] == (1, 1)
        assert ("pgmq", missing) not in got
        assert w.sql("SELECT to_regclass('public.canary')::text")[0][0] == "canary"
        # Same worker process throughout: never crashed and restarted.
        assert w.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'meshhook_limits worker'") == pid
    finally:
        subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)
    # The session cluster's launcher serves only `postgres` (which has no
    # extension): no worker ever sits in a test database.
    assert all(datname in (None, "postgres") for _, datname in worker_pid(cluster))
