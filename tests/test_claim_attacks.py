"""Red-team attacks on claiming (sql/claim*.sql, src/claim/,
src/slots/claimed.rs, src/slots/ended.rs, src/slots/wait.rs), performed as the
attacker would: a tenant over Supabase RPC (`authenticated` with JWT claims),
a plain login role, the owner of the pg-boss or pgmq schema, a queue worker
that is not an admin, and a tenant that shapes its jobs' JSON.

Each test performs an attack and asserts that it is refused. Eight of them
worked against the first version of claiming and were fixed with these
tests: fake claim run ids stopping the tick, the queue owner's code acting
as an admin (identity inside security-restricted operations), claiming as a
superuser on a non-superuser's table, one tenant spelling its id several
ways, oversized tenant values, and keys no job can have.

Everything runs in a database of this module (pg-boss 11 and pgmq
installed) or in scratch databases for attacks that plant objects in the
queue schemas. Routes to superuser are checked the direct way: the planted
payload runs `ALTER ROLE <attacker> SUPERUSER`, and afterwards the attacker
must still not be one; routes to meshhook_limits' admin rights are checked
by a payload that calls `set_limit`, which must stay refused.
"""
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager

import psycopg
import pytest

from conftest import PG_BIN, PG_MAJOR, ROOT, acquire, requires, rpc, set_limit

S = "meshhook_limits"
DRIVER = ROOT / "tests" / "node" / "pgboss_driver.mjs"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"
NODE = shutil.which("node")

pytestmark = requires(NODE is not None and (ROOT / "tests/node/node_modules/pg-boss/package.json").exists()
                      and PGMQ_SQL.exists(), "pg-boss (npm) and pgmq's SQL (scripts/install-queue-systems.sh)")

CLAIM_COLS = ["job_id", "tenant_id", "project_id", "concurrency_key", "slot_id", "lease_expires_at", "data"]
WAIT_SQL = f"SELECT granted FROM {S}.acquire_execution_slot(%s, wait => %s::interval)"


# --------------------------------------------------------------------------- helpers

def boss(cluster, db: str, command: str, user: str = "postgres", **args):
    """One pg-boss API call through tests/node/pgboss_driver.mjs, as `user`."""
    p = subprocess.run([NODE, str(DRIVER), cluster.dsn(db, user=user), command, json.dumps(args)],
                       capture_output=True, text=True, timeout=60)
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"driver {command} failed: rc={p.returncode} stdout={p.stdout!r} stderr={p.stderr!r}")
    assert p.returncode == 0, out
    return out


def uniq(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def claims_of(tenant) -> dict:
    return {"role": "authenticated", "sub": str(uuid.uuid4()), "app_metadata": {"tenant_id": str(tenant)}}


def boss_queue(conn, prefix="atk", policy="standard") -> str:
    """A pg-boss queue, made by pg-boss's own SQL function (what createQueue runs)."""
    q = uniq(prefix)
    conn.execute("SELECT pgboss.create_queue(%s, %s::jsonb)", (q, json.dumps({"policy": policy})))
    return q


def insert_jobs(conn, queue: str, datas: list) -> list[str]:
    """Jobs as boss.insert() writes them: one statement, so they share
    created_on; returns their ids in the queue's order (by id)."""
    ids = sorted(str(uuid.uuid4()) for _ in datas)
    conn.execute("INSERT INTO pgboss.job (id, name, data) "
                 "SELECT i::uuid, %s, d FROM unnest(%s::text[], %s::jsonb[]) AS x(i, d)",
                 (queue, ids, [json.dumps(d) for d in datas]))
    return ids


def bind(conn, source: str, queue: str, **paths) -> int:
    args = ", ".join(f"{k} => %({k})s" for k in paths)
    conn.execute(f"SELECT {S}.bind_queue(%(s)s, %(q)s{', ' + args if args else ''})",
                 {"s": source, "q": queue, **paths})
    return conn.execute(f"SELECT id FROM {S}.queue_bindings WHERE source = %s AND queue = %s",
                        (source, queue)).fetchone()[0]


def claim(conn, source: str, queue: str, batch: int = 1, lease: str | None = None) -> list[dict]:
    rows = conn.execute(f"SELECT * FROM {S}.claim_jobs(%s, %s, %s, %s::interval)",
                        (source, queue, batch, lease)).fetchall()
    return [dict(zip(CLAIM_COLS, r)) for r in rows]


def tick(conn) -> list[str]:
    """One tick as superuser; returns the warnings it raised."""
    warnings = []
    handler = lambda d: warnings.append(d.message_primary)  # noqa: E731
    conn.add_notice_handler(handler)
    try:
        conn.execute(f"SELECT {S}.tick()")
    finally:
        conn.remove_notice_handler(handler)
    return warnings


def live_slots(conn, tenant) -> set[str]:
    return {r[0] for r in conn.execute(f"SELECT slot_id::text FROM {S}.slots() WHERE state = 'live' AND tenant_id = %s",
                                       (tenant,)).fetchall()}


def blocked(conn, reason: str) -> float:
    text = conn.execute(f"SELECT {S}.metrics()").fetchone()[0]
    key = f'meshhook_limits_claim_blocked_total{{reason="{reason}"}}'
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(key + " "))


def refusal(conn, query, params=None):
    """(sqlstate, message) of a refused statement (in its own transaction), or None."""
    try:
        with conn.transaction():
            conn.execute(query, params)
    except psycopg.Error as e:
        return e.sqlstate, str(e)
    return None


def rpc_refusal(conn, claims, query, params=None, role="authenticated"):
    try:
        rpc(conn, claims, query, params, role=role)
    except psycopg.Error as e:
        return e.sqlstate, str(e)
    return None


def is_superuser(conn, role) -> bool:
    return conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def spellings(tenant: str) -> list[str]:
    """Ways to write one uuid that PostgreSQL's uuid input (and claim_jobs)
    take as that uuid: hyphens or not, any letter case."""
    bare = tenant.replace("-", "")
    out = [tenant, tenant.upper(), bare, bare.upper()]
    letters = [i for i, ch in enumerate(tenant) if ch in "abcdef"]
    for i in letters[:8]:
        out.append(tenant[:i] + tenant[i].upper() + tenant[i + 1:])
    return out


def lettered_uuid() -> str:
    """A random uuid with at least 8 hex letters (for `spellings`)."""
    while True:
        u = str(uuid.uuid4())
        if sum(ch in "abcdef" for ch in u) >= 8:
            return u


def escalation(role: str) -> str:
    return f"BEGIN EXECUTE 'ALTER ROLE {role} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;"


def admin_payload(value: int, tenant: str | None = None) -> str:
    """plpgsql statements that act as a meshhook_limits admin: set a limit."""
    who = f", tenant_id => '{tenant}'" if tenant else ""
    return (f"BEGIN PERFORM meshhook_limits.set_limit('concurrent_executions', {value}{who}); "
            "EXCEPTION WHEN OTHERS THEN NULL; END;")


def global_slot_limit(conn):
    r = conn.execute(f"SELECT limit_value FROM {S}.limits WHERE resource = 'concurrent_executions' "
                     "AND tenant_id IS NULL AND plan IS NULL").fetchone()
    return None if r is None else int(r[0])


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def adb(cluster):
    """The module's database: meshhook_limits, pgmq and pg-boss 11 (installed by the superuser)."""
    name = f"mlattack_{os.getpid()}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {name}")
    with cluster.connect(dbname=name) as c:
        c.execute(f"CREATE EXTENSION {S}")
    subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cluster.host, "-p",
                    str(cluster.port), "-U", "postgres", "-d", name, "-f", str(PGMQ_SQL)],
                   check=True, capture_output=True, text=True, timeout=60)
    assert boss(cluster, name, "start")["installed"] is True
    yield name
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def db(cluster, adb):
    """A superuser connection to the module's database; afterwards every slot
    is released and every queue unbound."""
    with cluster.connect(dbname=adb) as c:
        yield c
    with cluster.connect(dbname=adb) as c:
        c.execute(f"SELECT {S}.release_execution_slot(slot_id) FROM {S}.slots() WHERE state = 'live'")
        c.execute(f"SELECT {S}.unbind_queue(source, queue) FROM {S}.queue_bindings")


@pytest.fixture
def attacker(cluster):
    """A fresh login role: no superuser, no grants. Dropped afterwards (with
    whatever it owns in the module's database)."""
    name = "mallory_" + uuid.uuid4().hex[:8]
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER")
    yield name
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"ALTER ROLE {name} NOSUPERUSER")
        dbs = [r[0] for r in c.execute("SELECT datname FROM pg_database WHERE datallowconn AND datname <> 'template1'")]
    for d in dbs:
        try:
            with cluster.connect(dbname=d) as c:
                c.execute(f"DROP OWNED BY {name} CASCADE")
        except psycopg.Error:
            pass
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP ROLE IF EXISTS {name}")


@contextmanager
def owned_queue_db(cluster, owner: str, pgboss: bool = True):
    """A scratch database where `owner` (not a superuser) installed pg-boss
    with pg-boss's own migration, as an application role does; the extension
    is the superuser's. Dropped afterwards."""
    name = "mlatk_" + uuid.uuid4().hex[:8]
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {name}")
        c.execute(f"GRANT CREATE ON DATABASE {name} TO {owner}")
    try:
        with cluster.connect(dbname=name) as c:
            c.execute(f"CREATE EXTENSION {S}")
        if pgboss:
            assert boss(cluster, name, "start", user=owner)["installed"] is True
        yield name
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def table_turned_view(conn, name, columns, select):
    """What the owner of a queue table can make of it: a view over its own
    code (up to PostgreSQL 15 an ON SELECT rule turns the table itself into
    one; 16 refuses such rules, so there the owner creates a view)."""
    if PG_MAJOR <= 15:
        conn.execute(f"CREATE TABLE {name} ({columns})")
        conn.execute(f'CREATE RULE "_RETURN" AS ON SELECT TO {name} DO INSTEAD {select}')
    else:
        conn.execute(f"CREATE VIEW {name} AS {select}")


# =========================================================================== 1. a tenant over RPC

def test_a_tenant_over_rpc_reaches_no_claim_internals(cluster, adb, db, tenant):
    """The definer functions claim_jobs calls (PUBLIC may EXECUTE them) and
    the revoked internals refuse a tenant with 42501; none of the refusals
    names the other tenant; the bindings table shows a tenant nothing."""
    other = str(uuid.uuid4())
    q = boss_queue(db)
    insert_jobs(db, q, [{"tenant_id": other}] * 2)
    bid = bind(db, "pgboss", q)
    [c] = claim(db, "pgboss", q)
    victim_slot = str(c["slot_id"])
    calls = [
        # (call, params, sqlstate)
        (f"SELECT {S}.bind_queue('pgboss', %s)", (q,), "42501"),
        (f"SELECT {S}.unbind_queue('pgboss', %s)", (q,), "42501"),
        (f"SELECT * FROM {S}.claim_jobs('pgboss', %s, 10)", (q,), "42501"),
        (f"SELECT * FROM {S}._queue_binding('pgboss', %s)", (q,), "42501"),
        (f"SELECT * FROM {S}._claim_queries(%s)", (bid,), "42501"),
        # A claim slot for itself (it could then pick its own claim digest) or another.
        (f"SELECT * FROM {S}._claim_slot(%s, NULL, NULL, 1, NULL, %s)", (tenant, f"claim/{bid}/x"), "42501"),
        (f"SELECT * FROM {S}._claim_slot(%s, NULL, NULL, 1, NULL, NULL)", (other,), "42501"),
        # Another tenant's running cost and weight.
        (f"SELECT * FROM {S}._claim_shares(ARRAY[%s]::uuid[])", (other,), "42501"),
        (f"SELECT * FROM {S}._claimed_slots()", None, "42501"),
        (f"SELECT {S}._renew_slots(ARRAY[%s]::uuid[])", (victim_slot,), "42501"),
        (f"SELECT * FROM {S}._slot_counts(%s, NULL, NULL)", (other,), "42501"),
        (f"SELECT {S}._end_claims()", None, "42501"),
        # The rebuild after a restart, and what it reads.
        (f"SELECT {S}._restore_claims()", None, "42501"),
        (f"SELECT * FROM {S}._claims_to_restore()", None, "42501"),
        (f"SELECT {S}._pgboss_major()", None, "42501"),
        (f"SELECT {S}._serve_database()", None, "42501"),
        (f"SELECT {S}._queue_relation('pgboss', %s)", (q,), "42501"),
        (f"SELECT {S}._read_as_owner('pgboss.job'::regclass, 'SELECT to_jsonb(count(*)) FROM pgboss.job')", None,
         "42501"),
        # The claimed job's slot of another tenant.
        (f"SELECT {S}.release_execution_slot(%s)", (victim_slot,), "42501"),
        (f"SELECT * FROM {S}.heartbeat_execution_slot(%s)", (victim_slot,), "42501"),
        (f"SELECT * FROM {S}.explain_queues(%s)", (other,), "42501"),
        (f"SELECT * FROM {S}.explain_admission(%s)", (other,), "42501"),
        (f"SELECT * FROM {S}.explain_admission(%s, NULL, 'openai')", (other,), "42501"),
    ]
    with cluster.connect(dbname=adb, user="authenticator") as conn:
        for call, params, state in calls:
            got = rpc_refusal(conn, claims_of(tenant), call, params)
            assert got is not None, f"a tenant ran {call}"
            assert got[0] == state, (call, got)
            assert other not in got[1] and victim_slot not in got[1], (call, got)
        assert rpc(conn, claims_of(tenant), f"SELECT * FROM {S}.queue_bindings") == []
        # anon: nothing either.
        got = rpc_refusal(conn, None, f"SELECT * FROM {S}.explain_queues()", role="anon")
        assert got and got[0] == "42501"
    assert live_slots(db, other) == {victim_slot}


def test_a_tenants_fake_claim_run_id_does_not_stop_the_tick_keeping_other_claims(cluster, adb, db, tenant):
    victim, attacker_tenant = tenant, str(uuid.uuid4())
    q = boss_queue(db)
    insert_jobs(db, q, [{"tenant_id": victim}] * 2)
    bid = bind(db, "pgboss", q)
    set_limit(db, "concurrent_executions", 1, victim)
    [c] = claim(db, "pgboss", q, lease="2 seconds")
    slot = str(c["slot_id"])

    def tick_for(seconds):
        warnings, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            warnings += tick(db)
            time.sleep(0.4)
        return warnings

    # Control: while the job runs, the ticks keep its slot past its 2 s
    # lease, and the victim's limit of 1 holds its second job back.
    assert tick_for(2.6) == []
    assert live_slots(db, victim) == {slot}
    assert claim(db, "pgboss", q) == []

    # The attack: one slot of the attacker's own, over RPC, with a run id
    # that looks like a claim of the bound queue (binding ids are 1, 2, 3...).
    with cluster.connect(dbname=adb, user="authenticator") as conn:
        [(granted,)] = rpc(conn, claims_of(attacker_tenant),
                           f"SELECT granted FROM {S}.acquire_execution_slot(%s, NULL, %s, '1 hour')",
                           (attacker_tenant, f"claim/{bid}/not-a-job"))
    assert granted
    warnings = tick_for(2.6)
    still_held = live_slots(db, victim) == {slot}
    # Never two running jobs under a limit of 1.
    extra = claim(db, "pgboss", q)
    assert still_held and extra == [], (f"the victim's running job lost its slot (held: {still_held}) and "
                                        f"{len(extra)} more of its jobs were claimed past its limit of 1; "
                                        f"tick warnings: {warnings[:1]}")


def test_explain_admission_refuses_keys_no_job_can_have(cluster, adb, tenant):
    with cluster.connect(dbname=adb, user="authenticator") as conn:
        for key in ("", "k" * 201, "k" * 100_000):
            got = rpc_refusal(conn, claims_of(tenant), f"SELECT * FROM {S}.explain_admission(%s, NULL, %s)",
                              (tenant, key))
            assert got is not None and got[0] == "22023", (len(key), got)


def test_explain_queues_shows_a_tenant_only_itself(cluster, adb, db, tenant):
    """A tenant's explain_queues: its own waiting and running jobs only, never
    another tenant's rows (nor their jobs spelt in capitals, which claim_jobs
    takes for the same uuid)."""
    other = str(uuid.uuid4())
    q = boss_queue(db)
    insert_jobs(db, q, [{"tenant_id": tenant}] * 2 + [{"tenant_id": other}] * 3 + [{"tenant_id": other.upper()}] * 4)
    bind(db, "pgboss", q)
    assert len(claim(db, "pgboss", q, batch=4)) == 4
    mine = len(live_slots(db, tenant))
    with cluster.connect(dbname=adb, user="authenticator") as conn:
        rows = rpc(conn, claims_of(tenant),
                   f"SELECT queue, tenant_id::text, waiting, running FROM {S}.explain_queues()")
    assert {r[1] for r in rows} <= {tenant}
    assert [(r[2] + r[3]) for r in rows if r[0] == q] == [2]
    assert [r[3] for r in rows if r[0] == q] == [mine]


# =========================================================================== 2. a plain login role

def test_a_plain_role_is_refused_every_claim_entry_point(cluster, adb, db, attacker, tenant):
    q = boss_queue(db)
    insert_jobs(db, q, [{"tenant_id": tenant}])
    bid = bind(db, "pgboss", q)
    calls = [
        (f"SELECT {S}.bind_queue('pgboss', %s)", (q,)),
        (f"SELECT {S}.unbind_queue('pgboss', %s)", (q,)),
        (f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,)),
        (f"SELECT * FROM {S}._queue_binding('pgboss', %s)", (q,)),
        (f"SELECT * FROM {S}._claim_queries(%s)", (bid,)),
        (f"SELECT * FROM {S}._claim_slot(%s, NULL, NULL, 1, NULL, NULL)", (tenant,)),
        (f"SELECT * FROM {S}._claim_shares(ARRAY[%s]::uuid[])", (tenant,)),
        (f"SELECT * FROM {S}._claimed_slots()", None),
        (f"SELECT {S}._renew_slots(ARRAY[]::uuid[])", None),
        (f"SELECT * FROM {S}._slot_counts(%s, NULL, NULL)", (tenant,)),
        (f"SELECT {S}._end_claims()", None),
        (f"SELECT {S}._json_path('a', 'x')", None),
        (f"SELECT {S}._path_sql('pgboss', ARRAY['a'])", None),
        (f"SELECT * FROM {S}.explain_queues()", None),
        (f"SELECT * FROM {S}.explain_admission(%s)", (tenant,)),
    ]
    with cluster.connect(dbname=adb, user=attacker) as m:
        for call, params in calls:
            got = refusal(m, call, params)
            assert got is not None and got[0] == "42501", (call, got)
        assert m.execute(f"SELECT count(*) FROM {S}.queue_bindings").fetchone()[0] == 0
        # The slot-ending trigger function on a table of its own (a temporary
        # one: the role has no schema), to fire it with rows it makes up.
        m.execute("CREATE TEMP TABLE fake_jobs (id uuid, name text, state text)")
        got = refusal(m, "CREATE TRIGGER t AFTER DELETE ON fake_jobs FOR EACH ROW "
                         f"EXECUTE FUNCTION {S}._claim_ended(%s, 'pgboss')" % f"'{bid}'")
        assert got is not None and got[0] == "42501", got
        # Parking a waiter in the shared table for someone else's tenant:
        # refused at once, not after the wait (its 60 s; half of that as
        # margin for a busy machine).
        t0 = time.monotonic()
        got = refusal(m, f"SELECT * FROM {S}.acquire_execution_slot(%s, wait => '60 seconds')", (tenant,))
        assert got is not None and got[0] == "42501" and time.monotonic() - t0 < 30, got
    assert live_slots(db, tenant) == set()


# =========================================================================== 3. the owner of the queue schema

def test_queue_owner_code_read_by_bind_explain_and_tick_is_not_an_admin(cluster, attacker):
    victim = str(uuid.uuid4())
    acted_as_admin = []
    with owned_queue_db(cluster, attacker) as qdb:
        with cluster.connect(dbname=qdb, user=attacker) as m:
            q = boss_queue(m)
            insert_jobs(m, q, [{"tenant_id": victim}] * 2)
            # Planted where bind_queue reads the queue (pgboss.queue, as its owner).
            m.execute("CREATE FUNCTION pgboss.queue_ok() RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN "
                      + admin_payload(101) + escalation(attacker) + " RETURN true; END $$")
            m.execute("CREATE INDEX queue_ok_idx ON pgboss.queue (name) WHERE pgboss.queue_ok()")

        def check(step):
            with cluster.connect(dbname=qdb) as c:
                v = global_slot_limit(c)
                if v is not None:
                    acted_as_admin.append((step, v))
                    c.execute(f"SELECT {S}.clear_limit('concurrent_executions')")

        # The queue's owner is the application's role, which the worker (an
        # admin of meshhook_limits) is granted: the worker binds and claims.
        worker = f"claimer_{uuid.uuid4().hex[:8]}"
        with cluster.connect(dbname=qdb) as a:
            a.execute(f"CREATE ROLE {worker} LOGIN IN ROLE meshhook_limits_admin, {attacker}")
        with cluster.connect(dbname=qdb, user=worker) as w:  # in a new session
            bind(w, "pgboss", q)
        check("bind_queue")
        # Neither a superuser nor the worker claims from a queue whose owner
        # lacks their privileges (they would run its code when completing
        # jobs): tests/test_queue_owners.py.
        with cluster.connect(dbname=qdb) as a:
            assert refusal(a, f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,))[0] == "42501"
        with cluster.connect(dbname=qdb, user=worker) as w:
            assert refusal(w, f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,))[0] == "42501"
        with cluster.connect(dbname=qdb, user=attacker) as m:
            # Planted where explain_queues and the tick's _end_claims read the jobs.
            m.execute("CREATE FUNCTION pgboss.job_ok() RETURNS boolean LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN "
                      + admin_payload(202) + escalation(attacker) + " RETURN true; END $$")
            m.execute("CREATE INDEX job_ok_idx ON pgboss.job (name) WHERE pgboss.job_ok()")
        check("planting (as the owner itself)")
        with cluster.connect(dbname=qdb) as a:
            a.execute(f"SELECT * FROM {S}.explain_queues()").fetchall()
        check("explain_queues")
        with cluster.connect(dbname=qdb) as a:
            tick(a)
        check("tick")
        with cluster.connect(dbname=qdb) as c:
            assert not is_superuser(c, attacker)
    assert acted_as_admin == [], f"the queue owner's code acted as an admin in: {acted_as_admin}"


def test_analyze_of_a_roles_table_does_not_make_its_code_an_admin(cluster, adb, db, attacker, tenant):
    db.execute(f"CREATE SCHEMA {attacker} AUTHORIZATION {attacker}")
    with cluster.connect(dbname=adb, user=attacker) as m:
        m.execute(f"CREATE FUNCTION {attacker}.f(int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ BEGIN "
                  + admin_payload(0, tenant) + " RETURN $1; END $$")
        m.execute(f"CREATE TABLE {attacker}.t AS SELECT g AS x FROM generate_series(1, 50) g")
        m.execute(f"CREATE INDEX ON {attacker}.t ({attacker}.f(x))")
    assert db.execute(f"SELECT count(*) FROM {S}.limits WHERE tenant_id = %s", (tenant,)).fetchone()[0] == 0
    with cluster.connect(dbname=adb) as dba:          # a DBA's routine ANALYZE (autovacuum does the same)
        dba.execute(f"ANALYZE {attacker}.t")
    got = db.execute(f"SELECT resource, limit_value FROM {S}.limits WHERE tenant_id = %s", (tenant,)).fetchall()
    assert got == [], f"the table owner's index function set {got} for another tenant"


def test_claiming_as_a_superuser_does_not_run_the_queue_owners_code_as_superuser(cluster, attacker):
    tenant = str(uuid.uuid4())
    with owned_queue_db(cluster, attacker) as qdb:
        with cluster.connect(dbname=qdb, user=attacker) as m:
            q = boss_queue(m)
            insert_jobs(m, q, [{"tenant_id": tenant}])
            m.execute("CREATE FUNCTION pgboss.on_job() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                      + escalation(attacker) + " RETURN NEW; END $$")
            m.execute("CREATE TRIGGER on_job BEFORE UPDATE ON pgboss.job FOR EACH ROW EXECUTE FUNCTION pgboss.on_job()")
        with cluster.connect(dbname=qdb) as a:
            a.execute(f"GRANT {attacker} TO postgres")   # the operator trusts the queue's owner
            bind(a, "pgboss", q)
            got = refusal(a, f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,))
            assert got is not None and got[0] == "42501" and attacker in got[1], got
            assert not is_superuser(a, attacker)
            a.execute(f"REVOKE {attacker} FROM postgres")


def test_bind_queue_refuses_queue_tables_the_owner_turned_into_code(cluster, attacker):
    """The owner of the pgmq and pg-boss schemas turns the tables bind_queue
    reads or indexes into views over its code, or gives the JSON column a
    domain of its own: bind_queue refuses each with 22023, creates nothing,
    and the planted code never runs as superuser."""
    with owned_queue_db(cluster, attacker, pgboss=False) as qdb:
        with cluster.connect(dbname=qdb, user=attacker) as m:
            m.execute("CREATE SCHEMA pgmq")
            m.execute("CREATE FUNCTION pgmq.evil() RETURNS SETOF jsonb LANGUAGE plpgsql AS $$ BEGIN "
                      + escalation(attacker) + " RETURN NEXT '{}'::jsonb; END $$")
            m.execute("CREATE TABLE pgmq.meta (queue_name text)")
            m.execute("INSERT INTO pgmq.meta VALUES ('V1'), ('d1'), ('j1'), ('s1')")
            cols = "msg_id bigint, read_ct int, enqueued_at timestamptz, vt timestamptz, message jsonb"
            table_turned_view(m, "pgmq.q_v1", cols,
                              "SELECT 1::bigint AS msg_id, 0 AS read_ct, now() AS enqueued_at, now() AS vt, "
                              "pgmq.evil() AS message")
            m.execute("CREATE FUNCTION pgmq.ok(jsonb) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN "
                      + escalation(attacker) + " RETURN true; END $$")
            m.execute("CREATE DOMAIN pgmq.payload AS jsonb CHECK (pgmq.ok(VALUE))")
            m.execute("CREATE TABLE pgmq.q_d1 (msg_id bigint, read_ct int, enqueued_at timestamptz, vt timestamptz, "
                      "message pgmq.payload)")
            m.execute("CREATE TABLE pgmq.q_j1 (msg_id bigint, read_ct int, enqueued_at timestamptz, vt timestamptz, "
                      "message json)")
            m.execute("CREATE SEQUENCE pgmq.q_s1")
            m.execute("CREATE SCHEMA pgboss")
            m.execute("CREATE TYPE pgboss.job_state AS ENUM ('created', 'retry', 'active', 'completed')")
            m.execute("CREATE TABLE pgboss.job (id uuid, name text, data jsonb, state pgboss.job_state, "
                      "priority int, created_on timestamptz, start_after timestamptz, started_on timestamptz, "
                      "retry_count int)")
            m.execute("CREATE FUNCTION pgboss.names() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN "
                      + escalation(attacker) + " RETURN NEXT 'q'; END $$")
            table_turned_view(m, "pgboss.queue", "name text", "SELECT pgboss.names() AS name")
        with cluster.connect(dbname=qdb) as a:
            for source, queue in (("pgmq", "V1"), ("pgmq", "d1"), ("pgmq", "j1"), ("pgmq", "s1"), ("pgboss", "q")):
                got = refusal(a, f"SELECT {S}.bind_queue(%s, %s)", (source, queue))
                assert got is not None and got[0] == "22023", (source, queue, got)
            assert a.execute(f"SELECT count(*) FROM {S}.queue_bindings").fetchone()[0] == 0
            assert a.execute("SELECT count(*) FROM pg_class WHERE relname LIKE 'meshhook_claim_%'").fetchone()[0] == 0
            assert a.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'meshhook_claim_%'").fetchone()[0] == 0
            tick(a)
            a.execute(f"SELECT * FROM {S}.explain_queues()").fetchall()
            assert not is_superuser(a, attacker)


# =========================================================================== 4. a queue worker that is not an admin

def test_a_queue_worker_cannot_release_renew_or_forge_claims(cluster, adb, db, attacker, tenant):
    """A role with pg-boss's rights on its tables (it completes and fails
    jobs) but no admin rights: it cannot end another tenant's claimed slot
    except by ending that job, cannot attach the slot-ending trigger to a
    table of its own, and editing waiting jobs or jobs of other queues
    releases nothing."""
    q = boss_queue(db)
    other_q = boss_queue(db)
    ids = insert_jobs(db, q, [{"tenant_id": tenant}] * 3)
    other_ids = insert_jobs(db, other_q, [{"tenant_id": tenant}])
    bind(db, "pgboss", q)
    [c] = claim(db, "pgboss", q)
    slot = str(c["slot_id"])
    db.execute("UPDATE pgboss.job SET state = 'active', started_on = now() WHERE id = %s::uuid", (other_ids[0],))
    db.execute(f"GRANT USAGE ON SCHEMA pgboss TO {attacker}")
    db.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgboss TO {attacker}")
    try:
        with cluster.connect(dbname=adb, user=attacker) as w:
            for call, params in ((f"SELECT {S}.release_execution_slot(%s)", (slot,)),
                                 (f"SELECT * FROM {S}.heartbeat_execution_slot(%s)", (slot,)),
                                 (f"SELECT {S}._renew_slots(ARRAY[%s]::uuid[])", (slot,)),
                                 (f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q,))):
                got = refusal(w, call, params)
                assert got is not None and got[0] == "42501" and tenant not in got[1], (call, got)
            w.execute("CREATE TEMP TABLE job (id uuid, name text, state text)")
            got = refusal(w, "CREATE TRIGGER t AFTER DELETE ON job FOR EACH ROW "
                             f"EXECUTE FUNCTION {S}._claim_ended('1', 'pgboss')")
            assert got is not None and got[0] == "42501", got
            # Waiting jobs of the bound queue, and an active job of another queue.
            w.execute("UPDATE pgboss.job SET priority = 5 WHERE name = %s AND state = 'created'", (q,))
            w.execute("DELETE FROM pgboss.job WHERE id = %s::uuid", (ids[2],))
            w.execute("UPDATE pgboss.job SET state = 'completed' WHERE id = %s::uuid", (other_ids[0],))
        assert live_slots(db, tenant) == {slot}
        assert tick(db) == []
        assert live_slots(db, tenant) == {slot}
    finally:
        db.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA pgboss FROM {attacker}")
        db.execute(f"REVOKE USAGE ON SCHEMA pgboss FROM {attacker}")


# =========================================================================== 5. a tenant shaping its jobs

def test_spelling_ones_tenant_id_several_ways_does_not_buy_a_bigger_share(cluster, adb, db):
    a, b = lettered_uuid(), str(uuid.uuid4())
    q = boss_queue(db)
    insert_jobs(db, q, [{"tenant_id": s} for s in spellings(a)[:4] for _ in range(10)]
                + [{"tenant_id": b}] * 40)
    bind(db, "pgboss", q)
    got = claim(db, "pgboss", q, batch=10)
    n = {t: sum(1 for c in got if str(c["tenant_id"]) == t) for t in (a, b)}
    assert sum(n.values()) == 10
    assert abs(n[a] - n[b]) <= 1, f"equal weights, both idle, batch of 10: {n}"


def test_spelling_ones_tenant_id_several_ways_does_not_multiply_the_jobs_a_call_passes(cluster, adb, db):
    a = lettered_uuid()
    q = boss_queue(db)
    set_limit(db, "concurrent_executions.openai", 1, a)
    insert_jobs(db, q, [{"tenant_id": a, "api": "openai"}])
    bind(db, "pgboss", q, key_path="api")
    assert len(claim(db, "pgboss", q)) == 1            # its one openai slot is taken
    forms = spellings(a)[:6]
    insert_jobs(db, q, [{"tenant_id": s, "api": "openai"} for s in forms for _ in range(17)])
    time.sleep(0.15)                                   # past the 100 ms the backend reuses its tenant scan
    before = blocked(db, "key_limit")
    assert claim(db, "pgboss", q, batch=1) == []
    passed = blocked(db, "key_limit") - before
    assert passed <= 16, f"one tenant's jobs, all held by its key limit, were tried {passed:.0f} times in one call"


def test_odd_job_json_never_fails_a_claim_or_takes_from_another_tenant(cluster, adb, db, tenant):
    """Tenant ids that are objects, arrays, numbers, booleans, braces or
    padded; costs that are NaN, Infinity, exponents, negative zero, huge or
    full-width digits; keys that are huge or objects; projects that are
    arrays: none fails claim_jobs, none is claimed for anybody but the tenant
    it names, and a cost of 1,000,000 takes nothing from the other tenant."""
    other = str(uuid.uuid4())
    q = boss_queue(db)
    odd = [{"tenant_id": {"id": tenant}}, {"tenant_id": [tenant]}, {"tenant_id": 123}, {"tenant_id": True},
           {"tenant_id": "{" + tenant + "}"}, {"tenant_id": " " + tenant}, {"tenant_id": tenant + "\n"},
           {"tenant_id": "x" * 2000}]
    odd += [{"tenant_id": tenant, "cost": c} for c in ("NaN", "Infinity", "1e6", "-0", "0x10", "１", 1e300, -1)]
    odd += [{"tenant_id": tenant, "api": "k" * 5000}, {"tenant_id": tenant, "project": [tenant]},
            {"tenant_id": tenant, "cost": 1000000}]
    ids = insert_jobs(db, q, odd)
    [good] = insert_jobs(db, q, [{"tenant_id": other}])
    mq = uniq("mqodd")
    db.execute("SELECT pgmq.create(%s)", (mq,))
    db.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (mq, [json.dumps(d) for d in odd + [{"tenant_id": other}]]))
    bind(db, "pgboss", q, project_path="project", key_path="api", cost_path="cost")
    bind(db, "pgmq", mq, project_path="project", key_path="api", cost_path="cost")
    for source, queue in (("pgboss", q), ("pgmq", mq)):
        got = claim(db, source, queue, batch=100)
        assert [str(c["tenant_id"]) for c in got] == [other], (source, got)
        assert claim(db, source, queue, batch=100) == []
    assert live_slots(db, tenant) == set()
    assert db.execute("SELECT count(*) FROM pgboss.job WHERE id = ANY(%s::uuid[]) AND state = 'created'",
                      (ids,)).fetchone()[0] == len(odd)
    assert db.execute("SELECT state FROM pgboss.job WHERE id = %s::uuid", (good,)).fetchone()[0] == "active"


def test_an_oversized_tenant_value_neither_blocks_binding_nor_is_refused_by_pg_boss(cluster, adb, db, tenant):
    big = os.urandom(1600).hex()                       # 3,200 random bytes: pglz cannot shrink them
    q = boss_queue(db)
    insert_jobs(db, q, [{"tenant_id": big}, {"tenant_id": tenant}])
    got = refusal(db, f"SELECT {S}.bind_queue('pgboss', %s)", (q,))
    assert got is None, f"a tenant's waiting job stops the admin binding the queue: {got}"
    got = refusal(db, "INSERT INTO pgboss.job (name, data) VALUES (%s, %s::jsonb), (%s, %s::jsonb)",
                  (q, json.dumps({"tenant_id": tenant}), q, json.dumps({"tenant_id": big})))
    assert got is None, f"pg-boss refuses jobs it took before the binding: {got}"
    assert [str(c["tenant_id"]) for c in claim(db, "pgboss", q, batch=10)] == [tenant, tenant]


def test_distinct_keys_cannot_take_the_slot_table_from_others(cluster, adb, db, tenant):
    """1,100 jobs of one tenant, each with its own concurrency key (a
    counter each while it runs): the tenant ceiling stops it at 1,024 live
    slots, and another tenant's job is still claimed."""
    other = str(uuid.uuid4())
    ceiling = int(db.execute("SHOW meshhook_limits.tenant_slot_ceiling").fetchone()[0])
    q = boss_queue(db)
    insert_jobs(db, q, [{"tenant_id": tenant, "api": f"k{i}"} for i in range(ceiling + 76)])
    bind(db, "pgboss", q, key_path="api")
    for _ in range(500):                               # until its ceiling stops it
        if not claim(db, "pgboss", q, batch=1000):
            break
    assert len(live_slots(db, tenant)) == ceiling
    insert_jobs(db, q, [{"tenant_id": other}])
    time.sleep(0.15)                                   # past the 100 ms the backend reuses its tenant scan
    got = claim(db, "pgboss", q, batch=1000)
    assert other in {str(c["tenant_id"]) for c in got}
    assert len(live_slots(db, tenant)) == ceiling


def test_one_tenants_stately_duplicate_does_not_fail_claims_for_everyone(cluster, adb, db, tenant):
    """On a pg-boss 'stately' queue (one active job per singleton key, a
    unique index of pg-boss's), a tenant queues the same job again while the
    first runs. Taking it would violate that index: claim_jobs must pass it
    over (boss.fetch() does), not fail the call for every tenant with 23505.
    (Fails with 23505 on commit 24fb77e; the working tree's head_q skips
    such jobs.)"""
    other = str(uuid.uuid4())
    q = uniq("stately")
    boss(cluster, adb, "create-queue", name=q, options={"policy": "stately"})
    boss(cluster, adb, "send", name=q, data={"tenant_id": tenant}, options={"singletonKey": "report"})
    bind(db, "pgboss", q)
    assert len(claim(db, "pgboss", q)) == 1            # the tenant's job runs
    # The same job again, while the first runs (stately allows one queued and one active).
    [queued] = boss(cluster, adb, "send", name=q, data={"tenant_id": tenant}, options={"singletonKey": "report"})
    assert queued
    others = [boss(cluster, adb, "send", name=q, data={"tenant_id": other}, options={"singletonKey": f"o{i}"})[0]
              for i in range(3)]
    got = refusal(db, f"SELECT * FROM {S}.claim_jobs('pgboss', %s, 5)", (q,))
    assert got is None, f"claim_jobs failed for every tenant: {got}"
    assert db.execute("SELECT count(*) FROM pgboss.job WHERE id = ANY(%s::uuid[]) AND state = 'active'",
                      (others,)).fetchone()[0] == 3
    assert db.execute("SELECT state FROM pgboss.job WHERE id = %s::uuid", (queued,)).fetchone()[0] == "created"


def test_a_tenants_waiters_do_not_hold_back_another_tenant(cluster, adb, db, tenant):
    """Eight waiters of a tenant at its limit, each waiting up to 10 minutes
    over RPC (cancelled once the checks are done): another tenant, waiting or
    not, is granted at once, not after its own wait; nobody can park a waiter
    for a tenant it is not."""
    other, third = str(uuid.uuid4()), str(uuid.uuid4())
    set_limit(db, "concurrent_executions", 1, tenant)
    # Held for longer than the test: its lease running out would let a waiter in.
    assert acquire(db, tenant, lease="15 minutes")[0] is True
    out = {}

    def waiter(k):
        try:
            with cluster.connect(dbname=adb, user="authenticator") as c:
                out[k] = rpc(c, claims_of(tenant), WAIT_SQL, (tenant, "10 minutes"))[0][0]
        except psycopg.Error as e:
            out[k] = e.sqlstate

    waiting = ("SELECT {} FROM pg_stat_activity WHERE wait_event_type = 'Extension' "
               "AND query LIKE '%%acquire_execution_slot%%wait =>%%' AND pid <> pg_backend_pid()")
    threads = [threading.Thread(target=waiter, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while db.execute(waiting.format("count(*)")).fetchone()[0] < 8:
            assert time.monotonic() < deadline, "the waiters did not start waiting"
            time.sleep(0.02)
        # Held back, a call would wait its own minute: half of that is
        # margin for a busy machine.
        with cluster.connect(dbname=adb, user="authenticator") as c:
            for wait in ("60 seconds", None):
                t0 = time.monotonic()
                [(granted,)] = rpc(c, claims_of(other), WAIT_SQL, (other, wait))
                assert granted is True and time.monotonic() - t0 < 30
            t0 = time.monotonic()
            got = rpc_refusal(c, claims_of(third), WAIT_SQL, (other, "60 seconds"))
            assert got and got[0] == "42501" and other not in got[1] and time.monotonic() - t0 < 30, got
    finally:
        # The eight still wait (their 10 minutes are not over): cancel them,
        # again until each has ended (one between two sleeps is not in the
        # wait event at that instant).
        deadline = time.monotonic() + 60
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            db.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE state = 'active' "
                       "AND query LIKE '%%acquire_execution_slot%%wait =>%%' AND pid <> pg_backend_pid()")
            for t in threads:
                t.join(0.2)
    # Every waiter was still waiting when cancelled: none was granted.
    assert sorted(out.values()) == ["57014"] * 8, out
