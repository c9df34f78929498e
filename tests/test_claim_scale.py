"""claim_jobs with thousands of tenants waiting (issue 20).

claim_jobs needs the limits of every tenant it finds waiting (its
concurrent_executions and fair_share_weight). A new backend, or any backend
after a limit changed anywhere, loads them in one query for all the tenants
(`_slot_limits_of`), not one query each, and keeps up to 200,000 of them.
These tests check what that must not change: the limits are the ones the
one-tenant resolution gives, and a new backend's first claim, and the
first after a limit change, claim the right job among thousands of
tenants. (Their cost is measured in benches/, never here.)
"""
import uuid

import pytest

from conftest import ROOT, set_limit
from test_queue_owners import install_pgmq

S = "meshhook_limits"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"


def test_limits_loaded_for_many_tenants_are_those_of_each_alone(admin):
    """Every level a limit can come from (tenant, plan, global), every
    resource the claim reads, tenants with nothing of their own, a plan
    without the resource, and a project limit (which must not count)."""
    tenants = [str(uuid.uuid4()) for _ in range(12)]
    plan = f"p_{uuid.uuid4().hex[:8]}"
    admin.execute(f"SELECT {S}.create_plan(%s)", (plan,))
    admin.execute(f"SELECT {S}.set_plan_limit(%s, 'concurrent_executions', 7)", (plan,))
    admin.execute(f"SELECT {S}.set_plan_limit(%s, 'fair_share_weight', 3)", (plan,))
    admin.execute(f"SELECT {S}.set_plan_limit(%s, 'memory_bytes', 1000000)", (plan,))
    for t in tenants[:6]:
        admin.execute(f"SELECT {S}.assign_plan(%s, %s)", (t, plan))
    set_limit(admin, "concurrent_executions", 2, tenant=tenants[0])           # over its plan's
    set_limit(admin, "fair_share_weight", "0.5", tenant=tenants[1])
    set_limit(admin, "execution_seconds", 30, tenant=tenants[6])
    set_limit(admin, "concurrent_executions", 4, tenant=tenants[7])
    set_limit(admin, "concurrent_executions", 1, tenant=tenants[8], project=str(uuid.uuid4()))
    set_limit(admin, "concurrent_executions.k", 1, tenant=tenants[9])
    try:
        set_limit(admin, "execution_seconds", 600)                              # global
        set_limit(admin, "concurrent_executions_total", 50)
        many = {str(r[0]): r[1:] for r in admin.execute(
            f"SELECT * FROM {S}._slot_limits_of(%s::uuid[])", (tenants + [tenants[0], None],)).fetchall()}
        assert sorted(many) == sorted(tenants)
        for t in tenants:
            alone = admin.execute(f"SELECT * FROM {S}._slot_limits(%s, NULL)", (t,)).fetchone()
            assert many[t] == alone, (t, many[t], alone)
        assert many[tenants[0]][0] == 2 and many[tenants[3]][0] == 7 and many[tenants[1]][-1] == 0.5
        assert many[tenants[6]][2] == 30_000_000 and many[tenants[11]][2] == 600_000_000
        assert all(v[5] == 50 for v in many.values())
    finally:
        admin.execute(f"DELETE FROM {S}.limits WHERE tenant_id IS NULL AND plan IS NULL "
                      "AND resource IN ('execution_seconds', 'concurrent_executions_total')")


@pytest.fixture
def pgmq_db(cluster):
    if not PGMQ_SQL.exists():
        pytest.skip("pgmq's SQL is not fetched")
    name = f"mlscale_{uuid.uuid4().hex[:8]}"
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {name}")
    with cluster.connect(dbname=name) as c:
        c.execute(f"CREATE EXTENSION {S}")
    install_pgmq(cluster, name)
    yield name
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_first_claims_among_thousands_of_tenants_take_the_right_job(cluster, pgmq_db):
    """3,000 tenants with waiting jobs, all at their limit (0) but one: a
    new backend's first claim, and the first after a limit change on an
    unrelated tenant, each claim that one's job and nothing else; a tenant
    given room by that change is claimed next."""
    n = 3000
    with cluster.connect(dbname=pgmq_db) as a:
        a.execute("SELECT pgmq.create('wide')")
        a.execute(f"SELECT {S}.bind_queue('pgmq', 'wide')")
        a.execute("SELECT pgmq.send_batch('wide', ARRAY(SELECT jsonb_build_object('tenant_id', gen_random_uuid()) "
                  "FROM generate_series(1, %s)))", (n,))
        lucky, later = str(uuid.uuid4()), str(uuid.uuid4())
        a.execute("SELECT pgmq.send('wide', jsonb_build_object('tenant_id', %s::text))", (lucky,))
        a.execute("SELECT pgmq.send('wide', jsonb_build_object('tenant_id', %s::text))", (later,))
        a.execute("ANALYZE")
        set_limit(a, "concurrent_executions", 0)
        set_limit(a, "concurrent_executions", 1, tenant=lucky)
    try:
        with cluster.connect(dbname=pgmq_db) as w:        # a new backend: nothing cached
            got = w.execute(f"SELECT tenant_id FROM {S}.claim_jobs('pgmq', 'wide', 5)").fetchall()
            assert [str(r[0]) for r in got] == [lucky]
            with cluster.connect(dbname=pgmq_db) as a:
                set_limit(a, "concurrent_executions", 1, tenant=later)
            got = w.execute(f"SELECT tenant_id FROM {S}.claim_jobs('pgmq', 'wide', 5)").fetchall()
            assert [str(r[0]) for r in got] == [later]
            assert w.execute(f"SELECT count(*) FROM {S}.claim_jobs('pgmq', 'wide', 5)").fetchone()[0] == 0
    finally:
        with cluster.connect(dbname=pgmq_db) as a:
            a.execute(f"SELECT {S}.unbind_queue('pgmq', 'wide')")
