"""Rate limits: exact GCRA sequences at a controlled clock, pause/resume,
more keys than the shared table holds, and concurrent callers."""
import threading
import time
import uuid

import pytest

from conftest import set_limit

T0 = 1_900_000_000.0  # a fixed "now" for the test clock (epoch seconds)


def at(conn, seconds):
    conn.execute(f"SET meshhook_limits.test_clock = {T0 + seconds!r}")


def check(conn, tenant, key="default", cost=1):
    allowed, remaining, retry = conn.execute(
        "SELECT * FROM meshhook_limits.check_rate_limit(%s, %s, %s)", (tenant, key, cost)).fetchone()
    return allowed, remaining, (retry.total_seconds() if retry is not None else None)


@pytest.fixture
def clocked(cluster):
    with cluster.connect() as c:
        yield c
        c.execute("RESET meshhook_limits.test_clock")


def test_burst_then_steady_state_exact(clocked, tenant):
    set_limit(clocked, "requests_per_second", 2, tenant, burst=4)
    at(clocked, 0)
    assert [check(clocked, tenant) for _ in range(4)] == [
        (True, 3, None), (True, 2, None), (True, 1, None), (True, 0, None)]
    assert check(clocked, tenant) == (False, 0, 0.5)
    at(clocked, 0.499999)
    assert check(clocked, tenant)[0] is False
    at(clocked, 0.5)
    assert check(clocked, tenant) == (True, 0, None)
    # A steady stream at the rate is always allowed.
    for i in range(1, 21):
        at(clocked, 0.5 + i * 0.5)
        assert check(clocked, tenant)[0], i
    # Idle for a while: the full burst is back, not more.
    at(clocked, 100)
    assert [check(clocked, tenant)[0] for _ in range(5)] == [True, True, True, True, False]


def test_cost_and_remaining(clocked, tenant):
    set_limit(clocked, "requests_per_second", 10, tenant, burst=10)
    at(clocked, 0)
    assert check(clocked, tenant, cost=7) == (True, 3, None)
    allowed, remaining, retry = check(clocked, tenant, cost=5)
    assert (allowed, remaining) == (False, 3) and retry == pytest.approx(0.2)
    assert check(clocked, tenant, cost=0) == (True, 3, None)


def test_default_burst_is_one_second_and_keys_are_separate(clocked, tenant):
    set_limit(clocked, "requests_per_second", 3, tenant)
    set_limit(clocked, "requests_per_second.stripe-api", 1, tenant, burst=1)
    at(clocked, 0)
    assert [check(clocked, tenant, "webhooks")[0] for _ in range(4)] == [True, True, True, False]
    assert [check(clocked, tenant, "other")[0] for _ in range(4)] == [True, True, True, False]
    assert [check(clocked, tenant, "stripe-api")[0] for _ in range(2)] == [True, False]


def test_no_limit_always_allows(clocked, tenant):
    assert check(clocked, tenant) == (True, None, None)


def test_pause_and_resume(clocked, tenant):
    set_limit(clocked, "requests_per_second", 5, tenant, burst=5)
    at(clocked, 0)
    assert check(clocked, tenant, "upstream")[0]
    clocked.execute("SELECT meshhook_limits.pause_rate_limit(%s, 'upstream', to_timestamp(%s))", (tenant, T0 + 30))
    assert check(clocked, tenant, "upstream") == (False, 0, 30.0)
    assert check(clocked, tenant, "other")[0]  # other keys are not paused
    at(clocked, 29.9)
    assert check(clocked, tenant, "upstream")[0] is False
    at(clocked, 30)
    assert check(clocked, tenant, "upstream")[0]
    # A pause in the past lifts an active one.
    clocked.execute("SELECT meshhook_limits.pause_rate_limit(%s, 'upstream', to_timestamp(%s))", (tenant, T0 + 100))
    clocked.execute("SELECT meshhook_limits.pause_rate_limit(%s, 'upstream', to_timestamp(%s))", (tenant, T0))
    assert check(clocked, tenant, "upstream")[0]


def test_state_is_not_transactional(cluster, clocked, tenant):
    set_limit(clocked, "requests_per_second", 1, tenant, burst=1)
    at(clocked, 0)
    with clocked.transaction(force_rollback=True):
        assert check(clocked, tenant)[0]
    assert check(clocked, tenant)[0] is False  # the token stays spent, like nextval()


def test_more_keys_than_the_table_holds(clocked, admin):
    """40,000 keys (the table holds 32,768): every first request is allowed,
    and a key used again right away is still limited (its set keeps it)."""
    t = str(uuid.uuid4())
    set_limit(admin, "requests_per_second", 1, t, burst=1)
    at(clocked, 0)
    n = 40_000
    allowed = clocked.execute(
        "SELECT count(*) FILTER (WHERE r.allowed) FROM generate_series(1, %s) g, "
        "LATERAL meshhook_limits.check_rate_limit(%s, 'k' || g) r", (n, t)).fetchone()[0]
    assert allowed == n
    assert check(clocked, t, "k39999")[0] is False
    stats = clocked.execute("SELECT capacity, evictions FROM meshhook_limits.rate_limit_stats()").fetchone()
    assert stats[0] == 32768 and stats[1] > 0


def test_concurrent_callers_never_exceed_rate_times_time_plus_burst(cluster, admin, tenant):
    rate, burst, seconds = 50, 10, 3.0
    set_limit(admin, "requests_per_second", rate, tenant, burst=burst)
    allowed, errors = [0], []
    lock = threading.Lock()
    start = time.monotonic()

    def client():
        try:
            with cluster.connect() as c:
                n = 0
                while time.monotonic() - start < seconds:
                    if c.execute("SELECT allowed FROM meshhook_limits.check_rate_limit(%s, 'hot')",
                                 (tenant,)).fetchone()[0]:
                        n += 1
                with lock:
                    allowed[0] += n
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - start
    assert not errors, errors[:3]
    assert allowed[0] <= rate * elapsed + burst, (allowed[0], elapsed)
    assert allowed[0] >= rate * seconds * 0.8, allowed[0]  # and the rate is actually delivered


@pytest.mark.parametrize("args,msg", [
    ("NULL, 'k', 1", "tenant_id must not be NULL"),
    ("%(t)s, NULL, 1", "key must not be NULL"),
    ("%(t)s, '', 1", "key must be 1 to 64 bytes"),
    ("%(t)s, repeat('k', 65), 1", "key must be 1 to 64 bytes"),
    ("%(t)s, 'k', -1", "cost must be >= 0"),
])
def test_bad_input(admin, tenant, args, msg):
    import psycopg
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=msg):
        admin.execute(f"SELECT * FROM meshhook_limits.check_rate_limit({args})", {"t": tenant})


def test_cost_over_burst_and_bad_pause(admin, tenant):
    import psycopg
    set_limit(admin, "requests_per_second", 1, tenant, burst=2)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="exceeds the burst"):
        admin.execute("SELECT * FROM meshhook_limits.check_rate_limit(%s, 'k', 3)", (tenant,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="until must not be NULL"):
        admin.execute("SELECT meshhook_limits.pause_rate_limit(%s, 'k', NULL)", (tenant,))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="at most 7 days"):
        admin.execute("SELECT meshhook_limits.pause_rate_limit(%s, 'k', now() + interval '8 days')", (tenant,))


def test_tenant_cannot_spend_or_pause_another_tenants_rate(cluster, tenant):
    import psycopg
    from conftest import rpc
    other = str(uuid.uuid4())
    with cluster.connect(user="authenticator") as c:
        claims = {"role": "authenticated", "app_metadata": {"tenant_id": tenant}}
        assert rpc(c, claims, "SELECT allowed FROM meshhook_limits.check_rate_limit(%s)", (tenant,))[0][0]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            rpc(c, claims, "SELECT * FROM meshhook_limits.check_rate_limit(%s)", (other,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            rpc(c, claims, "SELECT meshhook_limits.pause_rate_limit(%s, 'k', now())", (other,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            rpc(c, claims, "SET meshhook_limits.test_clock = 1")
