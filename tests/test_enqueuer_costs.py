"""Whoever may enqueue cannot make every claim expensive (issue 19, item 3),
on pg-boss 11, pg-boss 12 and pgmq.

The attacks, as an enqueuer makes them: one tenant's 20,000 jobs deferred a
day (pg-boss startAfter, pgmq send with a delay); 3,000 tenants with one
deferred job each; 5,000 jobs whose tenant values are junk. Meanwhile a
victim tenant has one job due. A claim must cost what the due work costs,
not what the attacker queued: measured as work, never as time, by the
statistics of the claiming transaction itself (pg_stat_xact_user_tables:
index scans started and heap tuples fetched on the queue's tables).
"""
import json
import os
import shutil
import subprocess
import uuid

import pytest

from conftest import PG_BIN, ROOT, requires

S = "meshhook_limits"
DRIVER = ROOT / "tests" / "node" / "pgboss_driver.mjs"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"
NODE = shutil.which("node")

pytestmark = requires(NODE is not None and (ROOT / "tests/node/node_modules/pg-boss-12/package.json").exists()
                      and PGMQ_SQL.exists(), "pg-boss 11 and 12 (npm) and pgmq's SQL")


@pytest.fixture(scope="module", params=["pgboss11", "pgboss12", "pgmq"])
def edb(request, cluster):
    source = request.param
    name = f"mlenq_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {name}")
    with cluster.connect(dbname=name) as c:
        c.execute(f"CREATE EXTENSION {S}")
    if source == "pgmq":
        subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cluster.host, "-p",
                        str(cluster.port), "-U", "postgres", "-d", name, "-f", str(PGMQ_SQL)],
                       check=True, capture_output=True, text=True, timeout=60)
    else:
        p = subprocess.run([NODE, str(DRIVER), cluster.dsn(name), "start", "{}"], capture_output=True, text=True,
                           timeout=240, env={**os.environ, "PGBOSS_MAJOR": source[-2:]})
        assert p.returncode == 0, p.stderr
    yield name, source
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def new_queue(db, source) -> str:
    q = f"enq_{uuid.uuid4().hex[:8]}"
    kind = "pgmq" if source == "pgmq" else "pgboss"
    if source == "pgmq":
        db.execute("SELECT pgmq.create(%s)", (q,))
    else:
        db.execute("""SELECT pgboss.create_queue(%s, '{"policy": "standard"}'::jsonb)""", (q,))
    db.execute(f"SELECT {S}.bind_queue(%s, %s, cost_path => 'cost')", (kind, q))
    return q


def enqueue(db, source, q, tenants_sql: str, delay_seconds: int, extra: dict | None = None) -> None:
    """One job per row of `tenants_sql` (a query of one text column, the
    tenant value), due after `delay_seconds`, as the queue system's sender
    writes it; `extra`: more keys of its JSON."""
    more = json.dumps(extra or {})
    data = f"jsonb_build_object('tenant_id', t) || '{more}'::jsonb"
    if source == "pgmq":
        db.execute(f"SELECT pgmq.send_batch(%s, ARRAY(SELECT {data} FROM ({tenants_sql}) x(t)), %s)",
                   (q, delay_seconds))
    else:
        db.execute(f"INSERT INTO pgboss.job (id, name, data, start_after) "
                   f"SELECT gen_random_uuid(), %s, {data}, now() + %s * interval '1 second' "
                   f"FROM ({tenants_sql}) x(t)", (q, delay_seconds))
    db.execute("ANALYZE")


def claim_work(cluster, dbname, source, q) -> tuple[list, int, int]:
    """Claim once in a new session (no tenants remembered from an earlier
    claim): (the claimed tenants, index scans started, heap tuples fetched
    on the queue's tables by the claiming transaction)."""
    schema = "pgmq" if source == "pgmq" else "pgboss"
    kind = "pgmq" if source == "pgmq" else "pgboss"
    with cluster.connect(dbname=dbname, autocommit=False) as c:
        def work():
            return c.execute("SELECT coalesce(sum(idx_scan), 0), coalesce(sum(idx_tup_fetch), 0) "
                             "FROM pg_stat_xact_user_tables WHERE schemaname = %s", (schema,)).fetchone()
        scans0, fetched0 = work()
        got = [r[0] for r in c.execute(f"SELECT tenant_id::text FROM {S}.claim_jobs(%s, %s, 1)", (kind, q)).fetchall()]
        scans1, fetched1 = work()
        c.commit()
    return got, scans1 - scans0, fetched1 - fetched0


def test_one_tenants_deferred_backlog_is_not_walked_by_every_claim(cluster, edb):
    dbname, source = edb
    deferred, victim = str(uuid.uuid4()), str(uuid.uuid4())
    with cluster.connect(dbname=dbname) as db:
        q = new_queue(db, source)
        enqueue(db, source, q, f"SELECT '{deferred}' FROM generate_series(1, 20000)", 86400)
        enqueue(db, source, q, f"SELECT '{victim}'", 0)
    got, scans, fetched = claim_work(cluster, dbname, source, q)
    assert got == [victim]
    assert fetched < 100, f"a claim fetched {fetched} jobs (20,000 deferred jobs of another tenant)"


def test_many_tenants_with_only_deferred_jobs_are_not_probed(cluster, edb):
    """3,000 tenants with one job each deferred a day, one with a job due:
    a new backend finds it by reading the due jobs from an index on when
    they are due (pg-boss: the binding's _at index; pgmq: the queue's vt
    index), not by probing every tenant
    (the skip scan would take 3,001 index scans); with 3,000 more jobs due
    than that read may take, by the skip scan, one probe per tenant."""
    dbname, source = edb
    victim = str(uuid.uuid4())
    with cluster.connect(dbname=dbname) as db:
        q = new_queue(db, source)
        enqueue(db, source, q, "SELECT gen_random_uuid()::text FROM generate_series(1, 3000)", 86400)
        enqueue(db, source, q, f"SELECT '{victim}'", 0)
    got, scans, fetched = claim_work(cluster, dbname, source, q)
    assert got == [victim]
    assert scans < 50, f"{scans} index scans: the deferred tenants were probed"
    with cluster.connect(dbname=dbname) as db:
        enqueue(db, source, q, f"SELECT '{victim}' FROM generate_series(1, 3000)", 0)
    got, scans, fetched = claim_work(cluster, dbname, source, q)
    assert got == [victim]
    assert 3001 <= scans <= 3001 + 50, f"{scans} index scans for 3,001 tenants, one with jobs due"


def test_junk_tenant_values_add_nothing_for_a_claim_to_visit(cluster, edb):
    dbname, source = edb
    victim = str(uuid.uuid4())
    with cluster.connect(dbname=dbname) as db:
        q = new_queue(db, source)
        enqueue(db, source, q, "SELECT 'junk-' || g FROM generate_series(1, 5000) g", 0)
        enqueue(db, source, q, f"SELECT '{victim}'", 0)
    got, scans, fetched = claim_work(cluster, dbname, source, q)
    assert got == [victim]
    assert scans < 50, f"{scans} index scans: the junk values were visited"


def test_a_due_job_behind_a_deferred_backlog_does_not_make_claims_walk_it(cluster, edb):
    """The same tenant also has one job due, which never fits (its cost is
    above every limit): it stays a contender on every claim, and its
    deferred backlog sits in front of that job in queue order."""
    dbname, source = edb
    deferred, victim = str(uuid.uuid4()), str(uuid.uuid4())
    with cluster.connect(dbname=dbname) as db:
        q = new_queue(db, source)
        db.execute(f"SELECT {S}.set_limit('concurrent_executions', 10, tenant_id => %s)", (deferred,))
        enqueue(db, source, q, f"SELECT '{deferred}' FROM generate_series(1, 20000)", 86400)
        enqueue(db, source, q, f"SELECT '{deferred}'", 0, {"cost": "1000000"})
        enqueue(db, source, q, f"SELECT '{victim}'", 0)
    got, scans, fetched = claim_work(cluster, dbname, source, q)
    assert got == [victim]
    assert fetched < 300, f"a claim fetched {fetched} jobs (20,000 deferred jobs of another tenant, one due)"
