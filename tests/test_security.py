"""Identity and security (DESIGN.md): Supabase RPC emulated exactly as
PostgREST does it — the `authenticator` login role, then per request a
transaction with `SET LOCAL ROLE authenticated|anon|service_role` and the JWT
claims in `request.jwt.claims` — plus the plain SQL worker path and the
catalogue facts (RLS, grants, pinned search_path) the guarantees rest on.
What a tenant sees and may do over RPC, as plain SQL, is in
tests/regress/sql/rls.sql; here are the rest: other tenants' slots, the claim path, anon,
admin roles, the worker's session setting and the catalogue."""
import json
import uuid

import psycopg
import pytest

from conftest import acquire, rpc, set_limit, sqlstate

S = "meshhook_limits"
TABLES = ["limits", "usage_counters", "events", "tenant_plans", "plans"]


def claims_for(tenant):
    """Claims of a Supabase user JWT carrying the tenant in app_metadata."""
    return {"role": "authenticated", "sub": str(uuid.uuid4()), "app_metadata": {"tenant_id": tenant}}


def rpc_raw(conn, raw_claims: str, query: str, params=None, role: str = "authenticated"):
    """Like conftest.rpc, but with the claims text given verbatim (for bad JSON)."""
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (raw_claims,))
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def uniq(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def auth(cluster):
    """The PostgREST connection: logs in as `authenticator`."""
    with cluster.connect(user="authenticator") as c:
        yield c


@pytest.fixture
def world(cluster, admin, tenant):
    """Two tenants, each with a plan, tenant-level limits, usage, events and a
    live slot; plus a global limit row. Cleaned up afterwards."""
    a, b = tenant, str(uuid.uuid4())
    meter = uniq("sec_meter")          # metered, unique to this test: globals can't leak into others
    glob = uniq("sec_global")
    plan_a, plan_b = uniq("secplanA"), uniq("secplanB")
    admin.execute(f"SELECT {S}.create_plan(%s)", (plan_a,))
    admin.execute(f"SELECT {S}.create_plan(%s)", (plan_b,))
    admin.execute(f"SELECT {S}.set_plan_limit(%s, %s, 100, window_length => '1 day')", (plan_a, meter))
    admin.execute(f"SELECT {S}.set_plan_limit(%s, %s, 200, window_length => '1 day')", (plan_b, meter))
    admin.execute(f"SELECT {S}.assign_plan(%s, %s)", (a, plan_a))
    admin.execute(f"SELECT {S}.assign_plan(%s, %s)", (b, plan_b))
    set_limit(admin, glob, 1000, window_length="1 day")
    for t in (a, b):
        set_limit(admin, "concurrent_executions", 5, t)
        set_limit(admin, meter, 10, t, window_length="1 day")
        # 9 of 10 crosses warn_ratio 0.8: a usage row and a limit.warning event.
        admin.execute(f"SELECT * FROM {S}.record_usage(%s, %s, 9)", (t, meter))
    slot_a = acquire(admin, a, run_id="run-a")
    slot_b = acquire(admin, b, run_id="run-b")
    assert slot_a[0] and slot_b[0]
    w = dict(a=a, b=b, meter=meter, glob=glob, plan_a=plan_a, plan_b=plan_b,
             slot_a=str(slot_a[1]), slot_b=str(slot_b[1]))
    yield w
    for sid in (w["slot_a"], w["slot_b"]):
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (sid,))
    for t in (a, b):
        admin.execute(f"SELECT {S}.clear_limit('concurrent_executions', %s)", (t,))
        admin.execute(f"SELECT {S}.clear_limit(%s, %s)", (meter, t))
        admin.execute(f"SELECT {S}.assign_plan(%s, NULL)", (t,))
    admin.execute(f"SELECT {S}.clear_limit(%s)", (glob,))
    admin.execute(f"SELECT {S}.drop_plan(%s)", (plan_a,))
    admin.execute(f"SELECT {S}.drop_plan(%s)", (plan_b,))


def live_slot(admin, slot_id):
    rows = admin.execute(f"SELECT state FROM {S}.slots() WHERE slot_id = %s", (slot_id,)).fetchall()
    return rows == [("live",)]


# --------------------------------------------------------------------------- slots of others


def test_tenant_cannot_heartbeat_or_release_another_tenants_slot(auth, admin, world):
    a, b = world["a"], world["b"]
    # B takes a slot over RPC, as it would in production.
    row = rpc(auth, claims_for(b), f"SELECT * FROM {S}.acquire_execution_slot(%s, run_id => 'b-rpc')", (b,))[0]
    assert row[0], row
    victim = str(row[1])
    try:
        # B's limits are now cached in this backend (the fast path of
        # acquire): A must still be refused, on every path.
        for call, params in [
            (f"SELECT * FROM {S}.acquire_execution_slot(%s)", (b,)),
            (f"SELECT * FROM {S}.acquire_execution_slot(%s, run_id => 'x')", (b,)),
            (f"SELECT * FROM {S}.heartbeat_execution_slot(%s)", (victim,)),
            (f"SELECT * FROM {S}.heartbeat_execution_slot(%s, 1)", (victim,)),
            (f"SELECT {S}.release_execution_slot(%s)", (victim,)),
            (f"SELECT {S}.release_execution_slot(%s, 'failed', 1)", (victim,)),
        ]:
            with pytest.raises(psycopg.Error) as e:
                rpc(auth, claims_for(a), call, params)
            assert sqlstate(e) == "42501", (call, e.value)
            assert live_slot(admin, victim), call
        # anon can't either.
        for call in (f"SELECT * FROM {S}.heartbeat_execution_slot(%s)", f"SELECT {S}.release_execution_slot(%s)"):
            with pytest.raises(psycopg.Error) as e:
                rpc(auth, {"role": "anon"}, call, (victim,), role="anon")
            assert sqlstate(e) == "42501", (call, e.value)
        # Still live, and its owner can still use it.
        assert live_slot(admin, victim)
        hb = rpc(auth, claims_for(b), f"SELECT alive, reason FROM {S}.heartbeat_execution_slot(%s)", (victim,))
        assert hb == [(True, "alive")]
    finally:
        assert rpc(auth, claims_for(b), f"SELECT {S}.release_execution_slot(%s)", (victim,)) == [(True,)]
    assert admin.execute(f"SELECT count(*) FROM {S}.slots() WHERE slot_id = %s", (victim,)).fetchone()[0] == 0


# --------------------------------------------------------------------------- claim path


def test_tenant_claim_default_path_and_top_level_fallback(auth, tenant):
    other = str(uuid.uuid4())
    cur = f"SELECT {S}.current_tenant()"
    assert rpc(auth, {"app_metadata": {"tenant_id": tenant}}, cur) == [(uuid.UUID(tenant),)]
    assert rpc(auth, {"tenant_id": tenant}, cur) == [(uuid.UUID(tenant),)]
    # The configured path wins over the top-level fallback.
    assert rpc(auth, {"app_metadata": {"tenant_id": tenant}, "tenant_id": other}, cur) == [(uuid.UUID(tenant),)]
    # user_metadata is writable by the user in Supabase: it must never be a source of identity.
    assert rpc(auth, {"role": "authenticated", "user_metadata": {"tenant_id": tenant}}, cur) == [(None,)]
    # Each path really acts as the tenant (and only it).
    for claims in ({"app_metadata": {"tenant_id": tenant}}, {"tenant_id": tenant}):
        row = rpc(auth, claims, f"SELECT granted, slot_id FROM {S}.acquire_execution_slot(%s)", (tenant,))[0]
        assert row[0]
        assert rpc(auth, claims, f"SELECT {S}.release_execution_slot(%s)", (row[1],)) == [(True,)]
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, claims, f"SELECT * FROM {S}.acquire_execution_slot(%s)", (other,))
        assert sqlstate(e) == "42501"


def test_custom_tenant_claim_path(cluster, tenant):
    """meshhook_limits.tenant_claim (superuser-only) names another path."""
    with cluster.connect() as c:
        c.execute("SET meshhook_limits.tenant_claim = 'org.tenant'")
        cur = f"SELECT {S}.current_tenant()"
        assert rpc(c, {"org": {"tenant": tenant}}, cur) == [(uuid.UUID(tenant),)]
        assert rpc(c, {"app_metadata": {"tenant_id": tenant}}, cur) == [(None,)]
        assert rpc(c, {"tenant_id": tenant}, cur) == [(uuid.UUID(tenant),)]


def test_tenant_claim_setting_is_not_user_settable(auth):
    """A non-superuser must not be able to point the claim path at a claim it controls."""
    with pytest.raises(psycopg.Error) as e:
        auth.execute("SET meshhook_limits.tenant_claim = 'user_metadata.tenant_id'")
    assert sqlstate(e) == "42501"


def test_jwt_without_tenant_claim_has_no_identity(auth, tenant):
    for claims in ({"role": "anon"}, {"role": "authenticated", "sub": str(uuid.uuid4())},
                   {"app_metadata": {"tenant_id": None}}, {"app_metadata": {}}):
        assert rpc(auth, claims, f"SELECT {S}.current_tenant()") == [(None,)]
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, claims, f"SELECT * FROM {S}.acquire_execution_slot(%s)", (tenant,))
        assert sqlstate(e) == "42501", claims


def test_session_tenant_setting_does_not_widen_a_jwt_without_tenant(auth, admin, tenant):
    """A JWT that names no tenant must not fall back to meshhook_limits.tenant_id."""
    # meshhook_limits.tenant_id is superuser-only: the gateway needs a grant.
    admin.execute("GRANT SET ON PARAMETER meshhook_limits.tenant_id TO authenticator")
    auth.execute("SELECT set_config('meshhook_limits.tenant_id', %s, false)", (tenant,))
    try:
        assert rpc(auth, {"role": "anon"}, f"SELECT {S}.current_tenant()", role="anon") == [(None,)]
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, {"role": "anon"}, f"SELECT * FROM {S}.acquire_execution_slot(%s)", (tenant,), role="anon")
        assert sqlstate(e) == "42501"
        # A JWT naming another tenant wins over the session setting too.
        other = str(uuid.uuid4())
        assert rpc(auth, claims_for(other), f"SELECT {S}.current_tenant()") == [(uuid.UUID(other),)]
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, claims_for(other), f"SELECT * FROM {S}.acquire_execution_slot(%s)", (tenant,))
        assert sqlstate(e) == "42501"
    finally:
        auth.execute("RESET meshhook_limits.tenant_id")
        admin.execute("REVOKE SET ON PARAMETER meshhook_limits.tenant_id FROM authenticator")


def test_anon_sees_nothing_and_cannot_acquire(auth, world):
    anon = {"role": "anon", "iss": "supabase"}
    for tbl in TABLES:
        assert rpc(auth, anon, f"SELECT count(*) FROM {S}.{tbl}", role="anon") == [(0,)], tbl
    assert rpc(auth, anon, f"SELECT count(*) FROM {S}.slots()", role="anon") == [(0,)]
    for t in (world["a"], world["b"]):
        for call in (f"SELECT * FROM {S}.acquire_execution_slot(%s)", f"SELECT * FROM {S}.usage(%s)",
                     f"SELECT * FROM {S}.effective_limits(%s)", f"SELECT * FROM {S}.record_usage(%s, 'x', 1)"):
            with pytest.raises(psycopg.Error) as e:
                rpc(auth, anon, call, (t,), role="anon")
            assert sqlstate(e) == "42501", call
    with pytest.raises(psycopg.Error) as e:
        rpc(auth, anon, f"SELECT {S}.set_limit('concurrent_executions', 1000)", role="anon")
    assert sqlstate(e) == "42501"


def test_authenticator_itself_is_not_admin(auth, tenant):
    """authenticator is a (NOINHERIT) member of service_role; without SET ROLE it has no rights."""
    assert auth.execute(f"SELECT {S}.is_admin()").fetchone() == (False,)
    with pytest.raises(psycopg.Error) as e:
        auth.execute(f"SELECT {S}.set_limit('concurrent_executions', 1000, %s)", (tenant,))
    assert sqlstate(e) == "42501"
    with pytest.raises(psycopg.Error) as e:
        acquire(auth, tenant)
    assert sqlstate(e) == "42501"


# --------------------------------------------------------------------------- admins


def test_service_role_is_admin(auth, admin, world):
    sr = {"role": "service_role", "iss": "supabase"}
    a, b = world["a"], world["b"]
    assert rpc(auth, sr, f"SELECT {S}.is_admin()", role="service_role") == [(True,)]
    rpc(auth, sr, f"SELECT {S}.set_limit('concurrent_executions', 7, %s)", (a,), role="service_role")
    assert admin.execute(f"SELECT limit_value FROM {S}.limits WHERE tenant_id = %s "
                         f"AND resource = 'concurrent_executions'", (a,)).fetchone() == (7,)
    got = []
    for t in (a, b):
        row = rpc(auth, sr, f"SELECT granted, slot_id FROM {S}.acquire_execution_slot(%s)", (t,),
                  role="service_role")[0]
        assert row[0]
        got.append(row[1])
        rpc(auth, sr, f"SELECT * FROM {S}.record_usage(%s, %s, 0)", (t, world["meter"]), role="service_role")
        assert rpc(auth, sr, f"SELECT count(*) FROM {S}.usage(%s)", (t,), role="service_role")[0][0] > 0
        assert rpc(auth, sr, f"SELECT count(*) FROM {S}.effective_limits(%s)", (t,), role="service_role")[0][0] > 0
    # Reads everything.
    tenants = {r[0] for r in rpc(auth, sr, f"SELECT DISTINCT tenant_id FROM {S}.usage_counters "
                                           f"WHERE tenant_id IN (%s, %s)", (a, b), role="service_role")}
    assert tenants == {uuid.UUID(a), uuid.UUID(b)}
    seen = {r[0] for r in rpc(auth, sr, f"SELECT slot_id FROM {S}.slots()", role="service_role")}
    assert set(got) <= seen
    for sid in got:
        assert rpc(auth, sr, f"SELECT {S}.release_execution_slot(%s)", (sid,), role="service_role") == [(True,)]


def test_member_of_meshhook_limits_admin_is_admin(cluster, admin, world):
    role = uniq("sec_admin")
    plain = uniq("sec_plain")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"CREATE ROLE {plain} LOGIN")
    admin.execute(f"GRANT meshhook_limits_admin TO {role}")
    try:
        with cluster.connect(user=role) as c:
            assert c.execute(f"SELECT {S}.is_admin()").fetchone() == (True,)
            set_limit(c, "concurrent_executions", 9, world["b"])
            row = acquire(c, world["a"])
            assert row[0]
            assert c.execute(f"SELECT {S}.release_execution_slot(%s)", (row[1],)).fetchone() == (True,)
            assert c.execute(f"SELECT count(*) FROM {S}.limits WHERE tenant_id IN (%s, %s)",
                             (world["a"], world["b"])).fetchone()[0] >= 4
            assert c.execute(f"SELECT {S}.reap_execution_slots() >= 0").fetchone() == (True,)
        assert admin.execute(f"SELECT limit_value FROM {S}.limits WHERE tenant_id = %s "
                             f"AND resource = 'concurrent_executions'", (world["b"],)).fetchone() == (9,)
        # Control: the same kind of role without the grant is refused.
        with cluster.connect(user=plain) as c:
            assert c.execute(f"SELECT {S}.is_admin()").fetchone() == (False,)
            with pytest.raises(psycopg.Error) as e:
                set_limit(c, "concurrent_executions", 9, world["b"])
            assert sqlstate(e) == "42501"
    finally:
        admin.execute(f"DROP ROLE {role}")
        admin.execute(f"DROP ROLE {plain}")


# --------------------------------------------------------------------------- plain SQL worker


def test_worker_session_setting_acts_as_that_tenant_only(cluster, admin, world):
    a, b = world["a"], world["b"]
    role = uniq("sec_worker")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    # The worker's tenant is bound to its login role by a superuser.
    admin.execute(f"ALTER ROLE {role} SET meshhook_limits.tenant_id = '{a}'")
    try:
        with cluster.connect(user=role) as c:
            assert c.execute(f"SELECT {S}.current_tenant()").fetchone() == (uuid.UUID(a),)
            row = acquire(c, a)
            assert row[0], row
            assert c.execute(f"SELECT alive FROM {S}.heartbeat_execution_slot(%s)", (row[1],)).fetchone() == (True,)
            assert c.execute(f"SELECT {S}.release_execution_slot(%s)", (row[1],)).fetchone() == (True,)
            c.execute(f"SELECT * FROM {S}.record_usage(%s, %s, 0)", (a, world["meter"]))
            c.execute(f"SELECT * FROM {S}.usage(%s)", (a,))
            c.execute(f"SELECT * FROM {S}.effective_limits(%s)", (a,))
            for call in (f"SELECT * FROM {S}.acquire_execution_slot(%s)", f"SELECT * FROM {S}.usage(%s)",
                         f"SELECT * FROM {S}.effective_limits(%s)", f"SELECT * FROM {S}.record_usage(%s, 'x', 1)",
                         f"SELECT * FROM {S}.heartbeat_execution_slot(%s)"):
                arg = world["slot_b"] if "heartbeat" in call else b
                with pytest.raises(psycopg.Error) as e:
                    c.execute(call, (arg,))
                assert sqlstate(e) == "42501", call
            with pytest.raises(psycopg.Error) as e:
                c.execute(f"SELECT {S}.release_execution_slot(%s)", (world["slot_b"],))
            assert sqlstate(e) == "42501"
            with pytest.raises(psycopg.Error) as e:
                set_limit(c, "concurrent_executions", 1000, a)
            assert sqlstate(e) == "42501"
            # Reads: its own rows only.
            for tbl in ("usage_counters", "events", "tenant_plans"):
                assert {r[0] for r in c.execute(f"SELECT DISTINCT tenant_id FROM {S}.{tbl}")} == {uuid.UUID(a)}
            assert {r[1] for r in c.execute(f"SELECT * FROM {S}.slots()").fetchall()} == {uuid.UUID(a)}
        assert live_slot(admin, world["slot_b"])
        # Without the setting: no identity at all.
        admin.execute(f"ALTER ROLE {role} RESET meshhook_limits.tenant_id")
        with cluster.connect(user=role) as c:
            with pytest.raises(psycopg.Error) as e:
                acquire(c, a)
            assert sqlstate(e) == "42501"
            assert c.execute(f"SELECT count(*) FROM {S}.limits").fetchone() == (0,)
    finally:
        admin.execute(f"DROP ROLE {role}")


# --------------------------------------------------------------------------- catalogue


def test_security_definer_functions_pin_search_path(admin):
    rows = admin.execute("""
        SELECT p.oid::regprocedure::text, p.proconfig
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'meshhook_limits' AND p.prosecdef""").fetchall()
    names = {r[0].split("(")[0] for r in rows}
    # The functions that write or cross tenants must be among them.
    for fn in ("set_limit", "clear_limit", "create_plan", "assign_plan", "set_plan_limit", "record_usage",
               "usage", "effective_limits", "_acquire_execution_slot", "heartbeat_execution_slot",
               "_release_execution_slot", "_check_rate_limit", "slots", "_emit"):
        assert f"meshhook_limits.{fn}" in names, fn
    # The hot paths run as the caller and touch no table: shared memory only,
    # after the same identity check; whatever needs SQL goes through the
    # definer functions above. They carry no SET clause to swap per call.
    invoker = admin.execute("""
        SELECT p.proname, p.prosecdef, p.proconfig FROM pg_proc p
         WHERE p.pronamespace = 'meshhook_limits'::regnamespace
           AND p.proname IN ('acquire_execution_slot', 'release_execution_slot', 'check_rate_limit')
         ORDER BY 1""").fetchall()
    assert invoker == [("acquire_execution_slot", False, None), ("check_rate_limit", False, None),
                       ("release_execution_slot", False, None)]
    bad = []
    for sig, conf in rows:
        sp = [c for c in (conf or []) if c.startswith("search_path=")]
        if not sp:
            bad.append((sig, "no search_path"))
            continue
        path = [p.strip().strip('"') for p in sp[0].split("=", 1)[1].split(",")]
        # Only trusted schemas; pg_temp named explicitly and last (else it is searched first).
        if any(p in ("public", "$user", "") for p in path) or path[-1] != "pg_temp":
            bad.append((sig, sp[0]))
    assert not bad, bad


def test_rls_enabled_and_no_write_grants(admin):
    rows = admin.execute("""
        SELECT c.relname, c.relrowsecurity FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'meshhook_limits' AND c.relkind = 'r'""").fetchall()
    rls = dict(rows)
    for tbl in TABLES:
        assert rls[tbl], tbl
    for tbl, _ in rows:
        for role in ("public", "anon", "authenticated"):
            for priv in ("INSERT", "UPDATE", "DELETE", "TRUNCATE"):
                assert not admin.execute("SELECT has_table_privilege(%s, %s, %s)",
                                         (role, f"meshhook_limits.{tbl}", priv)).fetchone()[0], (tbl, role, priv)


# --------------------------------------------------------------------------- malformed claims


@pytest.mark.parametrize("claims", [
    {"app_metadata": {"tenant_id": "not-a-uuid"}},
    {"tenant_id": "1234"},
    {"app_metadata": {"tenant_id": "'; DROP TABLE meshhook_limits.limits; --"}},
    {"app_metadata": {"tenant_id": "x" * 10000}},
], ids=["word", "short", "injection", "huge"])
def test_malformed_tenant_claim_raises_22023(auth, admin, world, tenant, claims):
    # (world: the tables have rows, so RLS policies are actually evaluated)
    for call, params in [(f"SELECT * FROM {S}.acquire_execution_slot(%s)", (tenant,)),
                         (f"SELECT {S}.current_tenant()", None),
                         (f"SELECT count(*) FROM {S}.limits", None),
                         (f"SELECT count(*) FROM {S}.usage_counters", None)]:
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, claims, call, params)
        assert sqlstate(e) == "22023", (call, e.value)
        msg = e.value.diag.message_primary
        assert "tenant claim" in msg and "not a uuid" in msg, msg
        assert len(msg) < 300, "the message must not echo a huge claim back"
        assert "uuid" in (e.value.diag.message_hint or "")
    assert admin.execute("SELECT to_regclass('meshhook_limits.limits') IS NOT NULL").fetchone() == (True,)


def test_non_string_tenant_claim_raises_22023(auth, tenant):
    for claims in ({"app_metadata": {"tenant_id": 42}}, {"tenant_id": {"id": tenant}}, {"tenant_id": [tenant]}):
        with pytest.raises(psycopg.Error) as e:
            rpc(auth, claims, f"SELECT * FROM {S}.acquire_execution_slot(%s)", (tenant,))
        assert sqlstate(e) == "22023", (claims, e.value)
        assert "not a string" in e.value.diag.message_primary


@pytest.mark.parametrize("raw", ["{not json", '{"app_metadata": {"tenant_id": ', "null,", "\x01"])
def test_malformed_jwt_claims_json_raises_22023(auth, tenant, raw):
    for call, params in [(f"SELECT * FROM {S}.acquire_execution_slot(%s)", (tenant,)),
                         (f"SELECT {S}.current_tenant()", None)]:
        with pytest.raises(psycopg.Error) as e:
            rpc_raw(auth, raw, call, params)
        assert sqlstate(e) == "22023", (raw, e.value)
        assert "request.jwt.claims is not valid JSON" in e.value.diag.message_primary
    # The connection is fine afterwards.
    assert auth.execute("SELECT 1").fetchone() == (1,)


def test_monitor_role_reads_everything_and_changes_nothing(cluster, admin, tenant):
    """What an exporter's login role gets with meshhook_limits_monitor."""
    admin.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'ml_scraper') THEN "
                  "CREATE ROLE ml_scraper LOGIN IN ROLE meshhook_limits_monitor; END IF; END $$")
    admin.execute("SELECT meshhook_limits.set_limit('executions_per_day', 10, %s, window_length => '1 day')", (tenant,))
    admin.execute("SELECT meshhook_limits.record_usage(%s, 'executions_per_day', 3)", (tenant,))
    with cluster.connect(user="ml_scraper") as c:
        assert "meshhook_limits_slot_grants_total" in c.execute("SELECT meshhook_limits.metrics()").fetchone()[0]
        assert c.execute("SELECT used FROM meshhook_limits.usage(%s) WHERE resource = 'executions_per_day'",
                         (tenant,)).fetchone()[0] == 3
        assert c.execute("SELECT count(*) FROM meshhook_limits.usage_counters WHERE tenant_id = %s",
                         (tenant,)).fetchone()[0] == 1
        c.execute("SELECT * FROM meshhook_limits.pool_pressure()")
        c.execute("SELECT * FROM meshhook_limits.queue_health()")
        for stmt in ("SELECT meshhook_limits.set_limit('concurrent_executions', 1)",
                     "SELECT meshhook_limits.tick()",
                     f"SELECT * FROM meshhook_limits.acquire_execution_slot('{tenant}')",
                     f"SELECT * FROM meshhook_limits.record_usage('{tenant}', 'executions_per_day', 1)",
                     "DELETE FROM meshhook_limits.limits"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute(stmt)
    with cluster.connect(user="authenticator") as c:  # not a monitor: no metrics
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT meshhook_limits.metrics()")


# --------------------------------------------------------------------------- who may assert a tenant


def test_a_login_role_cannot_assert_a_tenant_by_setting(cluster, admin, world):
    """meshhook_limits.tenant_id is superuser-only: tenant A's worker cannot
    switch itself to tenant B."""
    a, b = world["a"], world["b"]
    role = uniq("sec_forger")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute(f"ALTER ROLE {role} SET meshhook_limits.tenant_id = '{a}'")
    try:
        with cluster.connect(user=role) as c:
            for how in ("SET meshhook_limits.tenant_id = '%s'" % b,
                        "SELECT set_config('meshhook_limits.tenant_id', '%s', false)" % b):
                with pytest.raises(psycopg.Error) as e:
                    c.execute(how)
                assert sqlstate(e) == "42501", how
            assert c.execute(f"SELECT {S}.current_tenant()").fetchone() == (uuid.UUID(a),)
            with pytest.raises(psycopg.Error) as e:
                acquire(c, b)
            assert sqlstate(e) == "42501"
    finally:
        admin.execute(f"DROP ROLE {role}")


def test_a_login_role_cannot_assert_a_tenant_by_forged_claims(cluster, admin, world):
    """Any role can write request.jwt.claims; only the roles of
    meshhook_limits.jwt_roles (PostgREST's anon and authenticated) are believed."""
    b = world["b"]
    role = uniq("sec_forger")
    admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        with cluster.connect(user=role) as c:
            c.execute("SELECT set_config('request.jwt.claims', %s, false)",
                      (json.dumps({"app_metadata": {"tenant_id": b}}),))
            assert c.execute(f"SELECT {S}.current_tenant()").fetchone() == (None,)
            with pytest.raises(psycopg.Error) as e:
                acquire(c, b)
            assert sqlstate(e) == "42501"
            assert "jwt_roles" in (e.value.diag.message_hint or "")
            assert c.execute(f"SELECT count(*) FROM {S}.usage_counters WHERE tenant_id = %s", (b,)).fetchone() == (0,)
    finally:
        admin.execute(f"DROP ROLE {role}")


# Internal functions that run as a role other than the extension's owner:
# the definer functions the C entry points (acquire_execution_slot,
# release_execution_slot, check_rate_limit) call through SPI as the caller,
# which check the caller's identity themselves; and _row_bytes, which counts
# a tracked table's rows as that table's owner (owner.rs), a pure function
# of the row it is given; the definer functions claim_jobs (SECURITY
# INVOKER) calls as the caller, which refuse any caller but an admin
# (test_claim.py); and _claim_key, the claim indexes' key, a pure function
# of a job's fields that every sender into a bound queue evaluates.
CALLED_AS_THE_CALLER = {"_acquire_execution_slot", "_release_execution_slot", "_check_rate_limit", "_row_bytes",
                        "_claim_slot", "_claim_shares", "_queue_binding", "_claim_queries", "_restore_claims",
                        "_claim_key"}


def test_internal_functions_are_revoked_from_public(admin):
    """Every function whose name starts with _ is internal: found by catalog
    query, not by a list, so a new one without its REVOKE fails here."""
    open_to_public = {r[0] for r in admin.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'meshhook_limits'::regnamespace "
        "AND p.proname LIKE '\\_%' AND has_function_privilege('public', p.oid, 'EXECUTE')").fetchall()}
    assert open_to_public == CALLED_AS_THE_CALLER
