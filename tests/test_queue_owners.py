"""Claiming is safe against the owners of queue tables and schemas (issue 19,
items 1 and 2), on pg-boss 11, pg-boss 12 and pgmq, attacked as they would be.

The worker that claims also ends its jobs with the queue system's own calls
(boss.complete, pgmq.archive), which run whatever the queue table's owner
attached to it with the worker's rights. So claim_jobs claims only from a
queue whose table and schema owners have the claiming role's privileges
(a superuser, the claiming role itself, or a member of it): a worker that is
merely granted the application's role is refused. Where the worker is the
owner (the application's role, granted meshhook_limits_admin), what the
owner attached to its table (row and statement triggers, rules, row-level
security policies, index expressions), before or after binding, runs during
a claim in a security-restricted operation, with no meshhook_limits
identity: the payload's attempt to set a limit is refused, and the log it
writes says who it ran as. A partition of another owner is refused like the
table's owner; bind_queue refuses a queue schema another role made before
the queue system was installed, CREATE EXTENSION a meshhook_limits schema
made before it, and the tick's reads of queue tables end after
meshhook_limits.queue_read_timeout.
"""
import json
import os
import shutil
import subprocess
import time
import uuid
from contextlib import contextmanager

import psycopg
import pytest

from conftest import PG_BIN, ROOT, requires

S = "meshhook_limits"
DRIVER = ROOT / "tests" / "node" / "pgboss_driver.mjs"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"
NODE = shutil.which("node")

pytestmark = requires(NODE is not None and (ROOT / "tests/node/node_modules/pg-boss-12/package.json").exists()
                      and PGMQ_SQL.exists(), "pg-boss 11 and 12 (npm) and pgmq's SQL")

SOURCES = ["pgboss11", "pgboss12", "pgmq"]


def boss(cluster, db: str, major: int, command: str, user: str, **args):
    p = subprocess.run([NODE, str(DRIVER), cluster.dsn(db, user=user), command, json.dumps(args)],
                       capture_output=True, text=True, timeout=240,
                       env={**os.environ, "PGBOSS_MAJOR": str(major)})
    try:
        out = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise AssertionError(f"driver {command} failed: rc={p.returncode} {p.stdout!r} {p.stderr!r}")
    assert p.returncode == 0, out
    return out


def install_pgmq(cluster, db: str) -> None:
    subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cluster.host, "-p",
                    str(cluster.port), "-U", "postgres", "-d", db, "-f", str(PGMQ_SQL)],
                   check=True, capture_output=True, text=True, timeout=60)


def role(cluster, prefix: str, *options: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE ROLE {name} LOGIN NOSUPERUSER {' '.join(options)}")
    return name


def refusal(conn, query, params=None):
    """(sqlstate, message, hint) of the error `query` raises, or None."""
    try:
        conn.execute(query, params)
    except psycopg.Error as e:
        return e.sqlstate, e.diag.message_primary or "", e.diag.message_hint or ""
    return None


def global_limit(conn):
    r = conn.execute(f"SELECT limit_value FROM {S}.limits WHERE resource = 'concurrent_executions' "
                     "AND tenant_id IS NULL AND plan IS NULL").fetchone()
    return None if r is None else int(r[0])


class Queue:
    """A queue of `source` in a scratch database: the queue system's tables
    belong to `owner` (pg-boss migrated by it; pgmq installed by the
    superuser, the queue created by `owner`), and `worker` binds and claims:
    the owner itself, granted meshhook_limits_admin, or another admin that is
    granted the owner's role."""

    def __init__(self, cluster, db, source, owner, worker):
        self.cluster, self.db, self.source, self.owner, self.worker = cluster, db, source, owner, worker
        self.major = {"pgboss11": 11, "pgboss12": 12}.get(source)
        self.kind = "pgmq" if source == "pgmq" else "pgboss"
        self.name = f"q_{uuid.uuid4().hex[:8]}"
        with cluster.connect(dbname=db, user=owner) as o:
            if self.major:
                boss(cluster, db, self.major, "create-queue", owner, name=self.name)
                self.table = "pgboss.job"
            else:
                o.execute("SELECT pgmq.create(%s)", (self.name,))
                self.table = f"pgmq.q_{self.name}"

    def send(self, tenant, n=1):
        with self.cluster.connect(dbname=self.db, user=self.owner) as o:
            for _ in range(n):
                if self.major:
                    boss(self.cluster, self.db, self.major, "send", self.owner, name=self.name,
                         data={"tenant_id": tenant})
                else:
                    o.execute("SELECT pgmq.send(%s, %s::jsonb)", (self.name, json.dumps({"tenant_id": tenant})))

    def leaf(self, conn) -> str:
        """The table the queue's rows are in (a partition of pgboss.job)."""
        if not self.major:
            return self.table
        return conn.execute("SELECT tableoid::regclass::text FROM pgboss.job WHERE name = %s LIMIT 1",
                            (self.name,)).fetchone()[0]

    def bind(self, conn):
        conn.execute(f"SELECT {S}.bind_queue(%s, %s)", (self.kind, self.name))

    def claim(self, conn, batch=1):
        return conn.execute(f"SELECT job_id FROM {S}.claim_jobs(%s, %s, %s)", (self.kind, self.name, batch)).fetchall()


@contextmanager
def app_queue(cluster, source, worker_is_owner: bool = True):
    if worker_is_owner:
        owner = worker = role(cluster, "app", "IN ROLE meshhook_limits_admin")
    else:
        owner = role(cluster, "app")
        worker = role(cluster, "worker", "IN ROLE meshhook_limits_admin, " + owner)
    db = f"mlown_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db} OWNER {owner}")
    try:
        with cluster.connect(dbname=db) as c:
            c.execute(f"CREATE EXTENSION {S}")
            if source == "pgmq":
                install_pgmq(cluster, db)
                c.execute(f"GRANT USAGE, CREATE ON SCHEMA pgmq TO {owner}")
                c.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA pgmq TO {owner}")
            c.execute(f"CREATE SCHEMA atk AUTHORIZATION {owner}")
        if source != "pgmq":
            assert boss(cluster, db, int(source[-2:]), "start", owner)["installed"] is True
        with cluster.connect(dbname=db, user=owner) as o:
            # The payload every plant runs: act as an admin (set the global
            # limit), and log who it ran as and whether it was refused.
            o.execute("CREATE TABLE atk.seen (plant text, who name, refused boolean)")
            o.execute("""CREATE FUNCTION atk.payload(plant text) RETURNS boolean LANGUAGE plpgsql AS $$
                BEGIN
                  BEGIN
                    PERFORM meshhook_limits.set_limit('concurrent_executions', 999);
                    INSERT INTO atk.seen VALUES (plant, current_user, false);
                  EXCEPTION WHEN OTHERS THEN
                    INSERT INTO atk.seen VALUES (plant, current_user, true);
                  END;
                  RETURN true;
                END $$""")
            o.execute("""CREATE FUNCTION atk.trg() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM atk.payload(TG_ARGV[0]); RETURN NEW; END $$""")
            o.execute("""CREATE FUNCTION atk.imm(text) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
                BEGIN PERFORM atk.payload('index expression'); RETURN $1; END $$""")
        yield Queue(cluster, db, source, owner, worker)
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            c.execute(f"DROP ROLE IF EXISTS {worker}")
            c.execute(f"DROP ROLE IF EXISTS {owner}")


def plant_everything(q: Queue) -> list[str]:
    """As the owner: code on the queue table that a claim's statements run."""
    with q.cluster.connect(dbname=q.db, user=q.owner) as o:
        leaf = q.leaf(o)
        o.execute(f"CREATE TRIGGER atk_before BEFORE UPDATE ON {leaf} FOR EACH ROW "
                  "EXECUTE FUNCTION atk.trg('row trigger')")
        o.execute(f"CREATE TRIGGER atk_after AFTER UPDATE ON {q.table} FOR EACH STATEMENT "
                  "EXECUTE FUNCTION atk.trg('statement trigger')")
        o.execute(f"CREATE RULE atk_rule AS ON UPDATE TO {q.table} DO ALSO SELECT atk.payload('rule')")
        o.execute(f"ALTER TABLE {q.table} ENABLE ROW LEVEL SECURITY")
        o.execute(f"ALTER TABLE {q.table} FORCE ROW LEVEL SECURITY")
        o.execute(f"CREATE POLICY atk_policy ON {q.table} USING (atk.payload('policy'))")
        o.execute(f"CREATE INDEX atk_index ON {leaf} (atk.imm(({'id' if q.major else 'msg_id'})::text))")
        o.execute("DELETE FROM atk.seen")   # what CREATE INDEX itself ran
    return ["row trigger", "statement trigger", "rule", "policy", "index expression"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("planted", ["before binding", "after binding"])
def test_the_queue_owners_code_runs_as_the_owner_not_as_the_claiming_admin(cluster, source, planted):
    tenant = str(uuid.uuid4())
    with app_queue(cluster, source) as q:
        q.send(tenant, 2)
        with cluster.connect(dbname=q.db, user=q.worker) as w:
            if planted == "before binding":
                plants = plant_everything(q)
                q.bind(w)
            else:
                q.bind(w)
                plants = plant_everything(q)
            assert len(q.claim(w)) == 1
        with cluster.connect(dbname=q.db) as c:
            assert global_limit(c) is None, "the queue owner's code set a limit as the claiming admin"
            seen = c.execute("SELECT plant, who::text, refused FROM atk.seen").fetchall()
        ran = {p for p, _, _ in seen}
        assert ran == set(plants), f"plants that did not run during the claim: {set(plants) - ran}"
        assert {(who, refused) for _, who, refused in seen} == {(q.owner, True)}, seen


@pytest.mark.parametrize("source", SOURCES)
def test_a_worker_whose_privileges_the_queue_owner_lacks_does_not_claim(cluster, source):
    """The worker is an admin granted the application's role, which owns the
    queue and is not an admin: its triggers would run as the worker when the
    worker completes a job, so the worker does not claim from it (42501,
    naming the owner), and takes nothing. Once the owner may act as the
    worker (GRANT worker TO owner), it claims."""
    tenant = str(uuid.uuid4())
    with app_queue(cluster, source, worker_is_owner=False) as q:
        q.send(tenant, 1)
        with cluster.connect(dbname=q.db, user=q.worker) as w:
            q.bind(w)
            got = refusal(w, f"SELECT * FROM {S}.claim_jobs(%s, %s)", (q.kind, q.name))
            assert got is not None and got[0] == "42501" and q.owner in got[1], got
            assert "meshhook_limits_admin" in got[2], got
        with cluster.connect(dbname=q.db) as c:
            assert c.execute(f"SELECT count(*) FROM {S}.slots() WHERE state = 'live'").fetchone()[0] == 0
            # The other way round: the owner may act as the worker, and the
            # worker has just the rights claiming needs.
            c.execute(f"REVOKE {q.owner} FROM {q.worker}")
            c.execute(f"GRANT {q.worker} TO {q.owner}")
            c.execute(f"GRANT USAGE ON SCHEMA {q.table.split('.')[0]} TO {q.worker}")
            c.execute(f"GRANT SELECT, UPDATE ON {q.table} TO {q.worker}")
        with cluster.connect(dbname=q.db, user=q.worker) as w:
            assert len(q.claim(w)) == 1


def test_a_partition_of_another_owner_is_refused(cluster):
    """Code on a partition another role owns would run as the table's owner."""
    with app_queue(cluster, "pgboss11") as q:
        q.send(str(uuid.uuid4()), 1)
        with cluster.connect(dbname=q.db, user=q.worker) as w:
            q.bind(w)
        other = role(cluster, "other")
        try:
            with cluster.connect(dbname=q.db) as c:
                leaf = q.leaf(c)
                c.execute(f"ALTER TABLE {leaf} OWNER TO {other}")
            with cluster.connect(dbname=q.db, user=q.worker) as w:
                got = refusal(w, f"SELECT * FROM {S}.claim_jobs('pgboss', %s)", (q.name,))
                assert got is not None and got[0] == "42501" and other in got[1] and "partition" in got[1], got
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"ALTER TABLE {leaf} OWNER TO {q.owner}")
        finally:
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"DROP OWNED BY {other}")
            with cluster.connect(dbname="postgres") as c:
                c.execute(f"DROP ROLE {other}")


def test_a_worker_without_the_queues_rights_is_refused(cluster):
    """The statements run as the owner, but only for a claimer that has the
    rights the queue's own fetch needs."""
    with app_queue(cluster, "pgmq") as q:
        q.send(str(uuid.uuid4()), 1)
        bare = role(cluster, "bare", "IN ROLE meshhook_limits_admin")
        with cluster.connect(dbname=q.db) as c:
            c.execute(f"GRANT {bare} TO {q.owner}")     # trusted by the owner: only the rights are missing
        try:
            with cluster.connect(dbname=q.db, user=q.worker) as w:
                q.bind(w)
            with cluster.connect(dbname=q.db, user=bare) as b:
                got = refusal(b, f"SELECT * FROM {S}.claim_jobs('pgmq', %s)", (q.name,))
                assert got is not None and got[0] == "42501" and "permission denied" in got[1], got
        finally:
            with cluster.connect(dbname="postgres") as c:
                c.execute(f"DROP ROLE {bare}")


# =========================================================================== squatting (item 2)

@contextmanager
def squatted_db(cluster):
    """A database where mallory, with only CREATE on it, got there first."""
    mallory = role(cluster, "mallory")
    db = f"mlsquat_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {db}")
        c.execute(f"GRANT CREATE ON DATABASE {db} TO {mallory}")
    try:
        with cluster.connect(dbname=db) as c:
            c.execute(f"CREATE EXTENSION {S}")
        yield db, mallory
    finally:
        with cluster.connect(dbname="postgres") as c:
            c.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            c.execute(f"DROP ROLE IF EXISTS {mallory}")


PAYLOAD = """CREATE FUNCTION {s}.evil() RETURNS trigger LANGUAGE plpgsql AS $$
  BEGIN PERFORM meshhook_limits.set_limit('concurrent_executions', 0); RETURN NEW;
  EXCEPTION WHEN OTHERS THEN RETURN NEW; END $$"""


def test_a_pgmq_schema_squatted_before_pgmq_was_installed_is_refused(cluster):
    with squatted_db(cluster) as (db, mallory):
        with cluster.connect(dbname=db, user=mallory) as m:
            m.execute("CREATE SCHEMA pgmq")
            m.execute(PAYLOAD.format(s="pgmq"))
            m.execute("CREATE TABLE pgmq.q_jobs (msg_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, read_ct int DEFAULT 0 NOT NULL, "
                      "enqueued_at timestamptz DEFAULT now() NOT NULL, last_read_at timestamptz, "
                      "vt timestamptz NOT NULL, message jsonb, headers jsonb)")
            m.execute("CREATE TRIGGER zz BEFORE UPDATE ON pgmq.q_jobs FOR EACH ROW EXECUTE FUNCTION pgmq.evil()")
        install_pgmq(cluster, db)                       # the operator installs pgmq, then makes the queue
        with cluster.connect(dbname=db) as a:
            a.execute("SELECT pgmq.create('jobs')")
            a.execute("SELECT pgmq.send('jobs', %s::jsonb)", (json.dumps({"tenant_id": str(uuid.uuid4())}),))
            got = refusal(a, f"SELECT {S}.bind_queue('pgmq', 'jobs')")
            assert got is not None and got[0] == "42501", got
            assert "schema pgmq" in got[1] and mallory in got[1], got
            assert f"GRANT {mallory}" in got[2], got
            assert a.execute(f"SELECT count(*) FROM {S}.queue_bindings").fetchone()[0] == 0
            assert global_limit(a) is None


@pytest.mark.parametrize("major", [11, 12])
def test_a_pgboss_schema_squatted_before_pgboss_was_installed_is_refused(cluster, major):
    with squatted_db(cluster) as (db, mallory):
        with cluster.connect(dbname=db, user=mallory) as m:
            m.execute("CREATE SCHEMA pgboss")
            m.execute("GRANT USAGE, CREATE ON SCHEMA pgboss TO PUBLIC")
        assert boss(cluster, db, major, "start", "postgres")["installed"] is True
        boss(cluster, db, major, "create-queue", "postgres", name="jobs")
        with cluster.connect(dbname=db) as a:
            got = refusal(a, f"SELECT {S}.bind_queue('pgboss', 'jobs')")
            assert got is not None and got[0] == "42501", got
            assert "schema pgboss" in got[1] and mallory in got[1], got
            # The operator who means it: the schema's owner is trusted once
            # the binding role is granted it.
            a.execute(f"GRANT {mallory} TO postgres")
            a.execute(f"SELECT {S}.bind_queue('pgboss', 'jobs')")
            a.execute(f"REVOKE {mallory} FROM postgres")


@pytest.mark.parametrize("source", ["pgboss12", "pgmq"])
def test_a_function_of_another_role_in_the_queue_schema_is_refused(cluster, source):
    """Workers call the queue system's functions (pgmq.archive, pg-boss's
    own): a function in the queue's schema that a role without the worker's
    privileges owns (it had CREATE there once, or was given the function)
    can be rewritten by that role, to run as the worker. bind_queue refuses
    it, and claim_jobs refuses it when it appears later, in a worker's
    session that has claimed before (the check is cached per backend until
    the catalogs change: a stale answer would be the bug)."""
    with app_queue(cluster, source) as q:
        q.send(str(uuid.uuid4()), 3)
        other = role(cluster, "other")
        fn = f"{q.kind}.archive_all(text)"
        try:
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"CREATE FUNCTION {fn} RETURNS boolean LANGUAGE sql AS 'SELECT true'")
                c.execute(f"ALTER FUNCTION {fn} OWNER TO {other}")
            with cluster.connect(dbname=q.db, user=q.worker) as w:
                got = refusal(w, f"SELECT {S}.bind_queue(%s, %s)", (q.kind, q.name))
                assert got is not None and got[0] == "42501", got
                assert "archive_all" in got[1] and other in got[1], got
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"ALTER FUNCTION {fn} OWNER TO {q.owner}")
            with cluster.connect(dbname=q.db, user=q.worker) as w, cluster.connect(dbname=q.db) as c:
                q.bind(w)
                assert len(q.claim(w)) == 1
                # Given away after binding, between two claims of one session.
                c.execute(f"ALTER FUNCTION {fn} OWNER TO {other}")
                got = refusal(w, f"SELECT * FROM {S}.claim_jobs(%s, %s)", (q.kind, q.name))
                assert got is not None and got[0] == "42501" and "archive_all" in got[1] and other in got[1], got
                c.execute(f"ALTER FUNCTION {fn} OWNER TO {q.owner}")
                assert len(q.claim(w)) == 1
                # The same for the table the jobs are in (pg-boss: the
                # queue's partition) given to another role.
                leaf = q.leaf(c)
                c.execute(f"ALTER TABLE {leaf} OWNER TO {other}")
                got = refusal(w, f"SELECT * FROM {S}.claim_jobs(%s, %s)", (q.kind, q.name))
                # (pgmq: the worker, its owner until now, lost its rights on it first.)
                assert got is not None and got[0] == "42501", got
                assert other in got[1] or "permission denied for table" in got[1], got
                c.execute(f"ALTER TABLE {leaf} OWNER TO {q.owner}")
                assert len(q.claim(w)) == 1
        finally:
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"DROP OWNED BY {other}")
            with cluster.connect(dbname="postgres") as c:
                c.execute(f"DROP ROLE {other}")


def test_a_meshhook_limits_schema_squatted_before_create_extension_is_refused(cluster):
    """The owner of the extension's schema could add overloads that its
    SECURITY DEFINER functions call: CREATE EXTENSION refuses such a schema."""
    with squatted_db(cluster) as (db, mallory):
        with cluster.connect(dbname=db) as a:
            a.execute(f"DROP EXTENSION {S}")
            a.execute(f"DROP SCHEMA IF EXISTS {S} CASCADE")
        with cluster.connect(dbname=db, user=mallory) as m:
            m.execute(f"CREATE SCHEMA {S}")
        with cluster.connect(dbname=db) as a:
            got = refusal(a, f"CREATE EXTENSION {S}")
            assert got is not None and got[0] == "42501" and mallory in got[1], got
            assert a.execute("SELECT count(*) FROM pg_extension WHERE extname = %s", (S,)).fetchone()[0] == 0
            assert a.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = %s::regnamespace", (S,)).fetchone()[0] == 0


def test_a_queue_owners_slow_policy_cannot_hold_the_tick(cluster):
    """The tick reads every queue as its owner (queue health), bound or not.
    An owner's policy that sleeps makes that read fail after
    meshhook_limits.queue_read_timeout (54000), and the tick goes on without
    it: a tick returns under a statement_timeout far below the sleep (the
    worker runs the same tick)."""
    with app_queue(cluster, "pgmq") as q:
        q.send(str(uuid.uuid4()), 1)
        with cluster.connect(dbname=q.db, user=q.owner) as o:
            o.execute("CREATE FUNCTION atk.slow() RETURNS boolean LANGUAGE plpgsql AS $$ "
                      "BEGIN IF session_user <> current_user THEN PERFORM pg_sleep(3600); END IF; RETURN true; END $$")
            o.execute(f"ALTER TABLE {q.table} ENABLE ROW LEVEL SECURITY")
            o.execute(f"ALTER TABLE {q.table} FORCE ROW LEVEL SECURITY")
            o.execute(f"CREATE POLICY slow ON {q.table} USING (atk.slow())")
        with cluster.connect(dbname=q.db) as c:
            c.execute("SET meshhook_limits.queue_read_timeout = '1s'")
            c.execute("SET statement_timeout = '30s'")
            warnings = []
            c.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
            c.execute(f"SELECT {S}.tick()")           # 57014 here if the read were not bounded
            assert any(q.name in w and "queue_read_timeout" in w for w in warnings), warnings
            c.execute("RESET statement_timeout")
            # The queue's health was carried from the last sample, not lost.
            assert c.execute(f"SELECT ticks FROM {S}.worker_state").fetchone()[0] >= 1


@pytest.mark.parametrize("source", SOURCES)
def test_a_queue_owner_that_catches_the_cancel_cannot_hold_the_tick(cluster, source):
    """Code that catches query_canceled outlasts queue_read_timeout (and any
    statement_timeout): a policy that sleeps in such a loop would hold the
    tick, and with it reaping, claim ending and alerts, for as long as it
    likes. So the tick reads only queue tables whose owners are
    administrators, and says once why it skips the others: the owner's code
    never runs (its warning never reaches the caller), and the tick returns
    long before the code's own bound (60 s, so that this test ends on a
    library that does run it)."""
    with app_queue(cluster, source, worker_is_owner=False) as q:
        q.send(str(uuid.uuid4()), 1)
        with cluster.connect(dbname=q.db, user=q.owner) as o:
            o.execute("""CREATE FUNCTION atk.stubborn() RETURNS boolean LANGUAGE plpgsql AS $$
                DECLARE until timestamptz := clock_timestamp() + interval '60 seconds';
                BEGIN
                  RAISE WARNING 'stubborn code ran as %', current_user;
                  WHILE clock_timestamp() < until LOOP
                    BEGIN PERFORM pg_sleep(1); EXCEPTION WHEN query_canceled THEN NULL; END;
                  END LOOP;
                  RETURN true;
                END $$""")
            o.execute(f"ALTER TABLE {q.table} ENABLE ROW LEVEL SECURITY")
            o.execute(f"ALTER TABLE {q.table} FORCE ROW LEVEL SECURITY")
            o.execute(f"CREATE POLICY stubborn ON {q.table} USING (atk.stubborn())")
        with cluster.connect(dbname=q.db) as c:
            c.execute("SET meshhook_limits.queue_read_timeout = '1s'")
            c.execute("SET meshhook_limits.queue_scan_budget = 1")   # every tick a full pass
            warnings = []
            c.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
            started = time.monotonic()
            c.execute(f"SELECT {S}.tick()")
            assert time.monotonic() - started < 30, warnings
            assert not any("stubborn" in w for w in warnings), warnings
            skipped = [w for w in warnings if "does not read this queue" in w and q.owner in w]
            assert skipped, warnings
            # Once per process and reason, not every second.
            warnings.clear()
            c.execute(f"SELECT {S}.tick()")
            assert not any("does not read this queue" in w for w in warnings), warnings
            # The skipped queue is not in queue_health.
            assert c.execute(f"SELECT count(*) FROM {S}.queue_health() WHERE queue = %s",
                             (q.name,)).fetchone()[0] == 0


@pytest.mark.parametrize("major", [11, 12])
def test_a_pgboss_archive_of_a_schema_squatter_runs_no_code_in_the_tick(cluster, major):
    """Found by the red team: the tick's pg-boss sample reads pg-boss 10's
    pgboss.archive with pgboss.job, as job's owner (here the superuser that
    installed pg-boss). Whoever made the schema first (or may create in it)
    makes pgboss.archive a view over its own function, which would run as
    that owner, make its author superuser, and hold the tick. The tick reads
    no queue table whose schema a non-administrator owns or may create in,
    and an archive only when it is a table."""
    with squatted_db(cluster) as (db, mallory):
        with cluster.connect(dbname=db, user=mallory) as m:
            m.execute("CREATE SCHEMA pgboss")
        assert boss(cluster, db, major, "start", "postgres")["installed"] is True
        boss(cluster, db, major, "create-queue", "postgres", name="jobs")
        boss(cluster, db, major, "send", "postgres", name="jobs", data={"tenant_id": str(uuid.uuid4())})
        with cluster.connect(dbname=db, user=mallory) as m:
            m.execute("CREATE TABLE pgboss.seen (who name)")
            m.execute("GRANT INSERT ON pgboss.seen TO PUBLIC")
            m.execute(f"""CREATE FUNCTION pgboss.evil() RETURNS boolean LANGUAGE plpgsql AS $$
                DECLARE until timestamptz := clock_timestamp() + interval '20 seconds';
                BEGIN
                  INSERT INTO pgboss.seen VALUES (current_user);
                  BEGIN EXECUTE 'ALTER ROLE {mallory} SUPERUSER'; EXCEPTION WHEN OTHERS THEN NULL; END;
                  WHILE clock_timestamp() < until LOOP
                    BEGIN PERFORM pg_sleep(1); EXCEPTION WHEN query_canceled THEN NULL; END;
                  END LOOP;
                  RETURN true;
                END $$""")
            m.execute("""CREATE VIEW pgboss.archive AS
                SELECT 'jobs'::text AS name, 'completed'::text AS state, now() AS created_on,
                       now() AS started_on, now() AS completed_on WHERE pgboss.evil()""")
        try:
            with cluster.connect(dbname=db) as c:
                c.execute("SET meshhook_limits.queue_read_timeout = '1s'")
                c.execute("SET meshhook_limits.queue_scan_budget = 1")
                warnings = []
                c.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
                c.execute(f"SELECT {S}.tick()")
                assert c.execute("SELECT count(*) FROM pgboss.seen").fetchone()[0] == 0
                assert not c.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (mallory,)).fetchone()[0]
                assert any("does not read this queue" in w and mallory in w for w in warnings), warnings
        finally:
            cluster.sql(f"ALTER ROLE {mallory} NOSUPERUSER")


@pytest.mark.parametrize("change", ["function", "create"])
def test_a_change_of_trust_is_seen_within_an_open_transaction(cluster, change):
    """Found by the red team: the cached trust answer must not outlive a
    catalog change another session commits while the worker's transaction
    is open (its locks are held, so it takes in no invalidations by itself)."""
    with app_queue(cluster, "pgmq") as q:
        q.send(str(uuid.uuid4()), 3)
        other = role(cluster, "other")
        try:
            with cluster.connect(dbname=q.db, user=q.worker) as w:
                q.bind(w)
            with cluster.connect(dbname=q.db, user=q.worker, autocommit=False) as w, \
                    cluster.connect(dbname=q.db) as c:
                assert len(q.claim(w)) == 1          # allowed, and cached
                if change == "function":
                    c.execute("CREATE FUNCTION pgmq.evil() RETURNS boolean LANGUAGE sql AS 'SELECT true'")
                    c.execute(f"ALTER FUNCTION pgmq.evil() OWNER TO {other}")
                else:
                    c.execute(f"GRANT CREATE ON SCHEMA pgmq TO {other}")
                got = refusal(w, f"SELECT * FROM {S}.claim_jobs('pgmq', %s)", (q.name,))
                w.rollback()
                assert got is not None and got[0] == "42501" and other in got[1], got
        finally:
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"REVOKE ALL ON SCHEMA pgmq FROM {other}")
                c.execute(f"DROP OWNED BY {other}")
            with cluster.connect(dbname="postgres") as c:
                c.execute(f"DROP ROLE {other}")


def test_an_inheritance_child_or_a_schema_creator_of_another_role_is_refused(cluster):
    """Statements on the queue table reach plain inheritance children and
    fire their triggers, and whoever may create in the queue's schema can
    put functions there that the worker calls (pgmq.archive): their roles
    too must have the claiming role's privileges."""
    with app_queue(cluster, "pgmq") as q:
        q.send(str(uuid.uuid4()), 1)
        with cluster.connect(dbname=q.db, user=q.worker) as w:
            q.bind(w)
        other = role(cluster, "other")
        try:
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"CREATE TABLE atk.kid () INHERITS ({q.table})")
                c.execute(f"ALTER TABLE atk.kid OWNER TO {other}")
            with cluster.connect(dbname=q.db, user=q.worker) as w:
                got = refusal(w, f"SELECT * FROM {S}.claim_jobs('pgmq', %s)", (q.name,))
                assert got is not None and got[0] == "42501" and other in got[1] and "atk.kid" in got[1], got
            with cluster.connect(dbname=q.db) as c:
                c.execute("DROP TABLE atk.kid")
                c.execute(f"GRANT CREATE ON SCHEMA pgmq TO {other}")
            with cluster.connect(dbname=q.db, user=q.worker) as w:
                got = refusal(w, f"SELECT * FROM {S}.claim_jobs('pgmq', %s)", (q.name,))
                assert got is not None and got[0] == "42501" and other in got[1] and "create" in got[1], got
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"REVOKE CREATE ON SCHEMA pgmq FROM {other}")
            with cluster.connect(dbname=q.db, user=q.worker) as w:
                assert len(q.claim(w)) == 1
        finally:
            with cluster.connect(dbname=q.db) as c:
                c.execute(f"DROP OWNED BY {other}")
            with cluster.connect(dbname="postgres") as c:
                c.execute(f"DROP ROLE {other}")


def test_a_meshhook_limits_schema_others_may_create_in_is_refused(cluster):
    """A superuser's schema, but one another role may create in (or already
    did): CREATE EXTENSION refuses it too."""
    with squatted_db(cluster) as (db, mallory):
        with cluster.connect(dbname=db) as a:
            a.execute(f"DROP EXTENSION {S}")
            a.execute(f"DROP SCHEMA IF EXISTS {S} CASCADE")
            a.execute(f"CREATE SCHEMA {S}")
            a.execute(f"GRANT CREATE, USAGE ON SCHEMA {S} TO {mallory}")
        with cluster.connect(dbname=db, user=mallory) as m:
            m.execute(f"CREATE FUNCTION {S}.require_admin_access(text, int DEFAULT 0) RETURNS void "
                      "LANGUAGE sql AS 'SELECT'")
        with cluster.connect(dbname=db) as a:
            got = refusal(a, f"CREATE EXTENSION {S}")
            assert got is not None and got[0] == "42501", got
            a.execute(f"REVOKE CREATE ON SCHEMA {S} FROM {mallory}")
            got = refusal(a, f"CREATE EXTENSION {S}")        # what mallory put there is still there
            assert got is not None and got[0] == "42501" and "holds objects" in got[1], got
