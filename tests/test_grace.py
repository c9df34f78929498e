"""The restart grace (issue 22): slots are refused after a start only when a
holder from before it can exist, and a refusal then says why and how long.

One cluster with a 60 s grace, restarted in the ways an operator or a crash
restarts a server; the tests run in order and each leaves it running."""
import os
import shutil
import signal
import time
import uuid

import psycopg
import pytest

from conftest import acquire, destroy_cluster, fresh_cluster

S = "meshhook_limits"
RECORD = "meshhook_limits.clean_shutdown"


@pytest.fixture(scope="module")
def gc():
    c = fresh_cluster("grace", "meshhook_limits.restart_grace = '60s'", "fsync = off",
                      "meshhook_limits.database = 'postgres'")
    with c.connect() as conn:
        conn.execute(f"CREATE EXTENSION {S}")
    yield c
    destroy_cluster(c)


def release_all(c):
    with c.connect() as conn:
        conn.execute(f"SELECT {S}.release_execution_slot(slot_id) FROM {S}.slots()")
        assert conn.execute(f"SELECT count(*) FROM {S}.slots()").fetchone() == (0,)


def refused_for_grace(c, dbname=None):
    """(refused with 'recovering', retry_after seconds, notices) of one acquire."""
    notices = []
    with c.connect(dbname=dbname) as conn:
        # Copied in the handler: psycopg reuses the diagnostic afterwards.
        conn.add_notice_handler(lambda d: notices.append((d.severity, d.message_primary, d.message_hint)))
        r = acquire(conn, str(uuid.uuid4()))
    return r[2] == "recovering", (r[7].total_seconds() if r[7] else None), notices, r


def test_no_grace_on_the_first_start_after_initdb(gc):
    # initdb, start, CREATE EXTENSION: nothing can be held from before.
    refused, _, notices, r = refused_for_grace(gc)
    assert not refused and r[0], r
    assert notices == []


def test_no_grace_after_a_clean_shutdown_with_no_slot_held(gc):
    release_all(gc)
    gc.stop("fast")
    assert (gc.data / RECORD).exists()
    gc.pg_ctl("-w", "-t", "60", "start")
    gc.wait_ready()
    assert not (gc.data / RECORD).exists()  # trusted once, for this start only
    refused, _, _, r = refused_for_grace(gc)
    assert not refused and r[0], r
    assert "no restart grace" in (gc.base / "server.log").read_text()


def test_a_slot_held_at_shutdown_means_a_grace_that_says_why_and_how_long(gc):
    with gc.connect() as conn:
        held = acquire(conn, str(uuid.uuid4()), lease="10 minutes")
        assert held[0]
    gc.restart("fast")
    assert not (gc.data / RECORD).exists()
    refused, retry, notices, r = refused_for_grace(gc)
    assert refused and not r[0], r
    # retry_after is the time the grace has left, not the 5 s cap.
    assert 30 < retry <= 60, retry
    [(severity, message, hint)] = notices
    assert severity == "NOTICE"
    assert "refused for" in message and "restarted" in message
    assert "meshhook_limits.restart_grace" in hint
    with gc.connect() as conn:
        # The holder from before learns its slot is gone.
        hb = conn.execute(f"SELECT * FROM {S}.heartbeat_execution_slot(%s)", (held[1],)).fetchone()
        assert hb[0] is False and hb[1] == "not_found"
        # A database that gets the extension now has no holders from before.
        conn.execute("CREATE DATABASE newer")
    with gc.connect(dbname="newer") as conn:
        conn.execute(f"CREATE EXTENSION {S}")
    refused, _, notices, r = refused_for_grace(gc, dbname="newer")
    assert not refused and r[0], r
    # The old database is still in its grace.
    assert refused_for_grace(gc)[0]


def test_an_immediate_stop_means_a_grace_even_with_no_slot_held(gc):
    gc.restart("immediate")
    assert refused_for_grace(gc)[0]
    assert refused_for_grace(gc, dbname="newer")[0]  # its mark was in the lost memory


def test_a_record_from_an_older_shutdown_is_not_trusted(gc):
    # A clean shutdown leaves a record; the server then runs, holds a slot
    # and crashes. Put the record back as if its removal had been lost: it
    # names an older checkpoint than pg_control's, so it is not trusted.
    gc.stop("fast")
    shutil.copy(gc.data / RECORD, "/tmp/grace-record")
    gc.pg_ctl("-w", "-t", "60", "start")
    gc.wait_ready()
    with gc.connect() as conn:
        conn.execute("CHECKPOINT")
    gc.stop("immediate")
    assert not (gc.data / RECORD).exists()
    shutil.copy("/tmp/grace-record", gc.data / RECORD)
    shutil.chown(gc.data / RECORD, "postgres", "postgres")  # readable by the server
    os.remove("/tmp/grace-record")
    gc.pg_ctl("-w", "-t", "60", "start")
    gc.wait_ready()
    assert refused_for_grace(gc)[0]


def test_a_backend_crash_means_a_grace(gc):
    release_all(gc)
    gc.restart("fast")
    assert not refused_for_grace(gc)[0]
    with gc.connect() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    # The postmaster resets shared memory without exiting.
    deadline = time.time() + 60
    while True:
        try:
            assert refused_for_grace(gc)[0]
            break
        except psycopg.OperationalError:
            assert time.time() < deadline, "the server did not come back after the crash"
            time.sleep(0.2)


def test_only_create_extension_may_mark_a_database(gc):
    with gc.connect() as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="CREATE EXTENSION"):
            conn.execute(f"SELECT {S}._extension_created()")
        conn.execute("CREATE ROLE grace_admin LOGIN")
        conn.execute(f"GRANT meshhook_limits_admin TO grace_admin")
    with gc.connect(user="grace_admin") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"SELECT {S}._extension_created()")
    assert refused_for_grace(gc)[0]
