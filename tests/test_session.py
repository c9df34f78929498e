"""Session limits (sql/session.sql): apply_session_limits(t)
turns a tenant's execution_seconds, work_mem_bytes and temp_file_bytes limits
into transaction-local statement_timeout, work_mem and temp_file_limit, so
PostgreSQL itself holds the tenant's SQL to them; nothing outlives the
transaction."""
import json
import time
import uuid
from decimal import Decimal

import psycopg
import pytest

from conftest import rpc, set_limit, sqlstate

S = "meshhook_limits"
SESSION_RESOURCES = ("execution_seconds", "work_mem_bytes", "temp_file_bytes")
SETTINGS = ("statement_timeout", "work_mem", "temp_file_limit")
SPILL = "SELECT count(*) FROM (SELECT g FROM generate_series(1, 2000000) g ORDER BY g DESC) s"


def claims_for(tenant):
    return {"role": "authenticated", "sub": str(uuid.uuid4()), "app_metadata": {"tenant_id": tenant}}


def show(conn, name):
    return conn.execute(f"SHOW {name}").fetchone()[0]


def shows(conn):
    return {n: show(conn, n) for n in SETTINGS}


def apply(conn, tenant):
    return conn.execute(f"SELECT setting, value FROM {S}.apply_session_limits(%s)", (tenant,)).fetchall()


@pytest.fixture
def limits(admin, tenant):
    """Set limits for the tenant; cleared afterwards."""
    def setter(**kw):
        for r, v in kw.items():
            set_limit(admin, r, v, tenant)
    yield setter
    for r in SESSION_RESOURCES:
        admin.execute(f"SELECT {S}.clear_limit(%s, %s)", (r, tenant))


def test_statement_timeout_cancels_and_does_not_outlive_the_transaction(cluster, tenant, limits):
    limits(execution_seconds=1)
    with cluster.connect() as c:
        c.execute("SET statement_timeout = '5min'")
        assert show(c, "statement_timeout") == "5min"
        start = None
        with pytest.raises(psycopg.Error) as e:
            with c.transaction():
                rows = apply(c, tenant)
                assert rows == [("statement_timeout", "1000ms")]
                assert show(c, "statement_timeout") == "1s"
                start = time.monotonic()
                c.execute("SELECT pg_sleep(60)")
        elapsed = time.monotonic() - start
        assert sqlstate(e) == "57014", e.value          # query_canceled
        assert isinstance(e.value, psycopg.errors.QueryCanceled)
        # Cancelled by the 1 s limit: not before it, and long before the
        # 60 s sleep (or the session's 5 min) would have ended it; the
        # upper bound leaves half a minute for a busy machine.
        assert 0.8 <= elapsed < 30, elapsed
        # The transaction is over: the previous value is back and a longer
        # statement than the limit runs fine.
        assert show(c, "statement_timeout") == "5min"
        c.execute("SELECT pg_sleep(1.2)")
        # Committed transactions give it back too.
        with c.transaction():
            assert apply(c, tenant) == [("statement_timeout", "1000ms")]
            c.execute("SELECT pg_sleep(0.2)")
        assert show(c, "statement_timeout") == "5min"


def test_fractional_and_huge_execution_seconds(admin, tenant, limits):
    limits(execution_seconds=Decimal("0.25"))
    with admin.transaction():
        assert apply(admin, tenant) == [("statement_timeout", "250ms")]
        assert show(admin, "statement_timeout") == "250ms"
    limits(execution_seconds=10 ** 9)     # beyond statement_timeout's range: capped, not an error
    with admin.transaction():
        rows = apply(admin, tenant)
        assert rows == [("statement_timeout", "2147483647ms")]
        assert show(admin, "statement_timeout") != "0"
    assert show(admin, "statement_timeout") == "0"


def test_work_mem_and_temp_file_limit_are_transaction_local(admin, tenant, limits):
    limits(work_mem_bytes=2 * 1024 * 1024, temp_file_bytes=10 * 1024 * 1024)
    before = shows(admin)
    for end in ("commit", "rollback"):
        admin.execute("BEGIN")
        rows = apply(admin, tenant)
        assert rows == [("temp_file_limit", "10240kB"), ("work_mem", "2048kB")]
        assert show(admin, "work_mem") == "2MB"
        assert show(admin, "temp_file_limit") == "10MB"
        assert show(admin, "statement_timeout") == before["statement_timeout"]   # no execution_seconds: untouched
        admin.execute(end.upper())
        assert shows(admin) == before, end
    # Outside an explicit transaction, the settings end with the statement.
    apply(admin, tenant)
    assert shows(admin) == before
    # A tiny work_mem_bytes is raised to PostgreSQL's minimum of 64kB.
    limits(work_mem_bytes=1000)
    with admin.transaction():
        assert ("work_mem", "64kB") in apply(admin, tenant)
        assert show(admin, "work_mem") == "64kB"
    assert shows(admin) == before


def test_temp_file_limit_stops_a_spilling_sort(admin, tenant, limits):
    limits(work_mem_bytes=64 * 1024, temp_file_bytes=1024 * 1024)
    with pytest.raises(psycopg.Error) as e:
        with admin.transaction():
            assert apply(admin, tenant) == [("temp_file_limit", "1024kB"), ("work_mem", "64kB")]
            assert show(admin, "work_mem") == "64kB"
            admin.execute(SPILL)
    assert sqlstate(e) == "53400", e.value           # configuration_limit_exceeded
    assert "temp_file_limit" in str(e.value)
    # Without the limits the same query runs.
    assert admin.execute(SPILL).fetchone()[0] == 2000000


def test_tenant_via_rpc(cluster, tenant, limits):
    limits(execution_seconds=2, work_mem_bytes=128 * 1024, temp_file_bytes=1024 * 1024)
    other = str(uuid.uuid4())
    with cluster.connect(user="authenticator") as auth:
        before = shows(auth)
        rows = rpc(auth, claims_for(tenant), f"SELECT setting, value FROM {S}.apply_session_limits(%s)", (tenant,))
        assert rows == [("statement_timeout", "2000ms"), ("temp_file_limit", "1024kB"), ("work_mem", "128kB")]
        assert shows(auth) == before
        # Within the tenant's own request the settings hold, including the
        # superuser-only temp_file_limit, and the spill is stopped.
        with pytest.raises(psycopg.Error) as e:
            with auth.transaction():
                auth.execute("SET LOCAL ROLE authenticated")
                auth.execute("SELECT set_config('request.jwt.claims', %s, true)",
                             (json.dumps(claims_for(tenant)),))
                apply(auth, tenant)
                assert show(auth, "statement_timeout") == "2s"
                assert show(auth, "work_mem") == "128kB"
                assert show(auth, "temp_file_limit") == "1MB"
                # A tenant cannot lift the superuser-only temp_file_limit.
                with pytest.raises(psycopg.Error) as e2:
                    with auth.transaction():
                        auth.execute("SET LOCAL temp_file_limit = -1")
                assert sqlstate(e2) == "42501"
                auth.execute(SPILL)
        assert sqlstate(e) == "53400"
        assert shows(auth) == before
        # Another tenant's limits: refused.
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, claims_for(tenant), f"SELECT * FROM {S}.apply_session_limits(%s)", (other,))
        assert sqlstate(e) == "42501"
        # No tenant in the JWT (anon): refused.
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, {"role": "anon"}, f"SELECT * FROM {S}.apply_session_limits(%s)", (tenant,), role="anon")
        assert sqlstate(e) == "42501"
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, claims_for(tenant), f"SELECT * FROM {S}.apply_session_limits(NULL)")
        assert sqlstate(e) == "22023"
        assert shows(auth) == before


def test_null_tenant_refused(admin):
    with pytest.raises(psycopg.Error) as e:
        admin.execute(f"SELECT * FROM {S}.apply_session_limits(NULL)")
    assert sqlstate(e) == "22023"


def test_no_limits_no_rows_no_changes(admin, tenant):
    present = admin.execute(f"SELECT resource FROM {S}.effective_limits(%s) WHERE resource = ANY(%s)",
                            (tenant, list(SESSION_RESOURCES))).fetchall()
    assert present == [], "a global or plan limit on a session resource is set by another test"
    admin.execute("SET statement_timeout = '42s'")
    before = shows(admin)
    with admin.transaction():
        assert apply(admin, tenant) == []
        assert shows(admin) == before
    assert shows(admin) == before
    admin.execute("RESET statement_timeout")
    # Limits of other kinds do not turn into settings.
    set_limit(admin, "concurrent_executions", 3, tenant)
    set_limit(admin, "storage_bytes", 1000, tenant)
    try:
        with admin.transaction():
            assert apply(admin, tenant) == []
    finally:
        admin.execute(f"SELECT {S}.clear_limit('concurrent_executions', %s)", (tenant,))
        admin.execute(f"SELECT {S}.clear_limit('storage_bytes', %s)", (tenant,))


def test_a_session_running_its_own_sql_can_loosen_the_limits(cluster, tenant, limits):
    """Documented (README, Session limits): for a caller that runs its own
    SQL the limits are a default, not a wall. RESET ALL resets even
    temp_file_limit; SET LOCAL loosens statement_timeout and work_mem."""
    limits(execution_seconds=2, work_mem_bytes=128 * 1024, temp_file_bytes=1024 * 1024)
    with cluster.connect(user="authenticator") as auth:
        with auth.transaction():
            auth.execute("SET LOCAL ROLE authenticated")
            auth.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims_for(tenant)),))
            apply(auth, tenant)
            auth.execute("SET LOCAL statement_timeout = '1h'")
            auth.execute("SET LOCAL work_mem = '64MB'")
            assert (show(auth, "statement_timeout"), show(auth, "work_mem")) == ("1h", "64MB")
            auth.execute("RESET ALL")
            assert show(auth, "temp_file_limit") == "-1"


def test_temp_file_limit_is_only_ever_lowered(admin, tenant, limits):
    limits(temp_file_bytes=10 * 1024 * 1024 * 1024)
    with admin.transaction():
        admin.execute("SET LOCAL temp_file_limit = '1MB'")
        apply(admin, tenant)
        assert show(admin, "temp_file_limit") == "1MB"
