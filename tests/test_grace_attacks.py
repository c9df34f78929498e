"""Red-team of the restart grace (rt22): ways the grace is skipped while a
holder from before the start can still exist, or kept when none can.

Each test has its own cluster (60 s grace unless said) and real restarts."""
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import PG_BIN, Cluster, acquire, destroy_cluster, fresh_cluster

S = "meshhook_limits"
RECORD = "meshhook_limits.clean_shutdown"
AS_PG = ["runuser", "-u", "postgres", "--"]


def new_cluster(name, *conf):
    c = fresh_cluster(name, "meshhook_limits.restart_grace = '60s'", "fsync = off",
                      "meshhook_limits.database = 'postgres'", *conf)
    with c.connect() as conn:
        conn.execute(f"CREATE EXTENSION {S}")
    return c


def refused(c, dbname=None, host=None, port=None):
    dsn = c.dsn(dbname) if host is None else f"host={host} port={port} user=postgres dbname={dbname or c.dbname}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        r = acquire(conn, str(uuid.uuid4()))
    return r[2] == "recovering", r


def hold_slot(c, tenant=None):
    with c.connect() as conn:
        r = acquire(conn, tenant or str(uuid.uuid4()), lease="10 minutes")
        assert r[0], r
        return r


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture
def cl(request):
    c = new_cluster(request.node.name[5:30])
    yield c
    destroy_cluster(c)


# --------------------------------------------------------------- findings

def test_a_rolled_back_create_extension_does_not_end_the_grace(cl):
    """A holder from before the start, its database in the grace. A superuser
    runs DROP + CREATE EXTENSION in a transaction that rolls back (a failed
    migration, a dry run): the extension and its limits are as before, yet
    the mark set by the rolled-back install script stays in shared memory."""
    hold_slot(cl)
    cl.restart("fast")
    assert refused(cl)[0]
    with cl.connect(autocommit=False) as conn:
        conn.execute(f"DROP EXTENSION {S} CASCADE")
        conn.execute(f"CREATE EXTENSION {S}")
        conn.rollback()
    with cl.connect() as conn:
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = %s", (S,)).fetchone() == (1,)
    is_refused, r = refused(cl)
    assert is_refused, f"grace skipped after a rolled-back CREATE EXTENSION: {r}"


def test_drop_and_create_extension_during_the_grace_keeps_it(cl):
    """The same, committed: the database had the extension (and holders) at
    the start; re-creating it and putting its limits back (pg_restore
    --data-only, a provisioning script) must not admit beside them."""
    t = str(uuid.uuid4())
    with cl.connect() as conn:
        conn.execute(f"SELECT {S}.set_limit('concurrent_executions', 1, %s)", (t,))
    hold_slot(cl, t)
    cl.restart("fast")
    with cl.connect() as conn:
        conn.execute(f"DROP EXTENSION {S} CASCADE")
        conn.execute(f"CREATE EXTENSION {S}")
        conn.execute(f"SELECT {S}.set_limit('concurrent_executions', 1, %s)", (t,))
        r = acquire(conn, t)
    # The holder from before still runs with its slot: a second one over-admits.
    assert r[2] == "recovering", f"limit 1 over-admitted beside a holder from before the start: {r}"


def test_a_clean_shutdown_after_a_crash_restart_is_recorded(cl):
    """A backend crash restarts shared memory; shmem_exit(1) runs and empties
    the postmaster's before_shmem_exit list, and grace.rs registers the exit
    hook on the first start only. A later clean shutdown with no slot held
    then writes no record, and the next start gets a grace it should not."""
    with cl.connect() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 60
    while True:
        try:
            cl.wait_ready()
            with cl.connect() as conn:
                conn.execute("SELECT 1")
            break
        except psycopg.OperationalError:
            assert time.time() < deadline
            time.sleep(0.2)
    with cl.connect() as conn:
        assert conn.execute(f"SELECT count(*) FROM {S}.slots()").fetchone() == (0,)
    cl.stop("fast")
    assert (cl.data / RECORD).exists(), "no record after a clean shutdown with no slot held"
    cl.pg_ctl("-w", "-t", "60", "start")
    cl.wait_ready()
    assert not refused(cl)[0]


def test_a_cold_backup_restored_gets_the_grace(cl):
    """A cold (file-level) backup taken while the server was cleanly stopped
    carries the record and a pg_control at that very checkpoint: the server
    cannot tell its restore from a plain restart. The server then runs, a
    worker takes a slot, the server is lost (immediate stop), the backup is
    restored: the holder still runs. docs/operations.md says to remove the
    record when restoring such a copy; done so, the start has its grace."""
    backup = cl.base / "backup"
    cl.stop("fast")
    assert (cl.data / RECORD).exists()
    subprocess.run(["cp", "-a", str(cl.data), str(backup)], check=True)
    cl.pg_ctl("-w", "-t", "60", "start")
    cl.wait_ready()
    hold_slot(cl)
    cl.stop("immediate")
    subprocess.run(["rm", "-rf", str(cl.data)], check=True)
    subprocess.run(["mv", str(backup), str(cl.data)], check=True)
    assert (cl.data / RECORD).exists()
    (cl.data / RECORD).unlink()   # as docs/operations.md says
    cl.pg_ctl("-w", "-t", "60", "start")
    cl.wait_ready()
    is_refused, r = refused(cl)
    assert is_refused, f"a restored cold backup skipped the grace while a holder runs: {r}"


def test_pg_upgrade_keeps_the_grace():
    """The old cluster stops (fast) with a slot held: pg_upgrade needs it
    shut down, its workers keep running. pg_upgrade's own last start and
    stop of the new cluster (to write wal_level) is a clean shutdown with no
    live slot, so it records one; the new cluster's first real start then
    admits beside the old holders."""
    old = new_cluster("upg-old")
    newbase = Path(f"/tmp/meshhook_limits/pytest-upg-new-{os.getpid()}")
    try:
        hold_slot(old)
        old.stop("fast")
        subprocess.run(["rm", "-rf", str(newbase)])
        newbase.mkdir(parents=True)
        subprocess.run(["chown", "postgres", str(newbase)], check=True)
        newdata = newbase / "data"
        subprocess.run([*AS_PG, f"{PG_BIN}/initdb", "-D", str(newdata), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8", "--locale=C.UTF-8"], check=True, capture_output=True)
        port = free_port()
        with open(newdata / "postgresql.conf", "a") as f:
            f.write(f"port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{newbase}'\n"
                    "shared_preload_libraries = 'meshhook_limits'\nmeshhook_limits.restart_grace = '60s'\n"
                    "meshhook_limits.database = 'postgres'\nfsync = off\n")
        r = subprocess.run([*AS_PG, "sh", "-c",
                            f"cd {newbase} && {PG_BIN}/pg_upgrade -b {PG_BIN} -B {PG_BIN} "
                            f"-d {old.data} -D {newdata} -p {free_port()} -P {free_port()} "
                            f"-s {newbase}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        recorded = (newdata / RECORD).exists()  # pg_upgrade's own last stop left one
        subprocess.run([*AS_PG, f"{PG_BIN}/pg_ctl", "-D", str(newdata), "-l", str(newbase / "log"),
                        "-w", "start"], check=True, capture_output=True)
        is_refused, r = refused(old, host=str(newbase), port=port)
        assert is_refused, f"the upgraded cluster admits beside the old cluster's holders (record: {recorded}): {r}"
    finally:
        subprocess.run([*AS_PG, f"{PG_BIN}/pg_ctl", "-D", str(newbase / "data"), "-m", "immediate", "-w",
                        "stop"], capture_output=True)
        subprocess.run(["rm", "-rf", str(newbase)])
        destroy_cluster(old)


def test_a_promoted_standby_gets_a_grace(cl):
    """Failover: the primary holds a slot and is lost; the standby (started
    long enough ago that its own start grace is over) is promoted, and the
    workers reconnect to it. Nothing refuses: holders from the old primary
    run beside new grants. (Not new in this change: the grace is only ever
    set at a start.)"""
    base = Path(f"/tmp/meshhook_limits/standby-rt22-{uuid.uuid4().hex[:8]}")
    data = base / "data"
    base.mkdir(parents=True)
    subprocess.run(["chown", "postgres", str(base)], check=True)
    port = free_port()
    try:
        subprocess.run([*AS_PG, f"{PG_BIN}/pg_basebackup", "-h", cl.host, "-p", str(cl.port), "-U", "postgres",
                        "-D", str(data), "-R", "-X", "stream"], check=True, capture_output=True)
        with open(data / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {port}\nunix_socket_directories = '{base}'\nmeshhook_limits.worker = off\n"
                    "meshhook_limits.restart_grace = '2s'\n")
        subprocess.run([*AS_PG, f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(base / "log"), "-w", "start"],
                       check=True, capture_output=True)
        hold_slot(cl)
        time.sleep(3)  # the standby's own start grace (2 s) is over
        cl.stop("immediate")  # the primary is lost with its holder running
        subprocess.run([*AS_PG, f"{PG_BIN}/pg_ctl", "-D", str(data), "-w", "promote"], check=True,
                       capture_output=True)
        is_refused, r = refused(cl, host=str(base), port=port)
        assert is_refused, f"a promoted standby admits at once beside the old primary's holders: {r}"
    finally:
        subprocess.run([*AS_PG, f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        subprocess.run(["rm", "-rf", str(base)])


# ------------------------------------------------------ attacks that hold

def test_a_smart_stop_with_a_slot_held_means_a_grace(cl):
    hold_slot(cl)
    cl.restart("smart")
    assert not (cl.data / RECORD).exists()
    assert refused(cl)[0]


def test_an_expired_but_unreaped_slot_at_shutdown_means_a_grace(cl):
    with cl.connect() as conn:
        assert acquire(conn, str(uuid.uuid4()), lease="1 second")[0]
    time.sleep(1.5)
    cl.restart("fast")
    assert refused(cl)[0]


def test_pg_resetwal_after_a_crash_means_a_grace(cl):
    cl.stop("fast")  # a valid record
    shutil.copy(cl.data / RECORD, cl.base / "record")
    cl.pg_ctl("-w", "-t", "60", "start")
    cl.wait_ready()
    hold_slot(cl)
    # The postmaster and its children die at once: no exit hook runs.
    pid = int((cl.data / "postmaster.pid").read_text().split()[0])
    kids = [int(x) for x in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                           text=True).stdout.split()]
    for p in [pid, *kids]:
        os.kill(p, signal.SIGKILL)
    deadline = time.time() + 20
    while any(os.path.exists(f"/proc/{p}") for p in [pid, *kids]) and time.time() < deadline:
        time.sleep(0.1)
    # The stale record is put back, as if its removal at the start had been lost.
    shutil.copy(cl.base / "record", cl.data / RECORD)
    shutil.chown(cl.data / RECORD, "postgres", "postgres")
    (cl.data / "postmaster.pid").unlink(missing_ok=True)
    subprocess.run([*AS_PG, f"{PG_BIN}/pg_resetwal", "-f", str(cl.data)], check=True, capture_output=True)
    cl.pg_ctl("-w", "-t", "60", "start")
    cl.wait_ready()
    assert refused(cl)[0]


def test_single_user_mode_after_a_clean_shutdown_means_a_grace(cl):
    """postgres --single writes its own shutdown checkpoint and no record:
    the record names an older one."""
    cl.stop("fast")
    subprocess.run([*AS_PG, f"{PG_BIN}/postgres", "--single", "-D", str(cl.data), cl.dbname],
                   input=f"SELECT * FROM {S}.acquire_execution_slot('{uuid.uuid4()}', lease => '10 minutes')\n",
                   text=True, capture_output=True, check=True)
    cl.pg_ctl("-w", "-t", "60", "start")
    cl.wait_ready()
    assert refused(cl)[0]


def test_no_less_privileged_role_can_mark_a_database(cl):
    hold_slot(cl)
    cl.restart("fast")
    with cl.connect() as conn:
        conn.execute("CREATE ROLE rt_admin LOGIN")
        conn.execute(f"GRANT meshhook_limits_admin TO rt_admin")
        conn.execute("CREATE ROLE rt_owner LOGIN CREATEDB")
        conn.execute("CREATE ROLE authenticated NOLOGIN")
        conn.execute(f"ALTER DATABASE {cl.dbname} OWNER TO rt_owner")
        for role in ("rt_admin", "rt_owner", "authenticated"):
            assert conn.execute(f"SELECT has_function_privilege(%s, '{S}._extension_created()', 'EXECUTE')",
                                (role,)).fetchone() == (False,), role
        # Not trusted: a database owner cannot create it.
        assert conn.execute("SELECT trusted, superuser FROM pg_available_extension_versions "
                            "WHERE name = %s AND installed", (S,)).fetchone() == (False, True)
    with cl.connect(dbname="postgres", user="rt_owner") as conn:
        conn.execute("CREATE DATABASE rt_owned")
    with cl.connect(dbname="rt_owned", user="rt_owner") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"CREATE EXTENSION {S}")
    with cl.connect(user="rt_owner") as conn:
        # The owner of the database and of the extension's schema's neighbour
        # tables cannot drop and re-create it either.
        with pytest.raises(psycopg.Error):
            conn.execute(f"DROP EXTENSION {S}")
    assert refused(cl)[0]
