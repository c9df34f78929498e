"""What an admin set can be undone, and said clearly (issue 22): a user alert rule dropped, a
built-in rule put back as shipped, a queue-threshold override removed; and
only by admins."""
import psycopg
import pytest

from conftest import rpc, sqlstate

S = "meshhook_limits"


def rule(admin, name):
    return admin.execute(f"SELECT metric, threshold, resolve_threshold, for_duration::text, severity, enabled, origin "
                         f"FROM {S}.effective_alert_rules WHERE name = %s", (name,)).fetchone()


def test_a_user_alert_rule_is_dropped_and_a_builtin_one_reset(admin):
    admin.execute(f"SELECT {S}.set_alert_rule('undo_mine', 'queue.queued', 5)")
    assert rule(admin, "undo_mine")[-1] == "user"
    assert admin.execute(f"SELECT {S}.drop_alert_rule('undo_mine')").fetchone()[0] is True
    assert rule(admin, "undo_mine") is None
    assert admin.execute(f"SELECT {S}.drop_alert_rule('undo_mine')").fetchone()[0] is False

    shipped = rule(admin, "pool_utilisation")
    assert shipped[-1] == "builtin"
    # "Switch a built-in off" as docs/api.md shows replaces its other columns too ...
    admin.execute(f"SELECT {S}.set_alert_rule('pool_utilisation', 'pool.utilisation', 0.9, enabled => false)")
    assert rule(admin, "pool_utilisation") != shipped
    # ... and a built-in rule cannot be dropped, only reset: back as shipped.
    with pytest.raises(psycopg.Error) as e:
        admin.execute(f"SELECT {S}.drop_alert_rule('pool_utilisation')")
    assert sqlstate(e) == "22023" and "reset_alert_rule" in e.value.diag.message_hint
    assert admin.execute(f"SELECT {S}.reset_alert_rule('pool_utilisation')").fetchone()[0] is True
    assert rule(admin, "pool_utilisation") == shipped
    assert admin.execute(f"SELECT {S}.reset_alert_rule('pool_utilisation')").fetchone()[0] is False
    with pytest.raises(psycopg.Error) as e:
        admin.execute(f"SELECT {S}.reset_alert_rule('undo_nope')")
    assert sqlstate(e) == "42704" and "pool_utilisation" in e.value.diag.message_hint


def test_a_queue_threshold_override_is_reset(admin):
    admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', 'undo_q', warn_queued => 1, crit_queued => 2)")
    admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', NULL, warn_queued => 3, crit_queued => 4)")
    try:
        assert admin.execute(f"SELECT {S}.reset_queue_thresholds('pgmq', 'undo_q')").fetchone()[0] is True
        rows = admin.execute(f"SELECT queue FROM {S}.queue_thresholds WHERE source = 'pgmq' "
                             "AND (queue IS NULL OR queue = 'undo_q')").fetchall()
        assert rows == [(None,)]   # the source's default row stays
        assert admin.execute(f"SELECT {S}.reset_queue_thresholds('pgmq', 'undo_q')").fetchone()[0] is False
        with pytest.raises(psycopg.Error) as e:
            admin.execute(f"SELECT {S}.reset_queue_thresholds('kafka', 'undo_q')")
        assert sqlstate(e) == "22023"
    finally:
        admin.execute(f"SELECT {S}.reset_queue_thresholds('pgmq')")


def test_set_calls_change_only_the_arguments_given(admin):
    q = "partial_q"
    th = lambda: admin.execute(f"SELECT warn_queued, crit_queued, warn_oldest_age::text, crit_error_rate::float "
                               f"FROM {S}.queue_thresholds WHERE source = 'pgmq' AND queue IS NOT DISTINCT FROM %s",
                               (q,)).fetchone()
    try:
        admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', NULL, crit_queued => 2000)")
        # A new override starts from what applies now (the source's row), not the defaults.
        admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', %s, warn_queued => 50)", (q,))
        assert th() == (50, 2000, "00:05:00", 0.20)
        admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', %s, crit_queued => 500)", (q,))
        admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', %s, warn_oldest_age => '1 minute')", (q,))
        admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', %s, crit_error_rate => NULL)", (q,))
        assert th() == (50, 500, "00:01:00", 0.20)
        # The merged values are checked, and the message shows them.
        with pytest.raises(psycopg.Error) as e:
            admin.execute(f"SELECT {S}.set_queue_thresholds('pgmq', %s, warn_queued => 600)", (q,))
        assert sqlstate(e) == "22023" and "600 / 500" in e.value.diag.message_primary
        assert th() == (50, 500, "00:01:00", 0.20)
    finally:
        admin.execute(f"SELECT {S}.reset_queue_thresholds('pgmq', %s)", (q,))
        admin.execute(f"SELECT {S}.reset_queue_thresholds('pgmq')")

    try:
        shipped = rule(admin, "pool_utilisation")
        admin.execute(f"SELECT {S}.set_alert_rule('pool_utilisation', enabled => false)")
        off = rule(admin, "pool_utilisation")
        assert off[:5] == shipped[:5] and off[5] is False and off[6] == "user"
        admin.execute(f"SELECT {S}.set_alert_rule('pool_utilisation', enabled => true)")
        assert rule(admin, "pool_utilisation")[:6] == shipped[:6]
        admin.execute(f"SELECT {S}.set_alert_rule('partial_rule', 'queue.queued', 5, for_duration => '1 minute', "
                      "severity => 'critical')")
        admin.execute(f"SELECT {S}.set_alert_rule('partial_rule', threshold => 7)")
        assert rule(admin, "partial_rule") == ("queue.queued", 7, None, "00:01:00", "critical", True, "user")
        with pytest.raises(psycopg.Error) as e:
            admin.execute(f"SELECT {S}.set_alert_rule('partial_new', threshold => 1)")
        assert sqlstate(e) == "22023" and "needs a metric and a threshold" in e.value.diag.message_primary
    finally:
        admin.execute(f"SELECT {S}.reset_alert_rule('pool_utilisation')")
        admin.execute(f"SELECT {S}.drop_alert_rule('partial_rule')")


def test_only_admins_undo(cluster):
    claims = {"role": "authenticated", "app_metadata": {"tenant_id": "00000000-0000-4000-8000-00000000000a"}}
    with cluster.connect(user="authenticator") as c:
        for stmt in (f"SELECT {S}.drop_alert_rule('x')", f"SELECT {S}.reset_alert_rule('pool_utilisation')",
                     f"SELECT {S}.reset_queue_thresholds('pgmq', 'x')"):
            with pytest.raises(psycopg.Error) as e:
                rpc(c, claims, stmt)
            assert sqlstate(e) == "42501", stmt


def test_a_bad_alert_metric_is_named_in_the_error(admin):
    with pytest.raises(psycopg.Error) as e:
        admin.execute(f"SELECT {S}.set_alert_rule('undo_bad', 'queue.qeued', 5)")
    assert sqlstate(e) == "22023"
    assert e.value.diag.message_primary == "unknown alert metric 'queue.qeued'"
    assert "queue.queued" in e.value.diag.message_hint and "check constraint" not in str(e.value)


def test_every_public_function_and_table_says_what_it_is_for(admin):
    """COMMENT ON each function, table and view not named with a leading _
    (sql/comments.sql and where they are written): \\df+ and \\dt+ explain
    them."""
    missing = [r[0] for r in admin.execute(
        "SELECT p.oid::regprocedure::text FROM pg_proc p WHERE p.pronamespace = 'meshhook_limits'::regnamespace "
        "AND p.proname NOT LIKE '\\_%' AND obj_description(p.oid, 'pg_proc') IS NULL "
        "UNION ALL SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'meshhook_limits'::regnamespace "
        "AND c.relkind IN ('r', 'v') AND c.relname NOT LIKE '\\_%' AND obj_description(c.oid, 'pg_class') IS NULL "
        "ORDER BY 1").fetchall()]
    assert missing == []


def test_apply_session_limits_outside_a_transaction_block_warns(cluster, admin):
    tenant = "00000000-0000-4000-8000-00000000000b"
    admin.execute(f"SELECT {S}.set_limit('execution_seconds', 30, %s)", (tenant,))
    try:
        with cluster.connect() as c:   # autocommit: every statement its own transaction
            notices = []
            # (read in the handler: a notice's fields go with its result)
            c.add_notice_handler(lambda d: notices.append((d.sqlstate, "after BEGIN" in (d.message_hint or ""))))
            c.execute(f"SELECT * FROM {S}.apply_session_limits(%s)", (tenant,)).fetchall()
            assert notices == [("25P01", True)]
            notices.clear()
            with c.transaction():
                c.execute(f"SELECT * FROM {S}.apply_session_limits(%s)", (tenant,)).fetchall()
            assert notices == []
    finally:
        admin.execute(f"SELECT {S}.clear_limit('execution_seconds', %s)", (tenant,))


def test_a_worker_whose_tenant_comes_from_its_role_is_pointed_at_that_setting(cluster, admin):
    """Issue 22: a worker bound to a tenant with ALTER ROLE … SET
    meshhook_limits.tenant_id was told to use its JWT claim."""
    mine, other = "00000000-0000-4000-8000-00000000000c", "00000000-0000-4000-8000-00000000000d"
    admin.execute("DROP ROLE IF EXISTS ml_undo_worker")
    admin.execute("CREATE ROLE ml_undo_worker LOGIN")
    admin.execute(f"ALTER ROLE ml_undo_worker SET meshhook_limits.tenant_id = '{mine}'")
    try:
        with cluster.connect(user="ml_undo_worker") as c:
            with pytest.raises(psycopg.Error) as e:
                c.execute(f"SELECT * FROM {S}.acquire_execution_slot(%s)", (other,))
            assert sqlstate(e) == "42501"
            assert "meshhook_limits.tenant_id" in e.value.diag.message_hint
            assert "JWT" not in e.value.diag.message_hint
        with cluster.connect(user="authenticator") as c:   # through PostgREST: the JWT
            claims = {"role": "authenticated", "app_metadata": {"tenant_id": mine}}
            with pytest.raises(psycopg.Error) as e:
                rpc(c, claims, f"SELECT * FROM {S}.acquire_execution_slot(%s)", (other,))
            assert "JWT claim" in e.value.diag.message_hint
    finally:
        admin.execute("DROP ROLE ml_undo_worker")
