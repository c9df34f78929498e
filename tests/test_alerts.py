"""Pool pressure and alerting against a real server, with the real background
worker ticking every second and real LISTEN clients (DESIGN.md
"Notifications"): alerts fire once after their "for" duration and resolve
once, reach Supabase Realtime where realtime.send exists, and a rolled-back
change sends nothing."""
import json
import os
import subprocess
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from conftest import PG_SH, Cluster, acquire, set_limit, sqlstate

NODE_DIR = Path(__file__).resolve().parent / "node"
APP = "ml_alerts_test"
REQUIRED = {"event", "tenant_id", "resource", "value", "limit", "at"}


@pytest.fixture(scope="module")
def ac():
    """Own server: the worker runs in `postgres`, max_connections is small so
    a handful of connections moves pool utilisation."""
    name = f"pytest-alerts-{os.getpid()}"
    c = Cluster(name)
    c.dbname = "postgres"
    subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)
    c.start("meshhook_limits.database = 'postgres'", "meshhook_limits.restart_grace = 0",
            "max_connections = 20", "superuser_reserved_connections = 3", "fsync = off")
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
        conn.execute("CREATE ROLE ml_pool LOGIN")
        conn.execute("CREATE ROLE ml_plain LOGIN")
    deadline = time.monotonic() + 30
    while c.sql("SELECT ticks FROM meshhook_limits.worker_state")[0][0] < 1:
        assert time.monotonic() < deadline, "the worker does not tick"
        time.sleep(0.05)
    c.usable = 17
    yield c
    subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)


def check_payload(raw: str, alert: bool = False) -> dict:
    assert len(raw.encode()) < 8000
    p = json.loads(raw)
    assert isinstance(p, dict)
    assert REQUIRED <= p.keys(), p
    datetime.fromisoformat(p["at"])
    if alert:
        assert {"rule", "severity", "labels"} <= p.keys(), p
        assert isinstance(p["labels"], dict)
    return p


def listen(c: Cluster) -> psycopg.Connection:
    conn = c.connect(application_name="ml_listener")
    conn.execute("LISTEN meshhook_limits")
    return conn


def wait_event(listener, pred, timeout: float, seen: list | None = None):
    """First notification matching pred within timeout: (payload, monotonic time) or (None, None)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for n in listener.notifies(timeout=left, stop_after=1):
            p = check_payload(n.payload, alert=json.loads(n.payload)["event"].startswith("alert."))
            if seen is not None:
                seen.append(p)
            if pred(p):
                return p, time.monotonic()
    return None, None


def drain(listener, seconds: float) -> list[dict]:
    return [check_payload(n.payload) for n in listener.notifies(timeout=seconds)]


def ticks(c: Cluster) -> int:
    return c.sql("SELECT ticks FROM meshhook_limits.worker_state")[0][0]


def drain_ticks(c: Cluster, listener, n: int = 2, timeout: float = 30) -> list[dict]:
    """The notifications until n more ticks of the worker have ended (a
    fixed time may hold none on a busy machine)."""
    got, until, deadline = [], ticks(c) + n, time.monotonic() + timeout
    while ticks(c) < until:
        assert time.monotonic() < deadline, f"not {n} ticks in {timeout} s"
        got += drain(listener, 0.1)
    return got


def server_now(conn) -> datetime:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0]


def ticks_before(conn, since: datetime, event: dict) -> int:
    """Ticks that started after `since` (server time) and before the one
    that sent `event` (its "at" is that tick's transaction start): each tick
    takes one pool sample, stamped with its start. A count of ticks, which a
    busy machine does not change, where seconds would stretch."""
    return conn.execute("SELECT count(*) FROM meshhook_limits.pool_samples WHERE sampled_at > %s "
                        "AND sampled_at < %s::timestamptz", (since, event["at"])).fetchone()[0]


def client_backends(c: Cluster) -> int:
    return c.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")[0][0] - 1


def test_pool_pressure_counts_real_connections(ac):
    conns: list[psycopg.Connection] = []
    blocked_err = []
    th = None
    try:
        with ac.connect() as admin:
            admin.execute("CREATE TABLE public.ml_lock (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
            admin.execute("INSERT INTO public.ml_lock VALUES (1)")
        for _ in range(3):  # idle
            conns.append(ac.connect(user="ml_pool", application_name=APP))
            conns[-1].execute("SELECT 1")
        for _ in range(2):  # idle in transaction
            conns.append(ac.connect(user="ml_pool", application_name=APP, autocommit=False))
            conns[-1].execute("SELECT 1")
        holder = ac.connect(application_name=APP, autocommit=False)
        conns.append(holder)
        holder.execute("SELECT * FROM public.ml_lock WHERE id = 1 FOR UPDATE")
        blocked = ac.connect(application_name=APP)
        conns.append(blocked)
        bpid = blocked.info.backend_pid

        def update():
            try:
                blocked.execute("UPDATE public.ml_lock SET v = v + 1 WHERE id = 1")
            except Exception as e:  # noqa: BLE001
                blocked_err.append(e)

        th = threading.Thread(target=update)
        th.start()
        deadline = time.monotonic() + 30
        while ac.sql("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (bpid,)) != [("Lock",)]:
            assert time.monotonic() < deadline, "the UPDATE does not wait on the row lock"
            time.sleep(0.02)
        time.sleep(1.0)  # the holder's transaction is now > 1 s old

        with ac.connect(row_factory=dict_row) as admin:
            admin.execute("SELECT meshhook_limits.tick()")
            p = admin.execute("""
              SELECT p.*, p.sampled_at - a.xact_start AS holder_age
                FROM meshhook_limits.pool_pressure() p, pg_stat_activity a
               WHERE a.pid = %s""", (holder.info.backend_pid,)).fetchone()
            assert p is not None
            rec = admin.execute("SELECT * FROM meshhook_limits.pool_recommendation()").fetchone()

        assert p["idle"] >= 3, p
        assert p["idle_in_transaction"] >= 3, p  # 2 + the lock holder
        assert p["active"] >= 1 and p["waiting"] >= 1, p
        assert p["total"] >= 8 and p["total"] >= p["active"] + p["idle"] + p["idle_in_transaction"], p
        assert p["longest_transaction"] >= p["holder_age"], p
        assert p["longest_transaction"].total_seconds() >= 1.0, p
        assert p["by_application"].get(APP, 0) >= 7, p
        assert p["by_role"].get("ml_pool", 0) == 5, p
        assert p["by_role"].get("postgres", 0) >= 3, p
        assert p["max_connections"] in (ac.usable, 20), p
        assert float(p["utilisation"]) == pytest.approx(p["total"] / ac.usable, abs=1e-4), p

        size, max_total, usable, samples, reasoning = (rec[k] for k in (
            "recommended_pool_size", "observed_max_total", "usable_connections", "samples", "reasoning"))
        assert isinstance(size, int) and 2 <= size <= usable, rec
        assert samples >= 1 and max_total >= 8, rec
        assert "p95" in reasoning and str(size) in reasoning, rec
    finally:
        for c in conns:  # the holder's rollback lets the blocked UPDATE through
            if not c.autocommit:
                c.rollback()
        if th is not None:
            th.join(5)
        for c in conns:
            c.close()
        ac.sql("DROP TABLE IF EXISTS public.ml_lock")
    assert not blocked_err


@pytest.mark.smoke
def test_pool_utilisation_alert_fires_once_and_resolves_once(ac):
    usable = ac.usable
    events: list[dict] = []
    extra: list[psycopg.Connection] = []
    with ac.connect() as admin, listen(ac) as listener:
        drain_ticks(ac, listener)  # let a tick see the listener too
        base = client_backends(ac) + 1  # + the connection counting
        # Crossed at base + 5 connections; resolved only at base + 2 or fewer.
        thr = round((base + 4.5) / usable, 4)
        clear = round((base + 2.5) / usable, 4)
        admin.execute("SELECT meshhook_limits.set_alert_rule(name => 'test_pool', metric => 'pool.utilisation', "
                      "threshold => %s::numeric, resolve_threshold => %s::numeric, for_duration => '2 seconds', severity => 'critical')",
                      (thr, clear))
        try:
            t_open = time.monotonic()
            for _ in range(6):
                extra.append(ac.connect(application_name=APP))
            t_true = server_now(admin)
            firing, t_fire = wait_event(listener, lambda p: p.get("rule") == "test_pool", 30, events)
            assert firing is not None, f"no alert.firing within 30 s; events: {events}"
            assert firing["event"] == "alert.firing", firing
            assert t_fire - t_open >= 1.9, f"fired {t_fire - t_open:.2f} s after the condition, before its 2 s"
            # Ticks a second apart: the first to see the condition, one a
            # second later, then the one 2 s after the first fires (or one
            # more, when the ticks' start times drift a little early).
            n = ticks_before(admin, t_true, firing)
            assert n <= 3, f"alert.firing {n} ticks after the condition held (for_duration 2 s, a tick a second)"
            assert firing["severity"] == "critical" and firing["resource"] == "pool.utilisation"
            assert firing["labels"] == {} and firing["tenant_id"] is None
            assert float(firing["limit"]) == pytest.approx(thr) and float(firing["value"]) > thr

            # The value moves around, even below the threshold, but stays above resolve_threshold.
            for step in (1, 1, -2, 1):
                if step > 0:
                    for _ in range(step):
                        extra.pop().close()
                else:
                    for _ in range(-step):
                        extra.append(ac.connect(application_name=APP))
                events += drain_ticks(ac, listener)
            assert [p for p in events if p.get("rule") == "test_pool"] == [firing], "repeated or flapping alerts"
            assert ac.sql("SELECT state FROM meshhook_limits.alert_states WHERE rule = 'test_pool'") == [("firing",)]

            while extra:
                extra.pop().close()
            t_close = server_now(admin)
            resolved, _ = wait_event(listener, lambda p: p.get("rule") == "test_pool", 30, events)
            assert resolved is not None and resolved["event"] == "alert.resolved", events
            # The next tick resolves (or the one after, if the closed
            # connections' backends had not yet left): no for_duration.
            n = ticks_before(admin, t_close, resolved)
            assert n <= 1, f"alert.resolved {n} ticks after the connections closed"
            assert float(resolved["value"]) <= clear
            events += drain_ticks(ac, listener)
            mine = [p["event"] for p in events if p.get("rule") == "test_pool"]
            assert mine == ["alert.firing", "alert.resolved"], mine
            assert ac.sql("SELECT count(*) FROM meshhook_limits.events WHERE payload->>'rule' = 'test_pool'"
                          ) == [(2,)]
        finally:
            for c in extra:
                c.close()
            admin.execute("DELETE FROM meshhook_limits.alert_rules WHERE name = 'test_pool'")


PGBOSS_JS = r"""
const PgBoss = require('pg-boss');
const [step, queue, n] = process.argv.slice(1);
(async () => {
  const boss = new PgBoss({ host: process.env.PGHOST, port: +process.env.PGPORT, user: 'postgres',
                            database: 'postgres', max: 2, supervise: false, schedule: false });
  boss.on('error', (e) => { console.error(e); process.exitCode = 1; });
  await boss.start();
  if (step === 'send') {
    await boss.createQueue(queue);
    for (let i = 0; i < +n; i++) await boss.send(queue, { i });
  } else {
    const jobs = await boss.fetch(queue, { batchSize: 100 });
    const ids = jobs.map((j) => j.id);
    const half = Math.ceil(ids.length / 2);
    await boss.complete(queue, ids.slice(0, half));
    await boss.deleteJob(queue, ids.slice(half));
    console.log(ids.length);
  }
  await boss.stop({ graceful: false, wait: true, close: true });
})().catch((e) => { console.error(e); process.exit(1); });
"""


def pgboss(ac, *args) -> str:
    r = subprocess.run(["node", "-e", PGBOSS_JS, *args], cwd=NODE_DIR, capture_output=True, text=True,
                       timeout=30, env={**os.environ, "PGHOST": ac.host, "PGPORT": str(ac.port)})
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_pgboss_backlog_alert(ac):
    queue = f"ml-backlog-{uuid.uuid4().hex[:8]}"
    events: list[dict] = []
    with ac.connect() as admin, listen(ac) as listener:
        admin.execute("SELECT meshhook_limits.set_alert_rule(name => 'test_backlog', metric => 'queue.queued', "
                      "threshold => 5, for_duration => '1 second', labels => %s)",
                      (json.dumps({"queue": queue}),))
        try:
            pgboss(ac, "send", queue, "10")
            t_sent = server_now(admin)
            firing, _ = wait_event(listener, lambda p: p.get("rule") == "test_backlog", 30, events)
            assert firing is not None, f"no alert within 30 s of 10 jobs; {events}"
            assert firing["event"] == "alert.firing"
            assert firing["labels"] == {"source": "pgboss", "queue": queue}
            assert firing["resource"] == "queue.queued" and float(firing["value"]) == 10
            assert float(firing["limit"]) == 5
            # The first tick sees the jobs, the one a second later fires (or
            # the one after, when the ticks' start times drift a little).
            n = ticks_before(admin, t_sent, firing)
            assert n <= 2, f"alert.firing {n} ticks after the jobs were sent (for_duration 1 s, a tick a second)"
            assert pgboss(ac, "finish", queue) == "10"
            resolved, _ = wait_event(listener, lambda p: p.get("rule") == "test_backlog", 30, events)
            assert resolved is not None and resolved["event"] == "alert.resolved", events
            assert resolved["labels"] == {"source": "pgboss", "queue": queue}
            events += drain_ticks(ac, listener)
            assert [p["event"] for p in events if p.get("rule") == "test_backlog"] == [
                "alert.firing", "alert.resolved"]
        finally:
            admin.execute("DELETE FROM meshhook_limits.alert_rules WHERE name = 'test_backlog'")


def test_rolled_back_alert_sends_nothing(ac):
    with ac.connect() as admin, listen(ac) as listener:
        with admin.transaction(force_rollback=True):
            admin.execute("SELECT meshhook_limits.set_alert_rule(name => 'test_rollback', "
                          "metric => 'pool.utilisation', threshold => 0, comparison => '>=')")
            admin.execute("SELECT meshhook_limits.tick()")
            # Inside the transaction the alert did fire ...
            assert admin.execute("SELECT count(*) FROM meshhook_limits.events "
                                 "WHERE payload->>'rule' = 'test_rollback'").fetchone()[0] == 1
        # ... but it rolled back: no NOTIFY, no row.
        got = drain(listener, 2.0)
        assert [p for p in got if p.get("rule") == "test_rollback"] == []
        assert admin.execute("SELECT count(*) FROM meshhook_limits.events "
                             "WHERE payload->>'rule' = 'test_rollback'").fetchone()[0] == 0
        assert admin.execute("SELECT count(*) FROM meshhook_limits.alert_states "
                             "WHERE rule = 'test_rollback'").fetchone()[0] == 0


def test_rolled_back_reap_does_not_lose_slot_revoked(ac, tenant):
    """A reap whose transaction rolls back (a failing tick, or an admin's
    ROLLBACK) must not swallow the revocation's notification: the next
    committed reap announces it."""
    with ac.connect() as admin, listen(ac) as listener:
        set_limit(admin, "concurrent_executions", 5, tenant)
        slot = str(acquire(admin, tenant, lease="2 seconds")[1])
        with admin.transaction(force_rollback=True):
            # Hold the worker before its reap (it blocks in pool sampling).
            admin.execute("LOCK TABLE meshhook_limits.pool_samples IN ACCESS EXCLUSIVE MODE")
            time.sleep(2.3)
            assert admin.execute("SELECT meshhook_limits.reap_execution_slots()").fetchone()[0] >= 1
        got, _ = wait_event(listener, lambda p: p["event"] == "slot.revoked" and p.get("slot_id") == slot, 30)
        assert got is not None, "slot.revoked never sent: the rolled-back reap had marked it announced"
        assert admin.execute("SELECT count(*) FROM meshhook_limits.events WHERE event = 'slot.revoked' "
                             "AND payload->>'slot_id' = %s", (slot,)).fetchone()[0] == 1


def test_payload_shape_of_every_event(ac):
    rows = ac.sql("SELECT event, payload::text FROM meshhook_limits.events")
    assert {r[0] for r in rows} >= {"alert.firing", "alert.resolved"}
    for event, raw in rows:
        p = check_payload(raw, alert=event.startswith("alert."))
        assert p["event"] == event


REALTIME_STUB = """
CREATE SCHEMA realtime;
CREATE TABLE realtime.ml_sent (payload jsonb, event text, topic text, private boolean,
                               at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
RETURNS void LANGUAGE sql AS $$ INSERT INTO realtime.ml_sent VALUES (payload, event, topic, private) $$;
"""


def test_supabase_realtime_send(ac, tenant):
    with ac.connect() as admin, listen(ac) as listener:
        admin.execute(REALTIME_STUB)
        try:
            admin.execute("SELECT meshhook_limits.set_alert_rule(name => 'test_rt', metric => 'pool.waiting', "
                          "threshold => 0, comparison => '>=')")
            firing, _ = wait_event(listener, lambda p: p.get("rule") == "test_rt", 30)
            assert firing is not None and firing["event"] == "alert.firing"
            sent = admin.execute("SELECT payload, event, topic, private FROM realtime.ml_sent "
                                 "WHERE payload->>'rule' = 'test_rt'").fetchall()
            assert sent == [(firing, "alert.firing", "meshhook_limits:admin", True)]

            set_limit(admin, "concurrent_executions", 5, tenant)
            slot = str(acquire(admin, tenant, lease="1 second")[1])
            revoked, _ = wait_event(listener, lambda p: p["event"] == "slot.revoked" and p.get("slot_id") == slot, 30)
            assert revoked is not None
            sent = admin.execute("SELECT payload, event, topic, private FROM realtime.ml_sent "
                                 "WHERE payload->>'slot_id' = %s", (slot,)).fetchall()
            assert sent == [(revoked, "slot.revoked", f"meshhook_limits:{tenant}", True)]
        finally:
            admin.execute("DELETE FROM meshhook_limits.alert_rules WHERE name = 'test_rt'")
            admin.execute("DROP SCHEMA realtime CASCADE")


@pytest.mark.parametrize("kw, value", [
    ("metric", "pool.nonsense"),
    ("comparison", "=>"),
    ("for_duration", "-1 second"),
    ("threshold", "NaN"),
    ("severity", "loud"),
])
def test_set_alert_rule_bad_input(ac, kw, value):
    args = {"name": "test_bad", "metric": "pool.waiting", "threshold": "1", kw: value}
    casts = {"threshold": "::numeric", "for_duration": "::interval"}
    call = ", ".join(f"{k} => %({k})s{casts.get(k, '')}" for k in args)
    with ac.connect() as admin:
        with pytest.raises(psycopg.Error) as e:
            admin.execute(f"SELECT meshhook_limits.set_alert_rule({call})", args)
        assert sqlstate(e) == "22023", e.value
        assert admin.execute("SELECT count(*) FROM meshhook_limits.alert_rules WHERE name = 'test_bad'"
                             ).fetchone()[0] == 0


def test_set_alert_rule_needs_admin(ac):
    with ac.connect(user="ml_plain") as plain:
        with pytest.raises(psycopg.Error) as e:
            plain.execute("SELECT meshhook_limits.set_alert_rule('test_plain', 'pool.waiting', 1)")
        assert sqlstate(e) == "42501"
        assert plain.execute("SELECT count(*) FROM meshhook_limits.alert_rules").fetchone()[0] == 0


def test_builtin_rule_can_be_disabled_by_override(ac):
    with ac.connect() as admin:
        admin.execute("SELECT meshhook_limits.set_alert_rule(name => 'pool_utilisation', metric => 'pool.utilisation', "
                      "threshold => 0.9, enabled => false)")
        try:
            rows = admin.execute("SELECT origin, enabled FROM meshhook_limits.effective_alert_rules "
                                 "WHERE name = 'pool_utilisation'").fetchall()
            assert rows == [("user", False)]
            assert admin.execute("SELECT enabled FROM meshhook_limits.builtin_alert_rules "
                                 "WHERE name = 'pool_utilisation'").fetchone() == (True,)
        finally:
            admin.execute("DELETE FROM meshhook_limits.alert_rules WHERE name = 'pool_utilisation'")
        assert admin.execute("SELECT origin, enabled FROM meshhook_limits.effective_alert_rules "
                             "WHERE name = 'pool_utilisation'").fetchall() == [("builtin", True)]


def test_firing_alert_keeps_its_episode_and_follows_the_value(ac):
    """A series that stays firing is not re-fired: its state row keeps its
    since/fired_at while its value follows the metric every tick."""
    def state():
        rows = ac.sql("SELECT state, value, since, fired_at FROM meshhook_limits.alert_states WHERE rule = 'test_value'")
        return rows[0] if rows else None

    def wait(pred, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = state()
            if s is not None and pred(s):
                return s
            time.sleep(0.1)
        raise AssertionError(f"alert state did not get there: {state()}")

    extra: list[psycopg.Connection] = []
    with ac.connect() as admin:
        admin.execute("SELECT meshhook_limits.set_alert_rule(name => 'test_value', metric => 'pool.utilisation', "
                      "threshold => 0, comparison => '>=')")
        try:
            first = wait(lambda s: s[0] == "firing")
            for _ in range(3):
                extra.append(ac.connect(application_name=APP))
            later = wait(lambda s: s[1] > first[1])
            assert (later[0], later[2], later[3]) == ("firing", first[2], first[3])
            fired = admin.execute("SELECT count(*) FROM meshhook_limits.events WHERE payload->>'rule' = 'test_value' "
                                  "AND event = 'alert.firing'").fetchone()[0]
            assert fired == 1
        finally:
            for c in extra:
                c.close()
            admin.execute("DELETE FROM meshhook_limits.alert_rules WHERE name = 'test_value'")
