"""Bad input: every refusal raises the documented SQLSTATE with a message (or
hint) that says what is allowed, changes nothing, and never takes a backend
down. All tests share one connection so the last test can prove it survived."""
import uuid
from decimal import Decimal

import psycopg
import pytest

from conftest import acquire, set_limit, sqlstate

S = "meshhook_limits"


START = {}


@pytest.fixture(scope="module")
def conn(cluster):
    """One superuser connection for every bad input of this module."""
    c = cluster.connect()
    log = cluster.base / "server.log"
    START.update(
        pid=c.info.backend_pid,
        postmaster=c.execute("SELECT pg_postmaster_start_time()").fetchone()[0],
        log_offset=log.stat().st_size if log.exists() else 0,
    )
    yield c
    c.close()


@pytest.fixture
def t(tenant):
    return tenant


def refused(conn, code, sql, params=None):
    """Run sql, expect SQLSTATE code, return 'message hint' for inspection."""
    with pytest.raises(psycopg.Error) as e:
        conn.execute(sql, params)
    assert sqlstate(e) == code, (sql, e.value)
    d = e.value.diag
    text = f"{d.message_primary} {d.message_detail or ''} {d.message_hint or ''}"
    assert len(text) < 2000, "an error must not echo huge input back"
    return text


def limit_row(conn, resource, tenant=None, project=None):
    return conn.execute(
        f"SELECT limit_value, warn_ratio, window_length, burst, updated_at FROM {S}.limits "
        f"WHERE resource = %s AND plan IS NULL AND tenant_id IS NOT DISTINCT FROM %s "
        f"AND project_id IS NOT DISTINCT FROM %s", (resource, tenant, project)).fetchall()


def slots_of(conn, tenant):
    return conn.execute(f"SELECT slot_id, state, memory_peak_bytes, lease_expires_at FROM {S}.slots() "
                        f"WHERE tenant_id = %s ORDER BY slot_id", (tenant,)).fetchall()


def counters(conn, tenant):
    return conn.execute(f"SELECT resource, project_id, window_start, used, status FROM {S}.usage_counters "
                        f"WHERE tenant_id = %s ORDER BY 1, 2, 3", (tenant,)).fetchall()


@pytest.fixture
def meter(conn, t):
    """A metered resource with a tenant limit and some usage already recorded."""
    name = f"bad_meter_{uuid.uuid4().hex[:10]}"
    set_limit(conn, name, 100, t, window_length="1 day")
    conn.execute(f"SELECT * FROM {S}.record_usage(%s, %s, 5)", (t, name))
    yield name
    conn.execute(f"SELECT {S}.clear_limit(%s, %s)", (name, t))


@pytest.fixture
def slot(conn, t):
    row = acquire(conn, t, run_id="bad-input")
    assert row[0], row
    yield str(row[1])
    conn.execute(f"SELECT {S}.release_execution_slot(%s)", (row[1],))


# --------------------------------------------------------------------------- NULL tenant / slot


@pytest.mark.parametrize("sql", [
    f"SELECT * FROM {S}.acquire_execution_slot(NULL)",
    f"SELECT * FROM {S}.acquire_execution_slot(NULL, gen_random_uuid(), 'r', '10 seconds')",
    f"SELECT * FROM {S}.record_usage(NULL, 'memory_bytes', 1)",
    f"SELECT * FROM {S}.usage(NULL)",
    f"SELECT * FROM {S}.effective_limits(NULL)",
    f"SELECT * FROM {S}.effective_limits(NULL, gen_random_uuid())",
], ids=["acquire", "acquire_with_project", "record_usage", "usage", "effective_limits", "effective_limits_project"])
def test_null_tenant(conn, sql):
    live = conn.execute(f"SELECT live FROM {S}.slot_stats()").fetchone()
    text = refused(conn, "22023", sql)
    assert "tenant_id must not be NULL" in text and "uuid" in text
    assert conn.execute(f"SELECT live FROM {S}.slot_stats()").fetchone() == live


@pytest.mark.parametrize("sql", [
    f"SELECT * FROM {S}.heartbeat_execution_slot(NULL)",
    f"SELECT * FROM {S}.heartbeat_execution_slot(NULL, 10)",
    f"SELECT {S}.release_execution_slot(NULL)",
    f"SELECT {S}.release_execution_slot(NULL, 'failed')",
], ids=["heartbeat", "heartbeat_memory", "release", "release_outcome"])
def test_null_slot_id(conn, sql):
    text = refused(conn, "22023", sql)
    assert "slot_id must not be NULL" in text and "acquire_execution_slot" in text


# --------------------------------------------------------------------------- unknown slots


@pytest.mark.parametrize("slot_id", [
    str(uuid.uuid4()),
    "00000000-0000-0000-0000-000000000000",
    "00000000-0000-4000-8000-000000000001",   # a plausible table index, wrong id
    "ffffffff-ffff-ffff-ffff-ffffffffffff",   # index far past the table
    "12345678-1234-4234-8234-7fffffff0000",
], ids=["random", "nil", "index1", "max", "big_index"])
def test_unknown_slot_id(conn, t, slot, slot_id):
    before = slots_of(conn, t)
    hb = conn.execute(f"SELECT alive, reason, deadline, lease_expires_at "
                      f"FROM {S}.heartbeat_execution_slot(%s)", (slot_id,)).fetchall()
    assert hb == [(False, "not_found", None, None)]
    assert conn.execute(f"SELECT {S}.release_execution_slot(%s)", (slot_id,)).fetchone() == (False,)
    # The real slot is untouched.
    assert slots_of(conn, t) == before and before[0][1] == "live"


# --------------------------------------------------------------------------- set_limit


@pytest.mark.parametrize("value", [Decimal("-1"), Decimal("-0.0001"), Decimal("NaN"), None, Decimal("Infinity")],
                         ids=["negative", "tiny_negative", "nan", "null", "infinity"])
def test_bad_limit_value(conn, t, value):
    set_limit(conn, "concurrent_executions", 3, t)
    before = limit_row(conn, "concurrent_executions", t)
    text = refused(conn, "22023", f"SELECT {S}.set_limit('concurrent_executions', %s::numeric, %s)", (value, t))
    assert "limit_value must be a finite number >= 0" in text
    assert limit_row(conn, "concurrent_executions", t) == before
    # Same for plan limits.
    plan = f"badplan_{uuid.uuid4().hex[:8]}"
    conn.execute(f"SELECT {S}.create_plan(%s)", (plan,))
    try:
        text = refused(conn, "22023", f"SELECT {S}.set_plan_limit(%s, 'concurrent_executions', %s::numeric)",
                       (plan, value))
        assert "limit_value must be a finite number >= 0" in text
        assert conn.execute(f"SELECT count(*) FROM {S}.limits WHERE plan = %s", (plan,)).fetchone() == (0,)
    finally:
        conn.execute(f"SELECT {S}.drop_plan(%s)", (plan,))
        conn.execute(f"SELECT {S}.clear_limit('concurrent_executions', %s)", (t,))


def test_fractional_concurrent_executions(conn, t):
    set_limit(conn, "concurrent_executions", 3, t)
    before = limit_row(conn, "concurrent_executions", t)
    text = refused(conn, "22023", f"SELECT {S}.set_limit('concurrent_executions', 2.5, %s)", (t,))
    assert "whole number" in text
    assert limit_row(conn, "concurrent_executions", t) == before
    conn.execute(f"SELECT {S}.clear_limit('concurrent_executions', %s)", (t,))


@pytest.mark.parametrize("ratio", [Decimal("0"), Decimal("1.5"), None, Decimal("-0.5"), Decimal("NaN")],
                         ids=["zero", "above_one", "null", "negative", "nan"])
def test_bad_warn_ratio(conn, t, ratio):
    set_limit(conn, "memory_bytes", 1000, t, warn_ratio=Decimal("0.5"))
    before = limit_row(conn, "memory_bytes", t)
    text = refused(conn, "22023", f"SELECT {S}.set_limit('memory_bytes', 2000, %s, warn_ratio => %s::numeric)",
                   (t, ratio))
    assert "warn_ratio must be in (0, 1]" in text
    assert limit_row(conn, "memory_bytes", t) == before
    conn.execute(f"SELECT {S}.clear_limit('memory_bytes', %s)", (t,))


@pytest.mark.parametrize("value", [Decimal("1e30"), Decimal("9223372036854775808")], ids=["1e30", "2^63"])
def test_huge_concurrent_executions_limit(conn, t, value):
    """A limit too large for the slot path must be refused by set_limit (22023)
    or honoured by acquire; it must never make acquire fail for the tenant."""
    try:
        conn.execute(f"SELECT {S}.set_limit('concurrent_executions', %s::numeric, %s)", (value, t))
    except psycopg.Error as e:
        assert e.sqlstate == "22023", e
        assert limit_row(conn, "concurrent_executions", t) == []
        return
    try:
        row = acquire(conn, t)
        assert row[0], row
        conn.execute(f"SELECT {S}.release_execution_slot(%s)", (row[1],))
    finally:
        conn.execute(f"SELECT {S}.clear_limit('concurrent_executions', %s)", (t,))


@pytest.mark.parametrize("resource,burst,expect", [
    ("concurrent_executions", 5, "burst applies to requests_per_second only"),
    ("requests_per_second", -1, "burst must be a number between 0 and 1e18"),
    ("requests_per_second", Decimal("NaN"), "burst must be a number between 0 and 1e18"),
], ids=["not_rps", "negative", "nan"])
def test_bad_burst(conn, t, resource, burst, expect):
    text = refused(conn, "22023", f"SELECT {S}.set_limit(%s, 10, %s, burst => %s::numeric)", (resource, t, burst))
    assert expect in text
    assert limit_row(conn, resource, t) == []


def test_unknown_resource_without_window(conn, t):
    name = f"widgets_{uuid.uuid4().hex[:8]}"
    text = refused(conn, "22023", f"SELECT {S}.set_limit(%s, 10, %s)", (name, t))
    assert "needs a window_length" in text
    assert "concurrent_executions" in text and "window_length =>" in text  # lists built-ins, shows how
    assert limit_row(conn, name, t) == []


@pytest.mark.parametrize("resource", ["concurrent_executions", "execution_seconds", "memory_bytes",
                                      "storage_bytes", "requests_per_second"])
def test_window_length_on_builtin(conn, t, resource):
    text = refused(conn, "22023", f"SELECT {S}.set_limit(%s, 10, %s, window_length => '1 day')", (resource, t))
    assert f"window_length does not apply to {resource}" in text and "metered resources only" in text
    assert limit_row(conn, resource, t) == []


@pytest.mark.parametrize("window", ["0 seconds", "-1 day", "400 days"])
def test_bad_window_length(conn, t, window):
    name = f"meter_{uuid.uuid4().hex[:8]}"
    text = refused(conn, "22023", f"SELECT {S}.set_limit(%s, 10, %s, window_length => %s::interval)",
                   (name, t, window))
    assert "window_length must be between 1 microsecond and 366 days" in text
    assert limit_row(conn, name, t) == []


def test_project_without_tenant(conn):
    project = str(uuid.uuid4())
    text = refused(conn, "22023", f"SELECT {S}.set_limit('concurrent_executions', 2, NULL, %s)", (project,))
    assert "needs its tenant_id" in text and "pass tenant_id together with project_id" in text
    assert conn.execute(f"SELECT count(*) FROM {S}.limits WHERE project_id = %s", (project,)).fetchone() == (0,)
    text = refused(conn, "22023", f"SELECT {S}.clear_limit('concurrent_executions', NULL, %s)", (project,))
    assert "needs its tenant_id" in text


# --------------------------------------------------------------------------- resource names

BAD_NAMES = {
    "huge": "a" * 100_000,
    "huge_quotes": "'; DROP TABLE meshhook_limits.limits; --" * 2500,
    "injection": "x'); DROP TABLE meshhook_limits.limits; --",
    "dquote": 'x"; DROP TABLE meshhook_limits.limits; --',
    "semicolon": "a;b",
    "space": "bad name",
    "uppercase": "Widgets",
    "leading_digit": "1widgets",
    "empty": "",
    "too_long_64": "a" * 64,
    "unicode": "r\u00e9sum\u00e9",
    "newline": "a\nb",
    "backslash": "a\\b",
}
ALLOWED = "1-63 characters of a-z, 0-9, _, . and -"


def _tables_intact(conn):
    assert conn.execute("SELECT to_regclass('meshhook_limits.limits') IS NOT NULL, "
                        "to_regclass('meshhook_limits.usage_counters') IS NOT NULL").fetchone() == (True, True)


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_resource_name_set_limit(conn, t, name):
    set_limit(conn, "concurrent_executions", 4, t)
    n = conn.execute(f"SELECT count(*) FROM {S}.limits").fetchone()
    text = refused(conn, "22023", f"SELECT {S}.set_limit(%s, 10, %s, window_length => '1 day')", (name, t))
    assert "invalid resource name" in text and ALLOWED in text
    _tables_intact(conn)
    assert conn.execute(f"SELECT count(*) FROM {S}.limits").fetchone() == n
    assert limit_row(conn, "concurrent_executions", t)[0][0] == 4
    conn.execute(f"SELECT {S}.clear_limit('concurrent_executions', %s)", (t,))


@pytest.mark.parametrize("name", BAD_NAMES.values(), ids=BAD_NAMES.keys())
def test_bad_resource_name_record_usage(conn, t, meter, name):
    before = counters(conn, t)
    text = refused(conn, "22023", f"SELECT * FROM {S}.record_usage(%s, %s, 1)", (t, name))
    assert "invalid resource name" in text
    _tables_intact(conn)
    assert counters(conn, t) == before


def test_record_usage_bad_name_message_says_what_is_allowed(conn, t, meter):
    """set_limit's hint names the allowed characters; record_usage must too."""
    text = refused(conn, "22023", f"SELECT * FROM {S}.record_usage(%s, %s, 1)", (t, "bad name"))
    assert ALLOWED in text, f"record_usage does not say which names are allowed: {text!r}"


@pytest.mark.parametrize("name", ["a" * 100_000, "x'); DROP TABLE meshhook_limits.limits; --", "bad name"],
                         ids=["huge", "injection", "space"])
def test_bad_resource_name_set_plan_limit(conn, name):
    plan = f"badplan_{uuid.uuid4().hex[:8]}"
    conn.execute(f"SELECT {S}.create_plan(%s)", (plan,))
    try:
        text = refused(conn, "22023", f"SELECT {S}.set_plan_limit(%s, %s, 10, window_length => '1 day')",
                       (plan, name))
        assert "invalid resource name" in text and ALLOWED in text
        _tables_intact(conn)
    finally:
        conn.execute(f"SELECT {S}.drop_plan(%s)", (plan,))


@pytest.mark.parametrize("name", ["a" * 100_000, "x'); DROP TABLE meshhook_limits.plans; --", "bad plan", ""],
                         ids=["huge", "injection", "space", "empty"])
def test_bad_plan_name(conn, name):
    n = conn.execute(f"SELECT count(*) FROM {S}.plans").fetchone()
    text = refused(conn, "22023", f"SELECT {S}.create_plan(%s)", (name,))
    assert "invalid plan name" in text and "1-63 characters" in text
    assert conn.execute(f"SELECT count(*) FROM {S}.plans").fetchone() == n
    assert conn.execute("SELECT to_regclass('meshhook_limits.plans') IS NOT NULL").fetchone() == (True,)


# --------------------------------------------------------------------------- record_usage


@pytest.mark.parametrize("amount", [Decimal("-1"), Decimal("NaN"), None, Decimal("Infinity")],
                         ids=["negative", "nan", "null", "infinity"])
def test_bad_amount(conn, t, meter, amount):
    before = counters(conn, t)
    text = refused(conn, "22023", f"SELECT * FROM {S}.record_usage(%s, %s, %s::numeric)", (t, meter, amount))
    assert "amount must be 0 or a number between 1e-9 and 1e18" in text
    assert counters(conn, t) == before


def test_unknown_metered_resource(conn, t, meter):
    before = counters(conn, t)
    name = f"never_defined_{uuid.uuid4().hex[:8]}"
    text = refused(conn, "22023", f"SELECT * FROM {S}.record_usage(%s, %s, 1)", (t, name))
    assert f'unknown resource "{name}"' in text and "window_length" in text and "set_limit" in text
    assert counters(conn, t) == before


@pytest.mark.parametrize("resource", ["concurrent_executions", "execution_seconds", "requests_per_second"])
def test_record_usage_on_non_metered_builtin(conn, t, resource):
    before = counters(conn, t)
    text = refused(conn, "22023", f"SELECT * FROM {S}.record_usage(%s, %s, 1)", (t, resource))
    assert "is not metered with record_usage" in text
    assert counters(conn, t) == before


# --------------------------------------------------------------------------- acquire


@pytest.mark.parametrize("run_id", ["r" * 97, "r" * 100_000, "\u20ac" * 33],  # 33 x 3 bytes = 99 bytes
                         ids=["97_bytes", "100k", "multibyte_99_bytes"])
def test_huge_run_id(conn, t, run_id):
    text = refused(conn, "22023", f"SELECT * FROM {S}.acquire_execution_slot(%s, NULL, %s)", (t, run_id))
    assert "at most 96" in text
    assert slots_of(conn, t) == []


def test_run_id_of_96_bytes_is_accepted(conn, t):
    row = acquire(conn, t, run_id="\u20ac" * 32)  # exactly 96 bytes
    assert row[0], row
    assert conn.execute(f"SELECT run_id FROM {S}.slots() WHERE slot_id = %s", (row[1],)).fetchone() == ("\u20ac" * 32,)
    assert conn.execute(f"SELECT {S}.release_execution_slot(%s)", (row[1],)).fetchone() == (True,)


@pytest.mark.parametrize("lease", ["0 seconds", "-1 second", "-10 days", "999 milliseconds",
                                   "1 day 1 second", "7 days 1 second", "8 days", "1 month", "100 years"])
def test_bad_lease(conn, t, lease):
    text = refused(conn, "22023", f"SELECT * FROM {S}.acquire_execution_slot(%s, NULL, NULL, %s::interval)",
                   (t, lease))
    assert "lease must be between 1 second and meshhook_limits.max_lease (86400 s)" in text
    assert slots_of(conn, t) == []


@pytest.mark.parametrize("lease", ["1 second", "1 day"])
def test_lease_bounds_are_accepted(conn, t, lease):
    row = acquire(conn, t, lease=lease)
    assert row[0], row
    assert conn.execute(f"SELECT {S}.release_execution_slot(%s)", (row[1],)).fetchone() == (True,)


# --------------------------------------------------------------------------- release / heartbeat


@pytest.mark.parametrize("outcome", ["done", "COMPLETED", "", "completed; DROP TABLE x", "x" * 100_000],
                         ids=["done", "upper", "empty", "injection", "huge"])
def test_unknown_outcome(conn, t, slot, outcome):
    before = slots_of(conn, t)
    text = refused(conn, "22023", f"SELECT {S}.release_execution_slot(%s, %s)", (slot, outcome))
    assert "unknown outcome" in text
    assert "completed, failed, cancelled, timed_out, crashed" in text
    assert slots_of(conn, t) == before
    assert before[0][1] == "live"


def test_null_outcome_means_completed(conn, t):
    row = acquire(conn, t)
    assert conn.execute(f"SELECT {S}.release_execution_slot(%s, NULL)", (row[1],)).fetchone() == (True,)
    assert slots_of(conn, t) == []


@pytest.mark.parametrize("memory", [-1, -(2 ** 63)], ids=["minus_one", "min_bigint"])
def test_negative_memory_heartbeat(conn, t, slot, memory):
    conn.execute(f"SELECT * FROM {S}.heartbeat_execution_slot(%s, 1000)", (slot,))
    before = slots_of(conn, t)
    text = refused(conn, "22023", f"SELECT * FROM {S}.heartbeat_execution_slot(%s, %s::bigint)", (slot, memory))
    assert "memory_bytes must be >= 0" in text
    after = slots_of(conn, t)
    assert after == before            # lease not extended, peak unchanged
    assert after[0][1:3] == ("live", 1000)


def test_negative_memory_peak_release(conn, t, slot):
    before = slots_of(conn, t)
    text = refused(conn, "22023", f"SELECT {S}.release_execution_slot(%s, 'completed', -5)", (slot,))
    assert "memory_peak_bytes must be >= 0" in text
    assert slots_of(conn, t) == before


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize("plan", ["no_such_plan_xyz", "'; DROP TABLE meshhook_limits.plans; --", "p" * 100_000],
                         ids=["unknown", "injection", "huge"])
def test_unknown_plan(conn, t, plan):
    known = f"badplan_{uuid.uuid4().hex[:8]}"
    conn.execute(f"SELECT {S}.create_plan(%s)", (known,))
    conn.execute(f"SELECT {S}.assign_plan(%s, %s)", (t, known))
    try:
        text = refused(conn, "22023", f"SELECT {S}.assign_plan(%s, %s)", (t, plan))
        assert "unknown plan" in text and "create_plan" in text
        assert conn.execute(f"SELECT plan FROM {S}.tenant_plans WHERE tenant_id = %s", (t,)).fetchall() == [(known,)]
        text = refused(conn, "22023", f"SELECT {S}.set_plan_limit(%s, 'concurrent_executions', 1)", (plan,))
        assert "unknown plan" in text
        assert conn.execute("SELECT to_regclass('meshhook_limits.plans') IS NOT NULL").fetchone() == (True,)
    finally:
        conn.execute(f"SELECT {S}.assign_plan(%s, NULL)", (t,))
        conn.execute(f"SELECT {S}.drop_plan(%s)", (known,))


def test_assign_plan_null_tenant(conn):
    text = refused(conn, "22023", f"SELECT {S}.assign_plan(NULL, 'x')")
    assert "tenant_id must not be NULL" in text


# --------------------------------------------------------------------------- survival (keep last)


def test_backend_survived_all_bad_inputs(conn, cluster):
    """Same connection, same backend, same postmaster, and no crash in the log."""
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert conn.info.backend_pid == START["pid"]
    assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == START["pid"]
    assert conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0] == START["postmaster"]
    log = cluster.base / "server.log"
    if log.exists():
        with open(log, "rb") as f:
            f.seek(START["log_offset"])
            tail = f.read().decode(errors="replace")
        for needle in ("terminated by signal", "PANIC", "server process (PID"):
            assert needle not in tail, tail[-2000:]
    # The extension still works on this connection.
    t = str(uuid.uuid4())
    row = acquire(conn, t)
    assert row[0]
    assert conn.execute(f"SELECT {S}.release_execution_slot(%s)", (row[1],)).fetchone() == (True,)
