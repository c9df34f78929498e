"""The background worker against a real server (DESIGN.md "Background
worker"): the launcher starts it within seconds of CREATE EXTENSION,
ticks every sample_interval, reloads on SIGHUP, survives failing ticks,
reaps expired leases, comes back after a crash, and exits for good on
SIGTERM. And tick() driven by pg_cron on a server without the preload."""
import json
import os
import signal
import statistics
import subprocess
import time
import uuid

import psycopg
import pytest

from conftest import PG_MAJOR, PG_SH, Cluster, acquire, set_limit

WORKER = "meshhook_limits worker"


def log_text(c: Cluster) -> str:
    return (c.base / "server.log").read_text(errors="replace")


def wait_for(pred, timeout: float, step: float = 0.05):
    """Poll pred() until it returns something truthy; return it (or the last falsy value)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            v = pred()
        except psycopg.OperationalError:
            v = None
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def worker_pids(c: Cluster) -> list[int]:
    with c.connect(dbname="postgres") as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = %s", (WORKER,)).fetchall()]


def state(c: Cluster):
    """(ticks, errors, last_error, seconds since last_tick)"""
    return c.sql("SELECT ticks, errors, last_error, extract(epoch FROM clock_timestamp() - last_tick)::float8 "
                 "FROM meshhook_limits.worker_state")[0]


def seconds_per_tick(c: Cluster, n: int, timeout: float = 60) -> float:
    """The median time between the starts of the next n ticks, by the
    worker's own clock (each tick takes one pool sample, stamped with its
    start). A loaded machine can only make it longer than the interval; the
    median leaves out a stray early tick (a wait the latch cut short). Fails
    when n ticks take longer than timeout."""
    [(last,)] = c.sql("SELECT max(sampled_at) FROM meshhook_limits.pool_samples")
    q = "SELECT sampled_at FROM meshhook_limits.pool_samples WHERE sampled_at >= %s ORDER BY 1"
    starts = wait_for(lambda: (r := [at for (at,) in c.sql(q, (last,))])[n:] and r, timeout)
    assert starts, f"fewer than {n} ticks in {timeout} s"
    return statistics.median((b - a).total_seconds() for a, b in zip(starts, starts[1:n + 1]))


def reload_interval(c: Cluster, change: str) -> None:
    """ALTER SYSTEM `change` (sample_interval), reload, and return once the
    worker ticks at the new interval. A session started after the postmaster
    reloaded sees the new pg_conf_load_time(); by then the postmaster has
    signalled the worker, which ticks at most twice more (one tick in flight,
    one at once on the signal) before it waits the new interval."""
    with c.connect() as conn:
        loaded = conn.execute("SELECT pg_conf_load_time()").fetchone()[0]
        conn.execute(f"ALTER SYSTEM {change}")
        conn.execute("SELECT pg_reload_conf()")
    assert wait_for(lambda: c.sql("SELECT pg_conf_load_time() > %s", (loaded,))[0][0], 30), \
        "the postmaster did not reload within 30 s"
    ticks = state(c)[0]
    assert wait_for(lambda: state(c)[0] >= ticks + 2, 30), "the worker stopped ticking on the reload"


@pytest.fixture(scope="module")
def wc():
    """A cluster whose launcher serves one database, which does not exist yet."""
    name = f"pytest-worker-{os.getpid()}"
    c = Cluster(name)
    c.dbname = "mlworker"
    subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)
    c.start(f"meshhook_limits.database = '{c.dbname}'", "meshhook_limits.restart_grace = 0", "fsync = off")
    yield c
    subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)


@pytest.mark.smoke
def test_worker_starts_within_seconds_of_create_extension(wc):
    """The launcher serves a database once it exists and has the extension:
    before, no worker stays in it and nothing fails in the log; after
    CREATE EXTENSION, one worker ticks there at once (the launcher is woken,
    not left to its next probe a minute later)."""
    with wc.connect(dbname="postgres") as conn:
        conn.execute(f"CREATE DATABASE {wc.dbname}")

    def connected():
        return wc.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = %s AND datname = %s",
                      (WORKER, wc.dbname), dbname="postgres")
    # Probed (a worker that finds no extension leaves at once), never kept.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert not wc.sql("SELECT 1 FROM pg_stat_activity WHERE backend_type = %s AND datname = %s "
                          "AND backend_start < now() - interval '2 seconds'", (WORKER, wc.dbname),
                          dbname="postgres")
        time.sleep(0.2)
    with wc.connect() as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
    # The extension's install script wakes the launcher: without that, the
    # next probe would be a minute after the one that found no extension.
    assert wait_for(lambda: state(wc)[0] >= 1, 30), "no tick within 30 s of CREATE EXTENSION"
    assert len(connected()) == 1
    assert "does not exist" not in log_text(wc) and "FATAL" not in log_text(wc)


@pytest.mark.smoke
def test_worker_ticks_every_sample_interval(wc):
    # Never sooner than the interval; later only on a very busy machine.
    spt = seconds_per_tick(wc, 4)
    assert 0.9 <= spt < 3, f"{spt:.2f} s a tick at sample_interval = 1 s"
    _, errors, last_error, _ = state(wc)
    assert errors == 0 and last_error is None
    assert wc.sql("SELECT count(*) > 0 FROM meshhook_limits.pool_samples")[0][0]


def test_sighup_reloads_sample_interval(wc):
    try:
        reload_interval(wc, "SET meshhook_limits.sample_interval = '200ms'")
        # Not sooner than 200 ms, and sooner than any 1 s interval could be.
        spt = seconds_per_tick(wc, 10)
        assert 0.18 <= spt < 0.8, f"{spt:.3f} s a tick at sample_interval = 200ms"
    finally:
        reload_interval(wc, "RESET meshhook_limits.sample_interval")
    spt = seconds_per_tick(wc, 4)
    assert spt >= 0.9, f"{spt:.3f} s a tick after RESET (back to 1 s)"


def test_worker_survives_failing_ticks(wc):
    pids = worker_pids(wc)
    with wc.connect() as conn:
        conn.execute("""CREATE FUNCTION public.ml_boom() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN RAISE EXCEPTION 'ml_boom: injected failure'; END $$""")
        # Pruning events is the one step of a tick with no guard of its own.
        conn.execute("CREATE TRIGGER ml_boom BEFORE DELETE ON meshhook_limits.events "
                     "FOR EACH STATEMENT EXECUTE FUNCTION public.ml_boom()")
        try:
            ticks0, errors0, _, _ = state(wc)
            assert wait_for(lambda: state(wc)[1] >= errors0 + 2, 30), f"not 2 failed ticks in 30 s: {state(wc)}"
            ticks1, errors1, last_error, _ = state(wc)
            assert "ml_boom: injected failure" in (last_error or "")
            assert ticks1 - ticks0 <= 1  # at most one tick that was already past the insert
            assert worker_pids(wc) == pids, "the worker died on a failing tick"
        finally:
            conn.execute("DROP TRIGGER ml_boom ON meshhook_limits.events")
            conn.execute("DROP FUNCTION public.ml_boom()")
    assert wait_for(lambda: state(wc)[0] > ticks1, 30), "no tick within 30 s after the cause was removed"
    ticks2, errors2, _, _ = state(wc)
    assert wait_for(lambda: state(wc)[0] >= ticks2 + 2, 30), "the worker stopped ticking"
    assert state(wc)[1] == errors2, "still failing after the cause was removed"
    assert "meshhook_limits worker: tick failed" in log_text(wc)
    assert worker_pids(wc) == pids


@pytest.mark.smoke
def test_worker_reaps_expired_lease_and_notifies(wc):
    tenant = str(uuid.uuid4())
    with wc.connect() as admin, wc.connect() as listener:
        listener.execute("LISTEN meshhook_limits")
        set_limit(admin, "concurrent_executions", 5, tenant)
        row = acquire(admin, tenant, lease="1 second")
        ticks0 = admin.execute("SELECT ticks FROM meshhook_limits.worker_state").fetchone()[0]
        assert row[0], row
        slot = str(row[1])
        got = None
        for n in listener.notifies(timeout=30):
            p = json.loads(n.payload)
            if p["event"] == "slot.revoked" and p.get("slot_id") == slot:
                got = p
                break
        assert got is not None, "no slot.revoked within 30 s of a 1 s lease"
        # Counted in ticks (a tick a second), not seconds, which a busy machine
        # stretches: at most one tick in flight, one before the lease runs
        # out, the one that reaps, and one more before this reads the count.
        ticks = admin.execute("SELECT ticks FROM meshhook_limits.worker_state").fetchone()[0] - ticks0
        assert ticks <= 4, f"slot.revoked {ticks} ticks after acquire (lease 1 s, a tick a second)"
        assert got["tenant_id"] == tenant and got["reason"] == "lease_expired"
        assert got["resource"] == "concurrent_executions"
        hb = admin.execute("SELECT alive, reason FROM meshhook_limits.heartbeat_execution_slot(%s)",
                           (slot,)).fetchone()
        assert hb[0] is False
        assert admin.execute("SELECT meshhook_limits.live_slots(%s)", (tenant,)).fetchone()[0] == 0


def test_worker_comes_back_after_crash(wc):
    [pid] = worker_pids(wc)
    os.kill(pid, signal.SIGKILL)  # the postmaster resets every backend (crash recovery)
    time.sleep(0.3)
    wc.wait_ready(60)
    new = wait_for(lambda: [p for p in worker_pids(wc) if p != pid], 60)
    assert new, "worker not back within 60 s of a crash"
    before = state(wc)[0]
    assert wait_for(lambda: state(wc)[0] >= before + 2, 30), "worker back but not ticking"
    assert "terminated by signal 9" in log_text(wc)


def test_sigterm_worker_exits_and_is_restarted_after_5_s(wc):
    """pg_terminate_backend sends SIGTERM: the worker leaves its loop and
    exits with code 1, and the launcher starts it again after 5 s --
    monitoring does not stop for good."""
    [pid] = worker_pids(wc)
    t0 = time.monotonic()
    assert wc.sql("SELECT pg_terminate_backend(%s)", (pid,)) == [(True,)]
    assert wait_for(lambda: pid not in worker_pids(wc), 30), "worker still running 30 s after SIGTERM"
    assert wait_for(lambda: f"(PID {pid}) exited with exit code 1" in log_text(wc), 30), log_text(wc)[-2000:]
    assert "meshhook_limits worker exiting" in log_text(wc)
    ticks = state(wc)[0]
    # Until the new worker shows (a busy machine only makes that later), with
    # nothing ticking meanwhile; each round reads the ticks before the pids,
    # so no new worker could have ticked before an empty list was read.
    deadline = time.monotonic() + 60
    while True:
        now_ticks = state(wc)[0]
        new = worker_pids(wc)
        seen = time.monotonic()
        if new:
            break
        assert now_ticks == ticks, "something ticked while the worker was gone"
        assert seen < deadline, "worker not restarted within 60 s of SIGTERM"
        time.sleep(0.05)
    assert new != [pid]
    assert seen - t0 >= 4.5, f"restarted {seen - t0:.2f} s after SIGTERM, before 5 s"
    assert wait_for(lambda: state(wc)[0] > ticks, 30), "restarted worker does not tick"


@pytest.fixture(scope="module", autouse=True)
def croncluster():
    """A server with pg_cron preloaded and meshhook_limits not preloaded (so no
    worker): pg_cron runs tick(). Set up before the other tests of this module,
    since pg_cron before 1.5 (Debian bookworm ships 1.4.2) cannot schedule by
    the second, only every minute: the wait then overlaps the other tests.
    pg_cron is Debian's package, for PostgreSQL 15 only: on other versions
    the two pg_cron tests are skipped (and on 15 its absence fails them)."""
    if PG_MAJOR != 15:
        yield None
        return
    name = f"pytest-cron-{os.getpid()}"
    c = Cluster(name)
    subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)
    c.start("shared_preload_libraries = 'pg_cron'", f"cron.database_name = '{c.dbname}'",
            f"cron.host = '{c.base}'", "fsync = off")
    with c.connect(dbname="postgres") as conn:
        conn.execute(f"CREATE DATABASE {c.dbname}")
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION pg_cron")
        conn.execute("CREATE EXTENSION meshhook_limits")
        c.cron_version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'").fetchone()[0]
        try:
            conn.execute("SELECT cron.schedule('meshhook', '1 second', 'SELECT meshhook_limits.tick()')")
            c.cron_every = 1.0
        except psycopg.errors.InvalidParameterValue:  # pg_cron < 1.5: "invalid schedule: 1 second"
            conn.execute("SELECT cron.schedule('meshhook', '* * * * *', 'SELECT meshhook_limits.tick()')")
            c.cron_every = 60.0
    c.scheduled_at = time.monotonic()
    yield c
    subprocess.run([str(PG_SH), "destroy", name], check=False, capture_output=True)


def needs_pg_cron(croncluster):
    if croncluster is None:
        pytest.skip(f"pg_cron is packaged here for PostgreSQL 15 only, not {PG_MAJOR}")
    return croncluster


def test_pg_cron_drives_tick_without_preload(croncluster):
    c = needs_pg_cron(croncluster)
    assert c.sql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = %s", (WORKER,)) == [(0,)]
    want = 2 if c.cron_every == 1.0 else 1
    # Wait for pg_cron to have run the job `want` times (succeeded or not).
    timeout = c.scheduled_at + (6 if c.cron_every == 1.0 else 65) - time.monotonic()
    wait_for(lambda: c.sql("SELECT count(*) FROM cron.job_run_details WHERE status IN ('succeeded', 'failed')"
                           )[0][0] >= want, max(timeout, 1), step=0.2)
    runs = c.sql("SELECT status, return_message FROM cron.job_run_details ORDER BY runid")
    assert runs, f"pg_cron {c.cron_version} ran nothing"
    assert all(r[0] == "succeeded" for r in runs), f"pg_cron {c.cron_version} runs: {runs}"
    assert state(c)[0] >= want, f"worker_state.ticks = {state(c)[0]} after {len(runs)} pg_cron runs"
    with c.connect() as conn:
        p = conn.execute("SELECT total, sampled_at FROM meshhook_limits.pool_pressure()").fetchone()
        assert p is not None and p[0] >= 1


def test_tick_as_first_call_of_a_session_without_preload(croncluster):
    """What every pg_cron job does: a fresh connection whose first statement is
    tick(), with the library not loaded yet in that session."""
    with needs_pg_cron(croncluster).connect() as conn:
        conn.execute("SELECT meshhook_limits.tick()")


@pytest.mark.smoke
def test_worker_runs_as_the_configured_role():
    """meshhook_limits.worker_role: the worker connects as a member of
    meshhook_limits_admin, not as the bootstrap superuser; before the role
    exists it waits quietly."""
    from conftest import destroy_cluster, fresh_cluster
    c = fresh_cluster("workerrole", "meshhook_limits.database = 'mltest'", "meshhook_limits.restart_grace = 0",
                      "meshhook_limits.worker_role = 'ml_worker'", "fsync = off")
    try:
        assert wait_for(lambda: "does not exist; waiting for it" in log_text(c), 12), log_text(c)[-2000:]
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION meshhook_limits")
            conn.execute("CREATE ROLE ml_worker LOGIN NOSUPERUSER IN ROLE meshhook_limits_admin")

        def as_role():
            rows = c.sql("SELECT usename FROM pg_stat_activity WHERE backend_type = %s AND datname = 'mltest'",
                         (WORKER,), dbname="postgres")
            return rows == [("ml_worker",)]
        assert wait_for(as_role, 10), log_text(c)[-2000:]
        assert wait_for(lambda: state(c)[0] >= 2, 5), "no ticks as ml_worker"
        assert state(c)[1] == 0, state(c)
    finally:
        destroy_cluster(c)
