"""A pgmq message's tenant bound to its sender (issue 19, item 4):
bind_queue('pgmq', queue, sender_tenant => true).

The attack: a tenant that may send to a pgmq queue over Supabase RPC
(`authenticated`, JWT claims) names another tenant in its messages and so
fills that tenant's limits. With the queue bound with sender_tenant, the
trigger writes the sender's own tenant at the tenant path: the messages are
charged to the sender. Requests without a tenant are refused; admins and the
application's backend role keep what they wrote.
"""
import json
import subprocess
import uuid

import psycopg
import pytest

from conftest import PG_BIN, ROOT, requires, rpc

S = "meshhook_limits"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"

pytestmark = requires(PGMQ_SQL.exists(), "pgmq's SQL (scripts/install-queue-systems.sh)")


def claims(tenant=None) -> dict:
    c = {"role": "authenticated", "sub": str(uuid.uuid4())}
    if tenant:
        c["app_metadata"] = {"tenant_id": tenant}
    return c


@pytest.fixture(scope="module")
def sdb(cluster):
    name = f"mlsender_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {name}")
    with cluster.connect(dbname=name) as c:
        c.execute(f"CREATE EXTENSION {S}")
    subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cluster.host, "-p",
                    str(cluster.port), "-U", "postgres", "-d", name, "-f", str(PGMQ_SQL)],
                   check=True, capture_output=True, text=True, timeout=60)
    yield name
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def rpc_queue(db, sender_tenant: bool, tenant_path="tenant_id") -> str:
    """A pgmq queue that tenants may send to over RPC, bound."""
    q = f"snd_{uuid.uuid4().hex[:8]}"
    db.execute("SELECT pgmq.create(%s)", (q,))
    db.execute("GRANT USAGE ON SCHEMA pgmq TO authenticated, anon, service_role")
    db.execute("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgmq TO authenticated, anon, service_role")
    db.execute(f"GRANT SELECT, INSERT, UPDATE ON pgmq.q_{q} TO authenticated, anon, service_role")
    db.execute("GRANT SELECT, UPDATE ON pgmq.meta TO authenticated, anon, service_role")
    db.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO authenticated, anon, service_role")
    db.execute(f"SELECT {S}.bind_queue('pgmq', %s, %s, sender_tenant => %s)", (q, tenant_path, sender_tenant))
    return q


def live_slots(db, tenant) -> int:
    return db.execute(f"SELECT count(*) FROM {S}.slots() WHERE state = 'live' AND tenant_id = %s",
                      (tenant,)).fetchone()[0]


@pytest.mark.parametrize("bound_to_sender", [False, True])
def test_a_tenant_sending_as_another_tenant_is_charged_itself(cluster, sdb, bound_to_sender):
    mallory, victim = str(uuid.uuid4()), str(uuid.uuid4())
    with cluster.connect(dbname=sdb) as db, cluster.connect(dbname=sdb, user="authenticator") as api:
        q = rpc_queue(db, bound_to_sender)
        for _ in range(3):
            rpc(api, claims(mallory), "SELECT * FROM pgmq.send(%s, %s::jsonb)",
                (q, json.dumps({"tenant_id": victim, "work": 1})))
        got = db.execute(f"SELECT tenant_id::text FROM {S}.claim_jobs('pgmq', %s, 3)", (q,)).fetchall()
        try:
            charged = {t for (t,) in got}
            if bound_to_sender:
                assert charged == {mallory}, charged
                assert live_slots(db, victim) == 0
                assert db.execute(f"SELECT count(*) FROM pgmq.q_{q} WHERE message->>'tenant_id' = %s",
                                  (mallory,)).fetchone()[0] == 3
            else:
                # Job data is trusted on a queue bound without it: the attack works.
                assert charged == {victim}, charged
        finally:
            db.execute(f"SELECT {S}.release_execution_slot(slot_id) FROM {S}.slots() WHERE state = 'live'")
            db.execute(f"SELECT {S}.unbind_queue('pgmq', %s)", (q,))


def test_who_may_name_the_tenant_on_a_sender_bound_queue(cluster, sdb):
    tenant, other = str(uuid.uuid4()), str(uuid.uuid4())
    with cluster.connect(dbname=sdb) as db, cluster.connect(dbname=sdb, user="authenticator") as api:
        q = rpc_queue(db, True, tenant_path="meta.tenant")
        table = f"pgmq.q_{q}"
        try:
            # A tenant: written at the nested path, whatever it sent.
            [(a,)] = rpc(api, claims(tenant), "SELECT * FROM pgmq.send(%s, %s::jsonb)", (q, json.dumps({"x": 1})))
            [(b,)] = rpc(api, claims(tenant), "SELECT * FROM pgmq.send(%s, %s::jsonb)",
                         (q, json.dumps({"meta": "not an object"})))
            # ... and again when it rewrites a message.
            rpc(api, claims(tenant), f"UPDATE {table} SET message = %s::jsonb WHERE msg_id = %s",
                (json.dumps({"meta": {"tenant": other}}), a))
            # A request with claims but no tenant (anon): refused.
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                rpc(api, {"role": "anon"}, "SELECT * FROM pgmq.send(%s, %s::jsonb)", (q, json.dumps({"x": 1})),
                    role="anon")
            # Not a JSON object: nowhere to write the tenant.
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                rpc(api, claims(tenant), "SELECT * FROM pgmq.send(%s, %s::jsonb)", (q, "[1, 2]"))
            # An admin (service_role over RPC, or the superuser) and the
            # application's own backend role name the tenant themselves.
            [(c,)] = rpc(api, {"role": "service_role"}, "SELECT * FROM pgmq.send(%s, %s::jsonb)",
                         (q, json.dumps({"meta": {"tenant": other}})), role="service_role")
            backend = f"app_{uuid.uuid4().hex[:8]}"
            db.execute(f"CREATE ROLE {backend} LOGIN")
            try:
                db.execute(f"GRANT USAGE ON SCHEMA pgmq TO {backend}")
                db.execute(f"GRANT INSERT, SELECT ON {table}, pgmq.meta TO {backend}")
                db.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO {backend}")
                with cluster.connect(dbname=sdb, user=backend) as app:
                    [(d,)] = app.execute("SELECT * FROM pgmq.send(%s, %s::jsonb)",
                                         (q, json.dumps({"meta": {"tenant": other}}))).fetchall()
            finally:
                db.execute(f"DROP OWNED BY {backend}")
                db.execute(f"DROP ROLE {backend}")
            got = dict(db.execute(f"SELECT msg_id, message #>> '{{meta,tenant}}' FROM {table}").fetchall())
            assert got == {a: tenant, b: tenant, c: other, d: other}, got
        finally:
            db.execute(f"SELECT {S}.unbind_queue('pgmq', %s)", (q,))
        # Unbound: the trigger is gone with the binding.
        assert db.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE '%%_sender'",
                          (table,)).fetchone()[0] == 0


def test_sender_tenant_is_for_pgmq_only(cluster, sdb):
    with cluster.connect(dbname=sdb) as db:
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            db.execute(f"SELECT {S}.bind_queue('pgboss', 'any', sender_tenant => true)")


def test_a_tenant_login_cannot_send_as_another_from_code_run_for_someone_else(cluster, sdb):
    """A login role bound to a tenant (meshhook_limits.tenant_id) sends from
    inside CREATE INDEX on its own temp table, a security-restricted
    operation where its tenant does not count: refused, not sent as written."""
    mine, other = str(uuid.uuid4()), str(uuid.uuid4())
    with cluster.connect(dbname=sdb) as db:
        q = rpc_queue(db, True)
        table = f"pgmq.q_{q}"
        login = f"tl_{uuid.uuid4().hex[:8]}"
        db.execute(f"CREATE ROLE {login} LOGIN")
        db.execute(f"ALTER ROLE {login} SET meshhook_limits.tenant_id = '{mine}'")
        db.execute(f"GRANT USAGE ON SCHEMA pgmq TO {login}")
        db.execute(f"GRANT INSERT, SELECT ON {table} TO {login}")
        db.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA pgmq TO {login}")
        try:
            with cluster.connect(dbname=sdb, user=login) as t:
                t.execute(f"INSERT INTO {table} (message, vt) VALUES (%s::jsonb, now())",
                          (json.dumps({"tenant_id": other}),))
                t.execute("CREATE FUNCTION pg_temp.w(x int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
                          f"INSERT INTO {table} (message, vt) VALUES ('{{\"tenant_id\": \"{other}\"}}', now()); "
                          "RETURN x; END $$")
                t.execute("CREATE FUNCTION pg_temp.f(x int) RETURNS int LANGUAGE plpgsql IMMUTABLE AS $$ "
                          "BEGIN RETURN pg_temp.w(x); END $$")
                t.execute("CREATE TEMP TABLE t (x int)")
                t.execute("INSERT INTO t VALUES (1)")
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    t.execute("CREATE INDEX ON pg_temp.t ((pg_temp.f(x)))")
            got = [r[0] for r in db.execute(f"SELECT message->>'tenant_id' FROM {table}").fetchall()]
            assert got == [mine], got
        finally:
            db.execute(f"SELECT {S}.unbind_queue('pgmq', %s)", (q,))
            db.execute(f"DROP OWNED BY {login}")
            db.execute(f"DROP ROLE {login}")
