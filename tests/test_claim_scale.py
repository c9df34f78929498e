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
import time
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


# --------------------------------------------------------------------------- the run queue
# A claiming backend keeps, per bound queue, the tenants its last scan found
# (its run queue, docs/claiming.md "Cost"). What it must not lose.

def _new_queue(conn, q):
    conn.execute("SELECT pgmq.create(%s)", (q,))
    conn.execute(f"SELECT {S}.bind_queue('pgmq', %s)", (q,))


def _send(conn, q, tenants):
    conn.execute("SELECT pgmq.send_batch(%s, ARRAY(SELECT jsonb_build_object('tenant_id', t) "
                 "FROM unnest(%s::text[]) t))", (q, list(tenants)))


def _claim(conn, q, batch=1):
    return [(str(r[0]), r[1]) for r in conn.execute(
        f"SELECT tenant_id, job_id FROM {S}.claim_jobs('pgmq', %s, %s)", (q, batch)).fetchall()]


def _claim_until(conn, q, wanted, deadline_s=60):
    """Claim one job at a time until every tenant of `wanted` has had one;
    the tenants claimed, in order. Fails loudly past the deadline."""
    order, missing = [], set(wanted)
    deadline = time.monotonic() + deadline_s
    while missing:
        assert time.monotonic() < deadline, f"never claimed: {sorted(missing)}"
        for t, _ in _claim(conn, q):
            order.append(t)
            missing.discard(t)
    return order


def test_tenants_whose_jobs_commit_after_a_scan_are_claimed(cluster, pgmq_db):
    """A tenant whose first job commits after the claiming backend's scan
    (its insert begun before), one whose first insert rolled back before
    its next committed, and one whose probe found nothing before its next
    job came: each is claimed by that backend while others keep it busy."""
    q = "late"
    busy = [str(uuid.uuid4()) for _ in range(3)]
    late, rolled, drained = (str(uuid.uuid4()) for _ in range(3))
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        _send(a, q, busy * 300 + [drained])
    with cluster.connect(dbname=pgmq_db) as w, \
            cluster.connect(dbname=pgmq_db) as i1, cluster.connect(dbname=pgmq_db) as i2:
        i1.execute("BEGIN")
        _send(i1, q, [late])
        i2.execute("BEGIN")
        _send(i2, q, [rolled])
        got = _claim(w, q, 8)                                 # the scan: neither is visible
        assert late not in {t for t, _ in got} and rolled not in {t for t, _ in got}
        i1.execute("COMMIT")
        i2.execute("ROLLBACK")
        _claim_until(w, q, [late])
        # drained's one job claimed, then its probe finds nothing: it is out.
        _claim_until(w, q, [drained])
        with cluster.connect(dbname=pgmq_db) as a:
            _send(a, q, [rolled, drained])
        _claim_until(w, q, [rolled, drained])


def test_a_tenant_parked_at_its_limit_is_back_when_its_job_ends(cluster, pgmq_db):
    """A tenant at its limit is parked by the backend that found it so;
    the end of its job (pgmq.delete, through the binding's trigger) brings
    it back to that backend's next claim, not only to a later scan."""
    q = "parked"
    t, other = str(uuid.uuid4()), str(uuid.uuid4())
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        set_limit(a, "concurrent_executions", 1, tenant=t)
        _send(a, q, [t, t] + [other] * 500)
    with cluster.connect(dbname=pgmq_db) as w, cluster.connect(dbname=pgmq_db) as a:
        first = _claim(w, q, 2)
        assert sorted(x for x, _ in first) == sorted([t, other])
        job = next(j for x, j in first if x == t)
        assert [x for x, _ in _claim(w, q)] == [other]          # t is parked
        a.execute("SELECT pgmq.delete(%s, %s::bigint)", (q, job))
        assert [x for x, _ in _claim(w, q)] == [t]              # its next job at once


def test_a_full_run_queue_keeps_the_tenants_that_waited_longest(cluster, pgmq_db):
    """With more tenants waiting than claim_max_tenants, a scan keeps those
    whose first job has waited longest (heavier tenants that came later do
    not jump the line), and the others are claimed by later scans."""
    q = "full"
    first = [str(uuid.uuid4()) for _ in range(100)]
    later = [str(uuid.uuid4()) for _ in range(150)]
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        _send(a, q, first)
        a.execute("SELECT pg_sleep(0.01)")
        _send(a, q, later)
        for t in later[:20]:
            set_limit(a, "fair_share_weight", 10, tenant=t)
    with cluster.connect(dbname=pgmq_db) as w:
        w.execute(f"SET {S}.claim_max_tenants = 100")
        order = _claim_until(w, q, first + later)
        assert set(order[:100]) == set(first)
        assert len(order) == 250


def test_tenants_past_the_first_chunk_of_the_scan_are_claimed(cluster, pgmq_db):
    """The scan goes through the tenants 4,096 at a time: with 5,000 tenants
    at their limit (0) and one with room whose id sorts last, a new
    backend's first claim still finds it; then, with room for all, every
    tenant is claimed, each once."""
    q = "chunks"
    n = 5000
    many = sorted(str(uuid.uuid4()) for _ in range(n))
    last = "ffffffff-ffff-4fff-bfff-ffffffffffff"
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        _send(a, q, many + [last])
        a.execute("ANALYZE")
        set_limit(a, "concurrent_executions", 0)
        set_limit(a, "concurrent_executions", 1, tenant=last)
    try:
        with cluster.connect(dbname=pgmq_db) as w:
            assert [t for t, _ in _claim(w, q, 5)] == [last]
            with cluster.connect(dbname=pgmq_db) as a:
                set_limit(a, "concurrent_executions", 1)
            got, deadline = [], time.monotonic() + 120
            while len(got) < n:
                assert time.monotonic() < deadline, f"{n - len(got)} tenants never claimed"
                batch = _claim(w, q, 100)
                got += [t for t, _ in batch]
                # Done: their slots end with them (the slot table is shared).
                w.execute("SELECT pgmq.delete(%s, %s::bigint[])", (q, [j for _, j in batch]))
            assert sorted(got) == many
    finally:
        with cluster.connect(dbname=pgmq_db) as a:
            a.execute(f"DELETE FROM {S}.limits WHERE tenant_id IS NULL AND resource = 'concurrent_executions'")


def test_a_newcomer_among_thousands_of_served_tenants_is_served_first(cluster, pgmq_db):
    """4,095 tenants with two jobs each (and 300 others), every one claimed
    once: their fair-share tags are all a job ahead of the clock. A tenant whose first
    job arrives then starts at the clock, so a new backend's first claim is
    its job. (The shared map of tags held 2,048 tenants' leads: the others
    were back at the clock, tied with the newcomer, and won the tie on
    their older jobs; the newcomer waited behind thousands.)"""
    q = "newcomer"
    n = 4095                        # with the newcomer: one chunk of the scan
    tenants = [str(uuid.uuid4()) for _ in range(n)]
    newcomer = "00000000-0000-4000-8000-000000000001"   # sorts first
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        _send(a, q, tenants * 2)
        # 300 more tenants claimed first, elsewhere: with these, the tags
        # of the 4,095 are more than the old map kept.
        _new_queue(a, q + "_before")
        _send(a, q + "_before", [str(uuid.uuid4()) for _ in range(300)])
    with cluster.connect(dbname=pgmq_db) as w:
        before = _claim(w, q + "_before", 300)
        assert len(before) == 300
        w.execute("SELECT pgmq.delete(%s, %s::bigint[])", (q + "_before", [j for _, j in before]))
        seen, deadline = set(), time.monotonic() + 120
        while len(seen) < n:
            assert time.monotonic() < deadline, f"{n - len(seen)} tenants never claimed"
            batch = _claim(w, q, min(100, n - len(seen)))
            twice = [t for t, _ in batch if t in seen]
            assert not twice, f"served twice in the first round after {len(seen)}: {twice[:3]} of {len(batch)}"
            seen |= {t for t, _ in batch}
            w.execute("SELECT pgmq.delete(%s, %s::bigint[])", (q, [j for _, j in batch]))
    with cluster.connect(dbname=pgmq_db) as a:
        _send(a, q, [newcomer])
    with cluster.connect(dbname=pgmq_db) as w:           # a new backend: scans afresh
        assert [t for t, _ in _claim(w, q, 1)] == [newcomer]


def test_a_full_run_queue_does_not_fill_up_with_tenants_at_their_limit(cluster, pgmq_db):
    """Tenants at their limit with a backlog have the oldest jobs; with more
    of them than claim_max_tenants they must not take every place: a new
    tenant with room is still claimed."""
    q = "capped"
    busy = [str(uuid.uuid4()) for _ in range(150)]
    newcomer = str(uuid.uuid4())
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        set_limit(a, "concurrent_executions", 1)
        _send(a, q, busy * 2)
    with cluster.connect(dbname=pgmq_db) as w:
        w.execute(f"SET {S}.claim_max_tenants = 100")
        held = set()
        deadline = time.monotonic() + 60
        while len(held) < len(busy):                  # every busy tenant at its limit
            assert time.monotonic() < deadline, f"{len(busy) - len(held)} busy tenants never claimed"
            held |= {t for t, _ in _claim(w, q, 1000)}
        with cluster.connect(dbname=pgmq_db) as a:
            _send(a, q, [newcomer])
        assert _claim_until(w, q, [newcomer]) == [newcomer]


def test_concurrent_claimers_across_chunks_never_over_admit(cluster, pgmq_db):
    """Four backends claim at once from 4,500 tenants (past one chunk of the
    scan) with two jobs each and a limit of 1: every tenant is claimed
    exactly once (its second job is refused while the first holds its
    slot), and nothing is left unclaimed."""
    import threading
    q = "racing"
    n = 4500
    tenants = [str(uuid.uuid4()) for _ in range(n)]
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        set_limit(a, "concurrent_executions", 1)
        _send(a, q, tenants * 2)
    claimed, errors = [], []
    lock = threading.Lock()
    deadline = time.monotonic() + 120

    def claimer():
        try:
            with cluster.connect(dbname=pgmq_db) as w:
                while time.monotonic() < deadline:
                    with lock:
                        if len(claimed) >= n:
                            return
                    got = _claim(w, q, 50)
                    with lock:
                        claimed.extend(got)
        except Exception as e:          # reported below, with the others'
            errors.append(e)

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        by_tenant = {}
        for t, _ in claimed:
            by_tenant[t] = by_tenant.get(t, 0) + 1
        assert max(by_tenant.values()) == 1, "a tenant was claimed twice while at its limit"
        assert sorted(by_tenant) == sorted(tenants)
    finally:
        with cluster.connect(dbname=pgmq_db) as a:     # their slots end with them
            a.execute("SELECT pgmq.delete(%s, %s::bigint[])", (q, [j for _, j in claimed]))


def _index_scans(conn, q):
    """This transaction's scans of each index on the queue's table."""
    return {r[0]: r[1] for r in conn.execute(
        "SELECT c.relname, pg_stat_get_xact_numscans(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %s::regclass",
        (f"pgmq.q_{q}",)).fetchall()}


def test_a_first_claim_among_thousands_of_deferred_tenants_reads_only_the_due_jobs(cluster, pgmq_db):
    """5,000 tenants whose only job is deferred an hour, and one with jobs
    due whose id sorts last. A new backend's first claim takes that
    tenant's job from one read of the due jobs on pgmq's vt index, without
    probing the deferred tenants on the binding's `_due` index (as this
    transaction's statistics count the scans); with more jobs due than the
    read may take, or without the vt index, it scans, and claims the same."""
    q = "deferred"
    n = 5000
    last = "ffffffff-ffff-4fff-bfff-ffffffffffff"
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        a.execute("SELECT pgmq.send_batch(%s, ARRAY(SELECT jsonb_build_object('tenant_id', gen_random_uuid()) "
                  "FROM generate_series(1, %s)), 3600)", (q, n))
        _send(a, q, [last] * 3)
        a.execute("ANALYZE")
        due_index = a.execute(f"SELECT index_name || '_due' FROM {S}.queue_bindings WHERE queue = %s",
                              (q,)).fetchone()[0]
        vt_index = a.execute(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "JOIN pg_attribute t ON t.attrelid = i.indrelid AND t.attnum = i.indkey[0] "
            "WHERE i.indrelid = %s::regclass AND t.attname = 'vt'", (f"pgmq.q_{q}",)).fetchone()[0]

    def first_claim():
        with cluster.connect(dbname=pgmq_db) as w:      # a new backend
            w.execute("BEGIN")
            got = [t for t, _ in _claim(w, q)]
            scans = _index_scans(w, q)
            w.execute("ROLLBACK")
        return got, scans

    got, scans = first_claim()
    assert got == [last]
    assert scans.get(due_index, 0) == 0, scans
    assert scans.get(vt_index, 0) >= 1, scans
    # More due than the read may take (2,048 at first): the scan, past its
    # first chunk, finds the tenant.
    with cluster.connect(dbname=pgmq_db) as a:
        _send(a, q, [last] * 2100)
    got, scans = first_claim()
    assert got == [last]
    assert scans.get(due_index, 0) > 4096, scans
    # No index on vt (dropped by the queue's owner): the scan.
    with cluster.connect(dbname=pgmq_db) as a:
        a.execute(f"DROP INDEX pgmq.{vt_index}")
    got, scans = first_claim()
    assert got == [last]
    assert scans.get(due_index, 0) > 4096, scans


def test_a_first_claim_loads_the_limits_of_the_tenants_it_meets_together(cluster, pgmq_db):
    """A new backend claiming 8 jobs among 1,000 tenants meets 8 tenants
    whose limits it has not loaded: it loads them (and the others, 1,024
    at a time) in one query, not one query per tenant (each costs about as
    much as 500 together), as this transaction's function statistics count
    the calls of `_claim_shares`."""
    q = "loads"
    tenants = [str(uuid.uuid4()) for _ in range(1000)]
    with cluster.connect(dbname=pgmq_db) as a:
        _new_queue(a, q)
        _send(a, q, tenants * 2)
        a.execute("ANALYZE")
    with cluster.connect(dbname=pgmq_db) as w:
        w.execute("SET track_functions = 'all'")
        w.execute("BEGIN")
        got = _claim(w, q, 8)
        calls = w.execute("SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
                          "WHERE funcname = '_claim_shares'").fetchone()[0]
        w.execute("ROLLBACK")
    assert len({t for t, _ in got}) == 8
    assert calls <= 2, f"{calls} loads of limits for one claim of 8 tenants"
