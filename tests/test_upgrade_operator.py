"""An upgrade done the way an operator does it, on a real server: 0.1.0 built
and installed from its commit, real state (limits, plans, usage, a tracked
table, a firing alert, events, live slots and rate buckets), the current
library installed over it (unlink, then copy, as scripts/setup.sh does), a
restart, calls of the 0.1.0 SQL through the new library, `ALTER EXTENSION
meshhook_limits UPDATE`, then pg_dump/restore of the upgraded database.

0.1.0 was released for PostgreSQL 15 only, so this runs on 15 (scripts/
test.sh runs the full suite on 15). The server runs from a relocated copy of
the PostgreSQL installation, so that installing 0.1.0 into it does not touch
the installation the other tests use."""
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import (CURRENT_VERSION, PG_BIN, PG_MAJOR, ROOT, Cluster, catalog_difference, catalog_of,
                      destroy_cluster)

pytestmark = pytest.mark.skipif(PG_MAJOR != 15, reason="0.1.0 was released for PostgreSQL 15 only")

OLD = "0.1.0"
# Tables whose rows are the extension's durable state, as 0.1.0 has them.
STATE_TABLES = ["plans", "tenant_plans", "limits", "usage_counters", "tracked_tables", "alert_rules",
                "alert_states", "events", "queue_thresholds"]
# Columns that move by design: an alert state's value is the latest
# evaluation (storage ratios change as 0.2.0 counts rows again).
MOVING = {"alert_states": {"value"}}


def release_commit(version: str) -> str:
    for line in (ROOT / "sql" / "releases.txt").read_text().splitlines():
        if line and not line.startswith("#") and line.split()[0] == version:
            return line.split()[1]
    raise AssertionError(f"{version} is not in sql/releases.txt")


def pg_config(bin_dir: Path, *args: str) -> str:
    return subprocess.run([str(bin_dir / "pg_config"), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def relocated_installation(base: Path) -> Path:
    """A copy of this machine's PostgreSQL 15 (Debian's layout; PostgreSQL
    finds its lib and share directories relative to its binaries) without
    meshhook_limits. Returns its bin directory."""
    system = Path(PG_BIN)
    for src in (Path(pg_config(system, "--bindir")).parent, Path(pg_config(system, "--sharedir")),
                Path(pg_config(system, "--includedir-server"))):
        dst = base / src.relative_to("/usr")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, symlinks=True)
    bin_dir = base / Path(pg_config(system, "--bindir")).relative_to("/usr")
    assert pg_config(bin_dir, "--pkglibdir").startswith(str(base)), "the copy is not relocatable"
    for f in Path(pg_config(bin_dir, "--pkglibdir")).glob("meshhook_limits*"):
        f.unlink()
    for f in (Path(pg_config(bin_dir, "--sharedir")) / "extension").glob("meshhook_limits*"):
        f.unlink()
    subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
    return bin_dir


def install_release_from_commit(version: str, bin_dir: Path, work: Path) -> None:
    """git worktree of the release's commit, `cargo pgrx install` into the
    copy, then the worktree goes. Its build has a target directory of its
    own (target/released, kept between runs): sharing this checkout's would
    leave the old library in target/release, where the next install of
    this checkout would find it fresh and copy it."""
    tree = work / f"src-{version}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), release_commit(version)],
                   check=True, capture_output=True)
    try:
        env = {**os.environ, "CARGO_TARGET_DIR": str(ROOT / "target" / "released"), "CARGO_TERM_COLOR": "never"}
        r = subprocess.run(["cargo", "pgrx", "install", "--release", "--pg-config", str(bin_dir / "pg_config")],
                           cwd=tree, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    built = Path(pg_config(bin_dir, "--sharedir")) / "extension" / f"meshhook_limits--{version}.sql"
    frozen = ROOT / "sql" / "released" / f"meshhook_limits--{version}.sql"
    assert built.read_text() == frozen.read_text(), f"{frozen} is not what {version}'s commit builds"


def install_current_library(bin_dir: Path) -> None:
    """What scripts/setup.sh does to an installation: unlink the library (a
    running server keeps its mapped copy), copy the new one, then the control
    file and every install and upgrade script."""
    lib = Path(pg_config(bin_dir, "--pkglibdir")) / "meshhook_limits.so"
    lib.unlink()
    shutil.copy2(Path(pg_config(Path(PG_BIN), "--pkglibdir")) / "meshhook_limits.so", lib)
    ext = Path(pg_config(Path(PG_BIN), "--sharedir")) / "extension"
    for f in ext.glob("meshhook_limits*"):
        shutil.copy2(f, Path(pg_config(bin_dir, "--sharedir")) / "extension" / f.name)


def rows(conn, table: str, columns: list[str]) -> list[str]:
    cols = ", ".join(columns)
    return sorted(r[0] for r in conn.execute(
        f"SELECT row_to_json(x)::text FROM (SELECT {cols} FROM meshhook_limits.{table}) x").fetchall())


def columns(conn, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", (f"meshhook_limits.{table}",)).fetchall() if r[0] not in MOVING.get(table, ())]


def state(conn, cols: dict[str, list[str]]) -> dict[str, list[str]]:
    return {t: rows(conn, t, c) for t, c in cols.items()}


def firing_events(conn, rule: str) -> int:
    return conn.execute("SELECT count(*) FROM meshhook_limits.events WHERE event = 'alert.firing' "
                        "AND payload->>'rule' = %s", (rule,)).fetchone()[0]


def acquire(conn, tenant, project=None):
    return conn.execute("SELECT granted, slot_id, reason FROM meshhook_limits.acquire_execution_slot(%s, %s)",
                        (tenant, project)).fetchone()


class World:
    """The state made under 0.1.0 and what it must keep meaning."""

    def __init__(self):
        self.t1, self.t2, self.project = (str(uuid.uuid4()) for _ in range(3))
        self.slots: list[str] = []

    def create(self, c):
        c.execute("SELECT meshhook_limits.create_plan('pro')")
        c.execute("SELECT meshhook_limits.set_plan_limit('pro', 'concurrent_executions', 2)")
        c.execute("SELECT meshhook_limits.assign_plan(%s, 'pro')", (self.t1,))
        c.execute("SELECT meshhook_limits.set_limit('concurrent_executions', 1, %s, %s)", (self.t1, self.project))
        c.execute("SELECT meshhook_limits.set_limit('storage_bytes', 1000, %s)", (self.t1,))
        c.execute("SELECT meshhook_limits.set_limit('requests_per_second', 1, %s, burst => 1)", (self.t1,))
        c.execute("SELECT meshhook_limits.set_limit('executions_per_day', 10, window_length => '1 day')")
        c.execute("SELECT meshhook_limits.set_queue_thresholds('pgmq', 'orders', warn_queued => 100)")
        c.execute("SELECT meshhook_limits.record_usage(%s, 'executions_per_day', 9)", (self.t1,))
        c.execute("CREATE TABLE public.docs (tenant uuid, body text)")
        c.execute("SELECT meshhook_limits.track_storage('public.docs', 'tenant')")
        c.execute("INSERT INTO public.docs SELECT %s, repeat('x', 100) FROM generate_series(1, 5)", (self.t1,))
        c.execute("SELECT meshhook_limits.set_alert_rule(name => 'upgrade_usage', metric => 'tenant.usage_ratio', "
                  "threshold => 0.5, for_duration => '0')")
        c.execute("SELECT meshhook_limits.tick()")
        self.firing = firing_events(c, "upgrade_usage")  # one per series: each usage ratio over 0.5
        assert self.firing >= 1
        # Live state in shared memory: two slots of the plan's two, a rate bucket
        # spent (once the restart grace of the server's start is over).
        while acquire(c, self.t2)[2] == "recovering":
            time.sleep(0.2)
        for _ in range(2):
            granted, slot, _reason = acquire(c, self.t1)
            assert granted
            self.slots.append(str(slot))
        assert acquire(c, self.t1)[2] == "tenant_limit"
        assert c.execute("SELECT allowed FROM meshhook_limits.check_rate_limit(%s)", (self.t1,)).fetchone() == (True,)
        assert c.execute("SELECT allowed FROM meshhook_limits.check_rate_limit(%s)", (self.t1,)).fetchone() == (False,)

    def enforced(self, c, grace_over: bool = True):
        """Everything the state means, checked through the current version."""
        eff = {r[0]: r[1:] for r in c.execute(
            "SELECT resource, limit_value, source FROM meshhook_limits.effective_limits(%s)", (self.t1,)).fetchall()}
        assert eff["concurrent_executions"] == (2, "plan")
        assert eff["storage_bytes"] == (1000, "tenant")
        assert eff["executions_per_day"] == (10, "global")
        assert c.execute("SELECT used FROM meshhook_limits.usage(%s) WHERE resource = 'executions_per_day'",
                         (self.t1,)).fetchone() == (9,)
        # The tracked table: counted the current way, still refusing growth over quota.
        assert c.execute("SELECT bytes FROM meshhook_limits.storage_totals WHERE tenant_id = %s",
                         (self.t1,)).fetchone() == (5 * (16 + 100),)
        with pytest.raises(psycopg.Error) as e:
            c.execute("INSERT INTO public.docs SELECT %s, repeat('y', 500)", (self.t1,))
        assert e.value.sqlstate == "53400"
        # The firing alert stays firing, and is not sent again.
        c.execute("SELECT meshhook_limits.tick()")
        assert c.execute("SELECT state FROM meshhook_limits.alert_states WHERE rule = 'upgrade_usage'"
                         ).fetchall() == [("firing",)] * self.firing
        assert firing_events(c, "upgrade_usage") == self.firing
        if grace_over:
            # Slots and rate buckets started empty with the server; the limits hold.
            got = [acquire(c, self.t1) for _ in range(3)]
            assert [g[0] for g in got] == [True, True, False] and got[2][2] == "tenant_limit", got
            for g in got[:2]:
                c.execute("SELECT meshhook_limits.release_execution_slot(%s)", (g[1],))
            got = [acquire(c, self.t1, self.project) for _ in range(2)]
            assert [g[0] for g in got] == [True, False] and got[1][2] == "project_limit", got
            c.execute("SELECT meshhook_limits.release_execution_slot(%s)", (got[0][1],))
            assert [r[0] for r in c.execute("SELECT allowed FROM meshhook_limits.check_rate_limit(%s) "
                                            "UNION ALL SELECT allowed FROM meshhook_limits.check_rate_limit(%s)",
                                            (self.t1, self.t1)).fetchall()] in ([True, False], [False, False])


# What a backend may call in the window between the restart on the new
# library and ALTER EXTENSION UPDATE: every 0.1.0 function a worker, a tenant
# or an admin calls. Each must give its answer or a clear error.
def window_calls(w: World) -> list[tuple[str, str, tuple]]:
    t, slot = w.t1, w.slots[0]
    return [
        ("acquire_execution_slot", "SELECT * FROM meshhook_limits.acquire_execution_slot(%s)", (t,)),
        ("heartbeat_execution_slot", "SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (slot,)),
        ("release_execution_slot", "SELECT meshhook_limits.release_execution_slot(%s)", (slot,)),
        ("check_rate_limit", "SELECT * FROM meshhook_limits.check_rate_limit(%s)", (t,)),
        ("pause_rate_limit", "SELECT meshhook_limits.pause_rate_limit(%s, 'default', now() + interval '1 second')", (t,)),
        ("rate_limit_stats", "SELECT * FROM meshhook_limits.rate_limit_stats()", ()),
        ("effective_limits", "SELECT * FROM meshhook_limits.effective_limits(%s)", (t,)),
        ("usage", "SELECT * FROM meshhook_limits.usage(%s)", (t,)),
        ("record_usage", "SELECT meshhook_limits.record_usage(%s, 'executions_per_day', 1)", (w.t2,)),
        ("set_limit", "SELECT meshhook_limits.set_limit('concurrent_executions', 5, %s)", (w.t2,)),
        ("storage write", "INSERT INTO public.docs VALUES (%s, 'z')", (w.t2,)),
        ("apply_session_limits", "SELECT meshhook_limits.apply_session_limits(%s)", (t,)),
        ("slots", "SELECT * FROM meshhook_limits.slots()", ()),
        ("slot_stats", "SELECT * FROM meshhook_limits.slot_stats()", ()),
        ("reap_execution_slots", "SELECT meshhook_limits.reap_execution_slots()", ()),
        ("pool_pressure", "SELECT * FROM meshhook_limits.pool_pressure()", ()),
        ("queue_health", "SELECT * FROM meshhook_limits.queue_health()", ()),
        ("metrics", "SELECT meshhook_limits.metrics()", ()),
        ("tick", "SELECT meshhook_limits.tick()", ()),
    ]


def release_server(version: str, tag: str, grace: str):
    """A server running `version`, built from its commit, in a relocated copy
    of the installation, with databases app (served by the worker) and
    fresh; destroyed when the generator is closed."""
    base = Path(f"/tmp/meshhook_limits/{tag}-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    bin_dir = relocated_installation(base / "install")
    install_release_from_commit(version, bin_dir, base)
    c = Cluster(f"pytest-{tag}-{os.getpid()}", bin=str(bin_dir))
    destroy_cluster(c)
    c.dbname = "app"
    c.start(f"meshhook_limits.restart_grace = '{grace}'", "meshhook_limits.database = 'app'", "fsync = off")
    with c.connect(dbname="postgres") as conn:
        conn.execute("CREATE DATABASE app")
        conn.execute("CREATE DATABASE fresh")
    c.bin_dir = bin_dir
    yield c
    destroy_cluster(c)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def old_server():
    yield from release_server(OLD, "upgrade", "3s")


def test_operator_upgrade_from_0_1_0(old_server):
    c, w = old_server, World()
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'"
                            ).fetchone() == (OLD,)
        w.create(conn)
        cols = {t: columns(conn, t) for t in STATE_TABLES}
        before = state(conn, cols)
        assert all(before[t] for t in ["plans", "limits", "usage_counters", "tracked_tables", "alert_states", "events"])

        # The new library goes in under the running server; the old one stays mapped.
        install_current_library(c.bin_dir)
        assert conn.execute("SELECT granted FROM meshhook_limits.acquire_execution_slot(%s)", (w.t2,)).fetchone()

    c.restart()
    log_mark = len((c.base / "server.log").read_text(errors="replace"))

    # The window: new library, 0.1.0 SQL.
    answers = {}
    with c.connect() as conn:
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'"
                            ).fetchone() == (OLD,)
        for name, sql, args in window_calls(w):
            try:
                conn.execute(sql, args)
                answers[name] = "ok"
            except psycopg.Error as e:
                answers[name] = f"{e.sqlstate}: {e}"
                assert e.sqlstate and e.sqlstate != "XX000", f"{name}: {e.sqlstate} {e}"
                assert "backtrace" not in str(e.diag.message_detail or "") and " 0: " not in str(e), f"{name}: {e}"
                # The one error the window may give says what to do.
                assert e.sqlstate == "55000", f"{name}: {e.sqlstate} {e}"
                assert e.diag.message_hint == "Run ALTER EXTENSION meshhook_limits UPDATE in this database.", name
            assert conn.execute("SELECT 1").fetchone() == (1,), name
    time.sleep(1.5)  # a worker tick or two on the old SQL
    log = (c.base / "server.log").read_text(errors="replace")[log_mark:]
    assert "terminated by signal" not in log and "PANIC" not in log, log[-3000:]
    print(json.dumps(answers, indent=1))

    with c.connect() as conn:
        conn.execute("ALTER EXTENSION meshhook_limits UPDATE")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'"
                            ).fetchone() == (CURRENT_VERSION,)
    with c.connect(dbname="fresh") as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
        fresh_catalog = catalog_of(conn)

    def check(dbname: str):
        with c.connect(dbname=dbname) as conn:
            assert catalog_difference(fresh_catalog, catalog_of(conn)) == ([], [])
            after = state(conn, cols)
            for t in STATE_TABLES:  # every row is still there (the window's calls added some)
                assert set(before[t]) <= set(after[t]), (t, sorted(set(before[t]) - set(after[t])))
            w.enforced(conn)

    # Slots held before the restart are gone: refused while the grace runs,
    # and their holders learn it at their next heartbeat.
    with c.connect() as conn:
        assert conn.execute("SELECT alive, reason FROM meshhook_limits.heartbeat_execution_slot(%s)",
                            (w.slots[1],)).fetchone() == (False, "not_found")
    time.sleep(3)
    check("app")

    # pg_dump/restore of the upgraded database.
    dump = c.base / "app.dump"
    conn_args = ["-h", c.host, "-p", str(c.port), "-U", "postgres"]
    subprocess.run([str(c.bin_dir / "pg_dump"), *conn_args, "-Fc", "-d", "app", "-f", str(dump)], check=True)
    with c.connect(dbname="postgres") as conn:
        conn.execute("CREATE DATABASE restored")
    r = subprocess.run([str(c.bin_dir / "pg_restore"), *conn_args, "-d", "restored", "--exit-on-error", str(dump)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check("restored")


@pytest.fixture(scope="module")
def server_020():
    yield from release_server("0.2.0", "upgrade020", "60s")


def test_operator_upgrade_from_0_2_0_with_claimed_jobs_in_flight(server_020):
    """0.2.0 claims jobs from pg-boss and pgmq (workers hold them); the new
    library goes in and the server restarts; in the window claim_jobs says
    to update (55000) and admits nothing; after ALTER EXTENSION UPDATE the
    catalog equals a fresh install, the jobs still running count against
    the limit (rebuilt from the queues), and the next job is claimed when
    one ends -- well within the 60 s restart grace."""
    from test_queues import boss, install_pgmq
    c = server_020
    t = str(uuid.uuid4())
    install_pgmq(c, "app")
    boss(c, "app", "start")
    boss(c, "app", "create-queue", name="webhooks")
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'"
                            ).fetchone() == ("0.2.0",)
        conn.execute("SELECT pgmq.create('orders')")
        conn.execute("SELECT meshhook_limits.set_limit('concurrent_executions', 4, %s)", (t,))
        conn.execute("SELECT meshhook_limits.bind_queue('pgboss', 'webhooks')")
        conn.execute("SELECT meshhook_limits.bind_queue('pgmq', 'orders')")
        for i in range(5):
            boss(c, "app", "send", name="webhooks", data={"tenant_id": t, "i": i})
        conn.execute("SELECT pgmq.send_batch('orders', ARRAY(SELECT jsonb_build_object('tenant_id', %s::text, 'i', i) "
                     "FROM generate_series(1, 5) i))", (t,))
        # 0.2.0's restart grace after the server's start: wait it out.
        deadline = time.monotonic() + 90
        boss_jobs = []
        while not boss_jobs and time.monotonic() < deadline:
            boss_jobs = conn.execute("SELECT job_id FROM meshhook_limits.claim_jobs('pgboss', 'webhooks', 2)").fetchall()
            time.sleep(0.5)
        assert len(boss_jobs) == 2
        mq = conn.execute("SELECT job_id FROM meshhook_limits.claim_jobs('pgmq', 'orders', 2, '10 minutes')").fetchall()
        assert len(mq) == 2
        install_current_library(c.bin_dir)
    c.restart()

    with c.connect() as conn:
        # The window: new library, 0.2.0 SQL.
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT * FROM meshhook_limits.claim_jobs('pgboss', 'webhooks', 10)")
        assert e.value.sqlstate == "55000", e.value
        assert e.value.diag.message_hint == "Run ALTER EXTENSION meshhook_limits UPDATE in this database."
        conn.execute("ALTER EXTENSION meshhook_limits UPDATE")
        assert conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'"
                            ).fetchone() == (CURRENT_VERSION,)
        # 4 running (2 + 2), limit 4: nothing more, though 6 jobs wait.
        assert conn.execute("SELECT count(*) FROM meshhook_limits.claim_jobs('pgboss', 'webhooks', 10)"
                            ).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM meshhook_limits.claim_jobs('pgmq', 'orders', 10)").fetchone() == (0,)
        assert conn.execute("SELECT meshhook_limits.live_slots(%s)", (t,)).fetchone() == (4,)
        # The update gave the pg-boss binding its index on when jobs are
        # due, which claim_jobs reads the due jobs through.
        assert conn.execute("SELECT count(*) FROM meshhook_limits.queue_bindings b JOIN pg_class c "
                            "ON c.relname = b.index_name || '_at' WHERE b.queue = 'webhooks'").fetchone() == (1,)
        conn.execute("UPDATE pgboss.job SET state = 'completed', completed_on = now() WHERE id = %s",
                     (boss_jobs[0][0],))
        got = conn.execute("SELECT job_id, retry_count FROM meshhook_limits.claim_jobs('pgboss', 'webhooks', 10)"
                           ).fetchall()
        assert len(got) == 1 and got[0][1] == 0
    with c.connect(dbname="fresh") as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
        fresh_catalog = catalog_of(conn)
    with c.connect() as conn:
        assert catalog_difference(fresh_catalog, catalog_of(conn)) == ([], [])
