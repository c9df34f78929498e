"""The connection pooler: a real PgBouncer (Debian's package, started by
scripts/pgbouncer.sh) in transaction pooling in front of the test server,
sampled by tick() through dblink on its admin console.

Load is real too: pgbench clients through PgBouncer running `pg_sleep` hold
the pool's two server connections while the others wait in the pooler, so
the numbers are steady while a test compares them with SHOW POOLS.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from conftest import PG_BIN, PgBouncer, requires, sqlstate

pytestmark = requires(shutil.which("pgbouncer") is not None, "pgbouncer")

@pytest.fixture(scope="module")
def bouncer(cluster):
    b = PgBouncer(f"pytest-{os.getpid()}", cluster.port)
    b.start()
    with cluster.connect() as c:
        c.execute("CREATE SCHEMA IF NOT EXISTS dblink")
        c.execute("CREATE EXTENSION IF NOT EXISTS dblink SCHEMA dblink")
        # As in schema public, where dblink usually goes: anyone may call it.
        c.execute("GRANT USAGE ON SCHEMA dblink TO PUBLIC")
    yield b
    b.stop()


@pytest.fixture
def pooler(cluster, bouncer, admin):
    """The PgBouncer added as pooler 'pgb', its pool back at size 2, no sizing."""
    bouncer.show("SET default_pool_size = 2")
    admin.execute("SELECT meshhook_limits.drop_pooler('pgb')")
    admin.execute("DELETE FROM meshhook_limits.events WHERE payload->>'pooler' = 'pgb'")  # earlier tests'
    admin.execute("SELECT meshhook_limits.add_pooler('pgb', %s)", (bouncer.conninfo,))
    yield "pgb"
    admin.execute("SELECT meshhook_limits.drop_pooler('pgb')")
    bouncer.show("SET default_pool_size = 2")


class Load:
    """n pgbench clients through PgBouncer, each running one pg_sleep(600):
    pool_size of them hold a server connection, the rest wait."""

    def __init__(self, cluster, bouncer, clients: int):
        self.cluster = cluster
        self.proc = subprocess.Popen(
            [f"{PG_BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(bouncer.port), "-U", "postgres",
             "-c", str(clients), "-t", "1", "-f", "-", cluster.dbname],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        self.proc.stdin.write("SELECT pg_sleep(600) /* ml_pooler_load */;\n")
        self.proc.stdin.close()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        # The sleeps PgBouncer had sent on: end them on the server.
        self.cluster.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE query LIKE '%ml_pooler_load%' AND pid <> pg_backend_pid()")


@pytest.fixture
def load(cluster, bouncer):
    started: list[Load] = []

    def start(clients: int) -> Load:
        started.append(Load(cluster, bouncer, clients))
        return started[-1]
    yield start
    for ld in started:
        ld.stop()


def until(pred, timeout: float = 60, what: str = "condition", step: float = 0.05):
    """Poll pred until it returns something truthy; fail loudly after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def tick(admin) -> None:
    admin.execute("SELECT meshhook_limits.tick()")


def pool_row(bouncer, database: str) -> dict | None:
    for r in bouncer.show("SHOW POOLS"):
        if r[0] == database:
            return {"cl_active": int(r[2]), "cl_waiting": int(r[3]), "sv_active": int(r[6]), "sv_idle": int(r[9]),
                    "sv_used": int(r[10]), "maxwait": int(r[13]) + int(r[14]) / 1e6}
    return None


def pool_stat(bouncer, database: str, column: str):
    """One column of the database's SHOW POOLS row; None while PgBouncer has no
    pool for it yet (no client has connected since it started or reloaded)."""
    row = pool_row(bouncer, database)
    return None if row is None else row[column]


def health(admin, pooler: str) -> list[dict]:
    cur = admin.execute("SELECT * FROM meshhook_limits.pooler_health() WHERE pooler = %s", (pooler,))
    cols = [d.name for d in cur.description]
    return [dict(zip(cols, r)) for r in cur.fetchall()]


def events(admin, event: str, pooler: str) -> list[dict]:
    return [r[0] for r in admin.execute(
        "SELECT payload FROM meshhook_limits.events WHERE event = %s AND payload->>'pooler' = %s ORDER BY id",
        (event, pooler)).fetchall()]


@pytest.mark.smoke
def test_sampled_numbers_match_show_pools_under_a_pgbench_load(cluster, bouncer, pooler, admin, load):
    load(8)
    # Steady once the two servers run a sleep each and six clients wait.
    until(lambda: (p := pool_row(bouncer, cluster.dbname)) and p["cl_waiting"] == 6 and p["sv_active"] == 2,
          what="6 clients waiting in PgBouncer")
    until(lambda: (pool_stat(bouncer, cluster.dbname, "maxwait") or 0) > 0.05, what="a measurable wait")
    tick(admin)
    after = pool_row(bouncer, cluster.dbname)
    [h] = [r for r in health(admin, pooler) if r["database"] == cluster.dbname]
    assert h["status"] in ("ok", "warning", "critical")
    assert (h["clients_active"], h["clients_waiting"], h["servers_active"], h["servers_idle"], h["servers_used"]) == \
        (after["cl_active"], after["cl_waiting"], after["sv_active"], after["sv_idle"], after["sv_used"]) == (2, 6, 2, 0, 0)
    assert h["pool_size"] == 2 and h["utilisation"] == 1
    assert h["pool_mode"] == "transaction" and h["user_name"] == "postgres"
    # maxwait grows: what the tick read lies between a read before and one after.
    assert 0.05 < float(h["maxwait_seconds"]) <= after["maxwait"]
    # The same numbers in metrics(), and the pooler is up.
    text = admin.execute("SELECT meshhook_limits.metrics()").fetchone()[0]
    labels = f'{{database="{cluster.dbname}",pooler="{pooler}",user="postgres"}}'
    assert f"meshhook_limits_pooler_clients_waiting{labels} 6" in text
    assert f'meshhook_limits_pooler_up{{pooler="{pooler}"}} 1' in text
    assert f'meshhook_limits_pooler_server_connections{{database="{cluster.dbname}",pooler="{pooler}",state="active",user="postgres"}} 2' in text
    assert "# TYPE meshhook_limits_pooler_transactions_total counter" in text
    # The admin console's own pseudo-pool is not reported.
    assert all(r["database"] != "pgbouncer" for r in health(admin, pooler))


def test_rates_come_from_show_totals_between_two_samples(cluster, bouncer, pooler, admin):
    tick(admin)
    via = psycopg.connect(f"host=127.0.0.1 port={bouncer.port} user=postgres dbname={cluster.dbname}",
                          autocommit=True, prepare_threshold=None)
    with via:
        for _ in range(50):
            via.execute("SELECT 1")
    # SHOW TOTALS is PgBouncer's running count: wait until it has the 50.
    before = admin.execute("SELECT xact_count FROM meshhook_limits.pooler_samples WHERE pooler = %s", (pooler,)).fetchone()[0]
    until(lambda: int(dict((r[0], r[1]) for r in bouncer.show("SHOW TOTALS"))["total_xact_count"]) >= before + 50,
          what="PgBouncer to count 50 transactions")
    tick(admin)
    rows = health(admin, pooler)
    assert rows and rows[0]["transactions_per_second"] > 0 and rows[0]["queries_per_second"] > 0


def test_the_wait_alert_fires_and_resolves_for_a_listener(cluster, bouncer, pooler, admin, load):
    admin.execute("SELECT meshhook_limits.set_alert_rule('pooler_wait', 'pooler.maxwait_seconds', 0.3, "
                  "for_duration => '0', resolve_threshold => 0.1)")
    try:
        with cluster.connect() as listener:
            listener.execute("LISTEN meshhook_limits")
            ld = load(4)
            until(lambda: (pool_stat(bouncer, cluster.dbname, "maxwait") or 0) > 0.4, what="a client waiting 0.4 s")
            tick(admin)
            fired = next(p for n in listener.notifies(timeout=30)
                         if (p := json.loads(n.payload))["event"] == "alert.firing" and p["rule"] == "pooler_wait")
            assert fired["labels"] == {"pooler": pooler, "database": cluster.dbname, "user": "postgres"}
            assert fired["value"] > 0.3 and fired["severity"] == "warning"
            ld.stop()
            until(lambda: (pool_stat(bouncer, cluster.dbname, "cl_waiting") or 0) == 0, what="no client waiting")
            tick(admin)
            resolved = next(p for n in listener.notifies(timeout=30)
                            if (p := json.loads(n.payload))["event"] == "alert.resolved" and p["rule"] == "pooler_wait")
            assert resolved["labels"]["pooler"] == pooler and resolved["value"] <= 0.1
    finally:
        admin.execute("DELETE FROM meshhook_limits.alert_rules WHERE name = 'pooler_wait'")


def test_a_stopped_pooler_is_down_with_an_event_and_the_tick_goes_on(cluster, bouncer, pooler, admin):
    tick(admin)
    ticks = admin.execute("SELECT ticks FROM meshhook_limits.worker_state").fetchone()[0]
    with cluster.connect() as listener:
        listener.execute("LISTEN meshhook_limits")
        bouncer.stop()
        try:
            tick(admin)
            down = next(p for n in listener.notifies(timeout=30)
                        if (p := json.loads(n.payload))["event"] == "pool.pooler_down")
            assert down["pooler"] == pooler and "connection" in down["error"]
            [h] = health(admin, pooler)
            assert h["status"] == "down" and h["database"] is None and "Connection refused" in h["error"]
            # The tick went on: counted, and the server's pool sampled this tick too.
            assert admin.execute("SELECT ticks FROM meshhook_limits.worker_state").fetchone()[0] == ticks + 1
            at = admin.execute("SELECT sampled_at FROM meshhook_limits.pooler_samples WHERE pooler = %s "
                               "ORDER BY sampled_at DESC LIMIT 1", (pooler,)).fetchone()[0]
            assert admin.execute("SELECT count(*) FROM meshhook_limits.pool_samples WHERE sampled_at = %s",
                                 (at,)).fetchone()[0] == 1
            text = admin.execute("SELECT meshhook_limits.metrics()").fetchone()[0]
            assert f'meshhook_limits_pooler_up{{pooler="{pooler}"}} 0' in text
            # Still down at the next tick: one event, not one per tick.
            tick(admin)
            assert len(events(admin, "pool.pooler_down", pooler)) == 1
        finally:
            bouncer.start()
        tick(admin)
        up = next(p for n in listener.notifies(timeout=30) if (p := json.loads(n.payload))["event"] == "pool.pooler_up")
        assert up["pooler"] == pooler and up["version"].startswith("PgBouncer")
    assert health(admin, pooler)[0]["status"] != "down"


def test_a_pooler_that_does_not_answer_holds_the_tick_only_until_its_timeouts(cluster, bouncer, pooler, admin):
    tick(admin)
    os.kill(bouncer.pid, signal.SIGSTOP)  # accepts connections (the kernel does), never answers
    try:
        t = time.monotonic()
        tick(admin)
        took = time.monotonic() - t
        [h] = health(admin, pooler)
        assert h["status"] == "down" and "timeout" in h["error"].lower(), h["error"]
        assert took < 30, f"the tick waited {took:.1f} s for a stopped pooler"
        # Tried again only 10 s later: the next tick does not wait on it. It
        # does not try it at all (no second sample), which, unlike its
        # duration, a busy machine cannot change.
        tick(admin)
        assert admin.execute("SELECT count(*) FROM meshhook_limits.pooler_samples WHERE pooler = %s AND NOT up",
                             (pooler,)).fetchone()[0] == 1
    finally:
        os.kill(bouncer.pid, signal.SIGCONT)


def test_sizing_dry_run_records_and_on_raises_under_load_and_lowers_when_idle(cluster, bouncer, pooler, admin, load):
    admin.execute("SELECT meshhook_limits.set_pooler_sizing('pgb', 'dry_run', 2, 5, '2 seconds')")
    ld = load(8)
    until(lambda: (pool_stat(bouncer, cluster.dbname, "cl_waiting") or 0) == 6, what="6 clients waiting")

    def ticked_until(event):
        def check():
            tick(admin)
            return events(admin, event, pooler)
        return until(check, what=event, step=0.2)
    [proposed] = ticked_until("pool.resize_proposed")
    assert (proposed["before"], proposed["after"], proposed["mode"]) == (2, 5, "dry_run")
    assert "waited" in proposed["why"]
    assert bouncer.config("default_pool_size") == "2"  # dry run: nothing applied

    admin.execute("SELECT meshhook_limits.set_pooler_sizing('pgb', 'on')")  # bounds kept
    [raised] = ticked_until("pool.resized")
    assert (raised["before"], raised["after"]) == (2, 5)  # the p95 of 6 waiting, capped at max_pool_size
    assert bouncer.config("default_pool_size") == "5"
    until(lambda: (pool_stat(bouncer, cluster.dbname, "sv_active") or 0) == 5, what="PgBouncer to use 5 servers")

    ld.stop()
    lowered = until(lambda: (tick(admin), events(admin, "pool.resized", pooler))[1][1:], what="a lowering", step=0.2)
    assert (lowered[0]["before"], lowered[0]["after"]) == (5, 2)  # min_pool_size
    assert "no client waited" in lowered[0]["why"]
    assert bouncer.config("default_pool_size") == "2"
    rec = admin.execute("SELECT * FROM meshhook_limits.pooler_recommendation()").fetchall()
    assert rec and rec[0][0] == "pgb"


def test_a_read_only_login_samples_and_sizing_it_cannot_apply_is_an_event_not_a_down_pooler(
        cluster, bouncer, admin, load):
    """PgBouncer's stats_users may SHOW but not SET: sampling works, and
    sizing that is on reports pool.resize_failed once per resize_every."""
    admin.execute("SELECT meshhook_limits.drop_pooler('ro')")
    admin.execute("DELETE FROM meshhook_limits.events WHERE payload->>'pooler' = 'ro'")
    admin.execute("SELECT meshhook_limits.add_pooler('ro', %s)",
                  (bouncer.conninfo.replace("user=postgres", "user=meshhook_stats"),))
    try:
        admin.execute("SELECT meshhook_limits.set_pooler_sizing('ro', 'on', 2, 5, '2 seconds')")
        load(8)
        until(lambda: (pool_stat(bouncer, cluster.dbname, "cl_waiting") or 0) == 6, what="6 clients waiting")

        def check():
            tick(admin)
            return events(admin, "pool.resize_failed", "ro")
        [failed] = until(check, what="pool.resize_failed", step=0.2)
        assert "admin access needed" in failed["error"] and failed["mode"] == "on"
        assert bouncer.config("default_pool_size") == "2"
        tick(admin)
        assert all(r["status"] != "down" for r in health(admin, "ro"))
        assert [r["clients_waiting"] for r in health(admin, "ro") if r["database"] == cluster.dbname] == [6]
        assert events(admin, "pool.pooler_down", "ro") == []
        assert len(events(admin, "pool.resize_failed", "ro")) == 1  # not again before resize_every
    finally:
        admin.execute("SELECT meshhook_limits.drop_pooler('ro')")


def test_sizing_never_exceeds_what_the_server_has_room_for(cluster, bouncer, pooler, admin, load):
    # A second PgBouncer whose pool may hold all but 20 of the server's usable
    # connections; the sessions no pooler opened (this test's, the other
    # tests') take some of those 20 too.
    usable = admin.execute("SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int"
                           " - coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0)").fetchone()[0]
    other = PgBouncer(f"pytest-other-{os.getpid()}", cluster.port)
    other.start()
    try:
        other.show(f"SET default_pool_size = {usable - 20}")
        with psycopg.connect(f"host=127.0.0.1 port={other.port} user=postgres dbname={cluster.dbname}",
                             autocommit=True, prepare_threshold=None) as c:
            c.execute("SELECT 1")  # its pool exists from the first client on
        admin.execute("SELECT meshhook_limits.add_pooler('other', %s)", (other.conninfo,))
        admin.execute("SELECT meshhook_limits.set_pooler_sizing('pgb', 'on', 2, 1000, '2 seconds')")
        load(40)
        until(lambda: (pool_stat(bouncer, cluster.dbname, "cl_waiting") or 0) == 38, what="38 clients waiting")

        def check():
            tick(admin)
            return events(admin, "pool.resized", pooler)
        [raised] = until(check, what="pool.resized", step=0.2)
        # 38 waiting asked for 40; the server had room for fewer.
        assert 2 < raised["after"] == raised["server_cap"] < 20, raised
        assert "capped" in raised["why"] and "sessions no pooler opened" in raised["why"]
        assert bouncer.config("default_pool_size") == str(raised["after"])
    finally:
        admin.execute("SELECT meshhook_limits.drop_pooler('other')")
        other.stop()


def test_add_pooler_refuses_bad_input_with_hints(cluster, bouncer, admin):
    for conninfo in ("host=127.0.0.1 port=6432 dbname=pgbouncer user=x password=secret",
                     "postgresql://x:secret@127.0.0.1:6432/pgbouncer",
                     "host=127.0.0.1 dbname=pgbouncer PASSWORD = 'secret'"):
        with pytest.raises(psycopg.Error) as e:
            admin.execute("SELECT meshhook_limits.add_pooler('p', %s)", (conninfo,))
        assert sqlstate(e) == "22023" and "user mapping" in e.value.diag.message_hint
    for name in ("", "has space", "x" * 64, None):
        with pytest.raises(psycopg.Error) as e:
            admin.execute("SELECT meshhook_limits.add_pooler(%s, 'host=127.0.0.1')", (name,))
        assert sqlstate(e) == "22023"
    with pytest.raises(psycopg.Error) as e:
        admin.execute("SELECT meshhook_limits.add_pooler('p', '  ')")
    assert sqlstate(e) == "22023"
    with pytest.raises(psycopg.Error) as e:
        admin.execute("SELECT meshhook_limits.set_pooler_sizing('nope', 'on')")
    assert sqlstate(e) == "42704" and "add_pooler" in e.value.diag.message_hint
    admin.execute("SELECT meshhook_limits.add_pooler('p', %s)", (bouncer.conninfo,))
    try:
        # connect_timeout added to a connection string that has none.
        assert admin.execute("SELECT conninfo FROM meshhook_limits.poolers WHERE name = 'p'").fetchone()[0] \
            == bouncer.conninfo + " connect_timeout=2"
        for args in ("'p', 'sometimes'", "'p', 'on', 0", "'p', 'on', 5, 4", "'p', 'on', 2, 5, '0'",
                     "'p', 'on', 2, 5, '2 days'", "'p', 'on', 2, 5, '1000000 years'"):
            with pytest.raises(psycopg.Error) as e:
                admin.execute(f"SELECT meshhook_limits.set_pooler_sizing({args})")
            assert sqlstate(e) == "22023", args
    finally:
        assert admin.execute("SELECT meshhook_limits.drop_pooler('p')").fetchone()[0] is True
    assert admin.execute("SELECT meshhook_limits.drop_pooler('p')").fetchone()[0] is False
    # Without dblink: a clear error, not a failing tick later.
    with cluster.connect(dbname="postgres") as c:
        c.execute("DROP DATABASE IF EXISTS ml_nodblink")
        c.execute("CREATE DATABASE ml_nodblink")
    try:
        with cluster.connect(dbname="ml_nodblink") as c:
            c.execute("CREATE EXTENSION meshhook_limits")
            with pytest.raises(psycopg.Error) as e:
                c.execute("SELECT meshhook_limits.add_pooler('p', 'host=127.0.0.1')")
            assert sqlstate(e) == "55000" and "CREATE EXTENSION dblink" in e.value.diag.message_hint
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute("DROP DATABASE ml_nodblink")


@pytest.fixture
def pooler_admin(cluster, admin):
    """A login role that is an admin of the extension but not a superuser."""
    role = f"ml_pooler_admin_{os.getpid()}"
    admin.execute(f"DROP ROLE IF EXISTS {role}")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"GRANT meshhook_limits_admin TO {role}")
    with cluster.connect(user=role) as c:
        yield c
    admin.execute(f"DROP OWNED BY {role}")
    admin.execute(f"DROP ROLE {role}")


def test_an_admin_who_is_not_superuser_cannot_aim_the_tick_or_reuse_its_connection(cluster, bouncer, pooler, admin,
                                                                                  pooler_admin):
    # Where the tick connects (with the extension owner's rights) is a superuser's choice.
    with pytest.raises(psycopg.Error) as e:
        pooler_admin.execute("SELECT meshhook_limits.add_pooler('mine', 'host=/var/run/postgresql dbname=postgres')")
    assert sqlstate(e) == "42501"
    # An admin may run the tick, but it samples no pooler in the admin's
    # session: a dblink connection opened there with the extension owner's
    # rights (named connections outlive the call) could be taken over to
    # send SET, PAUSE or SHUTDOWN.
    n = admin.execute("SELECT count(*) FROM meshhook_limits.pooler_samples").fetchone()[0]
    pooler_admin.execute("SELECT meshhook_limits.tick()")
    assert admin.execute("SELECT count(*) FROM meshhook_limits.pooler_samples").fetchone()[0] == n
    assert pooler_admin.execute("SELECT dblink.dblink_get_connections()").fetchone()[0] is None
    with pytest.raises(psycopg.Error):
        pooler_admin.execute("SELECT dblink.dblink_exec(c, 'SET default_pool_size = 100') "
                             "FROM unnest(coalesce(dblink.dblink_get_connections(), '{x}')) c")
    assert bouncer.config("default_pool_size") == "2"
    # A superuser's tick opens and closes its connection within the call,
    # also when the statement is cancelled while the pooler does not answer.
    os.kill(bouncer.pid, signal.SIGSTOP)
    try:
        admin.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled):
            admin.execute("SELECT meshhook_limits.tick()")
        admin.execute("RESET statement_timeout")
        assert admin.execute("SELECT dblink.dblink_get_connections()").fetchone()[0] is None
    finally:
        admin.execute("RESET statement_timeout")
        os.kill(bouncer.pid, signal.SIGCONT)
    # Samples and health are for monitors: a plain role is refused (42501) or sees none.
    tick(admin)
    assert pooler_admin.execute("SELECT count(*) FROM meshhook_limits.pooler_health()").fetchone()[0] >= 1
    with cluster.connect(user="authenticator") as c:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT count(*) FROM meshhook_limits.pooler_health()")
    with cluster.connect(user="authenticator") as c:
        assert c.execute("SELECT count(*) FROM meshhook_limits.poolers").fetchone()[0] == 0


def test_code_an_admin_planted_cannot_add_a_pooler_when_a_superuser_runs_it(cluster, admin, pooler_admin):
    """An index expression of an admin's table runs as its owner whenever
    anyone (a superuser's REINDEX or ANALYZE, the worker) touches the index:
    add_pooler there would aim the tick at an address of the admin's choice,
    where it would send the superuser's passfile password."""
    role = pooler_admin.execute("SELECT current_user").fetchone()[0]
    admin.execute(f"CREATE SCHEMA planted AUTHORIZATION {role}")
    pooler_admin.execute("""
      SET search_path = planted;
      CREATE TABLE planted (x int);
      CREATE FUNCTION planted_key(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$
      BEGIN
        BEGIN
          PERFORM meshhook_limits.add_pooler('planted', 'host=127.0.0.1 port=1 dbname=pgbouncer user=postgres');
        EXCEPTION WHEN insufficient_privilege THEN NULL;
        END;
        RETURN x;
      END $$;
      INSERT INTO planted VALUES (1);
      CREATE INDEX planted_idx ON planted ((planted_key(x)));""")
    try:
        admin.execute("REINDEX TABLE planted.planted")
        admin.execute("ANALYZE planted.planted")
        assert admin.execute("SELECT count(*) FROM meshhook_limits.poolers WHERE name = 'planted'").fetchone()[0] == 0
    finally:
        admin.execute("DROP SCHEMA planted CASCADE")


def test_the_worker_samples_and_keeps_no_connection_open_between_ticks():
    """The background worker samples every tick, on a connection it opens and
    closes within the tick: none is left for other code in the worker (a
    queue owner's policy the tick reads through) to use."""
    from conftest import destroy_cluster, fresh_cluster
    c = fresh_cluster("poolerworker", "meshhook_limits.database = 'mltest'", "meshhook_limits.restart_grace = 0",
                      "meshhook_limits.sample_interval = '1s'", "fsync = off")
    b = PgBouncer(f"pytest-worker-{os.getpid()}", c.port)
    try:
        b.start()
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION dblink")
            conn.execute("CREATE EXTENSION meshhook_limits")
            conn.execute("SELECT meshhook_limits.add_pooler('w', %s)", (b.conninfo,))

            def up_samples() -> int:
                return conn.execute("SELECT count(*) FROM meshhook_limits.pooler_samples WHERE up").fetchone()[0]
            until(lambda: up_samples() >= 2, what="the worker's samples")
            # Between ticks only this SHOW's own admin-console client is there.
            until(lambda: len([r for r in b.show("SHOW CLIENTS") if r[2] == "pgbouncer"]) == 1,
                  what="no admin-console connection of the worker between ticks")
            # A restart of PgBouncer between ticks costs nothing either.
            n = up_samples()
            b.stop()
            b.start()
            until(lambda: up_samples() >= n + 2, what="2 more samples", step=0.2)
    finally:
        b.stop()
        destroy_cluster(c)


def good_answers() -> dict:
    """What PgBouncer 1.18 answers, one pool: the hostile tests' starting point."""
    return {"VERSION": {"rows": [["PgBouncer 1.18.0"]]},
            "POOLS": {"ncols": 16, "rows": [["appdb", "app", "3", "1", "0", "0", "2", "0", "0", "1", "0", "0", "0",
                                             "0", "5000", "transaction"]]},
            "DATABASES": {"ncols": 13, "rows": [["appdb", "h", "5432", "appdb", "", "4", "0", "0", "transaction",
                                                 "0", "0", "0", "0"]]},
            "TOTALS": {"rows": [["total_xact_count", "10"], ["total_query_count", "10"], ["total_wait_time", "0"],
                                ["avg_wait_time", "0"]]},
            "CONFIG": {"ncols": 4, "rows": [["default_pool_size", "4", "20", "yes"]]}}


@pytest.fixture
def hostile(tmp_path, admin):
    """A stand-in for PgBouncer that answers what the test writes (tests/hostile_pgbouncer.py)."""
    import socket
    import sys
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(good_answers()))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "hostile_pgbouncer.py"), str(port), str(answers)])
    until(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, what="the hostile pooler to listen")
    admin.execute("SELECT meshhook_limits.drop_pooler('evil')")
    admin.execute("SELECT meshhook_limits.add_pooler('evil', %s)", (f"host=127.0.0.1 port={port} dbname=pgbouncer user=x",))
    yield answers
    admin.execute("SELECT meshhook_limits.drop_pooler('evil')")
    proc.kill()
    proc.wait()


def test_a_hostile_pooler_cannot_break_the_tick_the_readers_or_another_pooler(cluster, pooler, admin, hostile):
    admin.execute("SELECT meshhook_limits.set_pooler_sizing('pgb', 'dry_run', 2, 10)")

    def sample(answers: dict) -> tuple:
        hostile.write_text(json.dumps(answers))
        tick(admin)   # never raises
        row = admin.execute("SELECT up, error FROM meshhook_limits.pooler_samples WHERE pooler = 'evil' "
                            "ORDER BY sampled_at DESC LIMIT 1").fetchone()
        # The readers still answer, and the real pooler was sampled in the same tick.
        assert admin.execute("SELECT meshhook_limits.metrics()").fetchone()[0]
        health = admin.execute("SELECT pooler, status FROM meshhook_limits.pooler_health()").fetchall()
        admin.execute("SELECT * FROM meshhook_limits.pooler_recommendation()").fetchall()
        assert ("pgb", "ok") in health
        return row

    assert sample(good_answers()) == (True, None)
    assert admin.execute("SELECT clients_waiting, pool_size FROM meshhook_limits.pooler_pool_samples "
                         "WHERE pooler = 'evil' ORDER BY sampled_at DESC LIMIT 1").fetchone() == (1, 4)
    # A database name that is not UTF-8 (any client of a wildcard [databases]
    # entry can make PgBouncer list one) is kept as a stand-in.
    bad_name = good_answers()
    bad_name["POOLS"]["rows"][0][0] = "hex:61ff fe".replace(" ", "")
    assert sample(bad_name) == (True, None)
    name = admin.execute("SELECT database FROM meshhook_limits.pooler_pool_samples WHERE pooler = 'evil' "
                         "ORDER BY sampled_at DESC LIMIT 1").fetchone()[0]
    assert name.startswith("(not valid UTF8: ")
    # Numbers that are not counts: the pooler is down, with why.
    for where, row, col, junk in (("POOLS", 0, 13, "1e400"), ("POOLS", 0, 3, "-5"), ("DATABASES", 0, 5, "2000000000"),
                                  ("TOTALS", 0, 1, "-9223372036854775808"), ("CONFIG", 0, 1, "lots")):
        answers = good_answers()
        answers[where]["rows"][row][col] = junk
        up, error = sample(answers)
        assert not up and "where a number from 0 to" in error, (where, junk, error)
    # Not PgBouncer, or a layout it does not have.
    for version in ("PostgreSQL 16.1", "PgBouncer 99.0"):
        answers = good_answers()
        answers["VERSION"]["rows"] = [[version]]
        up, error = sample(answers)
        assert not up and error, (version, error)
    # An answer that never ends holds the tick only for pooler_timeout.
    answers = good_answers()
    answers["POOLS"]["no_end"] = True
    t = time.monotonic()
    up, error = sample(answers)
    assert not up and "no answer to SHOW POOLS within" in error
    assert time.monotonic() - t < 30
    assert admin.execute("SELECT last_error IS NULL OR last_error NOT LIKE '%%XX000%%' FROM meshhook_limits.worker_state"
                         ).fetchone()[0]


def test_a_foreign_server_named_like_a_poolers_conninfo_is_not_followed(cluster, bouncer, pooler, admin, pooler_admin):
    """dblink takes a conninfo that names a foreign server (its first 63
    bytes) as that server, with the connecting role's user mapping or a
    PUBLIC one. A role allowed to create foreign servers could name one
    after a pooler's conninfo (monitors can read it) and send the tick
    where it likes, with the server's ~/.pgpass password."""
    role = pooler_admin.execute("SELECT current_user").fetchone()[0]
    conninfo = admin.execute("SELECT conninfo FROM meshhook_limits.poolers WHERE name = 'pgb'").fetchone()[0]
    admin.execute(f"GRANT USAGE ON FOREIGN DATA WRAPPER dblink_fdw TO {role}")
    try:
        pooler_admin.execute(f"""CREATE SERVER "{conninfo[:63]}" FOREIGN DATA WRAPPER dblink_fdw
                                 OPTIONS (host '127.0.0.1', port '1', dbname 'pgbouncer')""")
        pooler_admin.execute(f'CREATE USER MAPPING FOR PUBLIC SERVER "{conninfo[:63]}" OPTIONS (user \'postgres\')')
        tick(admin)
        [h] = health(admin, "pgb")
        assert h["status"] == "down" and "not a superuser's dblink_fdw server" in h["error"], h["error"]
    finally:
        admin.execute(f'DROP SERVER IF EXISTS "{conninfo[:63]}" CASCADE')
        admin.execute(f"REVOKE USAGE ON FOREIGN DATA WRAPPER dblink_fdw FROM {role}")
