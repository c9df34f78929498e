"""Without shared_preload_libraries the slot functions keep their contract on
a table (slower, durable), with a notice once per session. The slot
contract itself (admission under concurrency, rollbacks, leases, deadlines)
runs on both paths in tests/test_slots.py; here is what only the table has."""
import time
import uuid

import pytest

from conftest import acquire, destroy_cluster, fresh_cluster, set_limit


@pytest.fixture(scope="module")
def plain():
    c = fresh_cluster("nopreload", "shared_preload_libraries = ''", "fsync = off")
    with c.connect() as conn:
        conn.execute("CREATE EXTENSION meshhook_limits")
    yield c
    destroy_cluster(c)


def test_slots_work_without_preload_with_one_notice(plain):
    t = str(uuid.uuid4())
    notices = []
    with plain.connect() as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        assert c.execute("SELECT preloaded FROM meshhook_limits.slot_stats()").fetchone()[0] is False
        set_limit(c, "concurrent_executions", 2, t)
        a, b, refused = acquire(c, t), acquire(c, t), acquire(c, t)
        assert a[0] and b[0] and not refused[0] and refused[2] == "tenant_limit" and refused[7] is not None
        assert c.execute("SELECT meshhook_limits.live_slots(%s)", (t,)).fetchone()[0] == 2
        hb = c.execute("SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (a[1],)).fetchone()
        assert hb[0] and hb[1] == "alive"
        assert c.execute("SELECT meshhook_limits.release_execution_slot(%s)", (a[1],)).fetchone()[0]
        assert not c.execute("SELECT meshhook_limits.release_execution_slot(%s)", (a[1],)).fetchone()[0]
        assert [r[0] for r in c.execute("SELECT slot_id FROM meshhook_limits.slots() WHERE tenant_id = %s",
                                        (t,)).fetchall()] == [b[1]]
    assert len([n for n in notices if "shared_preload_libraries" in n]) == 1


def test_fallback_slots_survive_restart(plain):
    t = str(uuid.uuid4())
    with plain.connect() as c:
        set_limit(c, "concurrent_executions", 1, t)
        slot = acquire(c, t)[1]
    plain.restart("immediate")
    with plain.connect() as c:
        assert not acquire(c, t)[0]
        assert c.execute("SELECT alive FROM meshhook_limits.heartbeat_execution_slot(%s)", (slot,)).fetchone()[0]


def test_rate_limits_without_preload_same_sequence(plain):
    t = str(uuid.uuid4())
    notices = []
    with plain.connect() as c:
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        set_limit(c, "requests_per_second", 2, t, burst=2)
        set_limit(c, "requests_per_second.k", 2, t, burst=2)  # a key of its own can be paused
        c.execute("SET meshhook_limits.test_clock = 1900000000")
        seq = [c.execute("SELECT allowed, remaining FROM meshhook_limits.check_rate_limit(%s, 'k')", (t,)).fetchone()
               for _ in range(3)]
        assert seq == [(True, 1), (True, 0), (False, 0)]
        retry = c.execute("SELECT retry_after FROM meshhook_limits.check_rate_limit(%s, 'k')", (t,)).fetchone()[0]
        assert retry.total_seconds() == 0.5
        c.execute("SET meshhook_limits.test_clock = 1900000000.5")
        assert c.execute("SELECT allowed FROM meshhook_limits.check_rate_limit(%s, 'k')", (t,)).fetchone()[0]
        c.execute("SELECT meshhook_limits.pause_rate_limit(%s, 'k', to_timestamp(1900000010))", (t,))
        c.execute("SET meshhook_limits.test_clock = 1900000005")
        assert not c.execute("SELECT allowed FROM meshhook_limits.check_rate_limit(%s, 'k')", (t,)).fetchone()[0]
        # The tenant's rate bounds every key: another key shares its bucket.
        c.execute("SET meshhook_limits.test_clock = 1900000020")
        seq = [c.execute("SELECT allowed FROM meshhook_limits.check_rate_limit(%s, %s)", (t, k)).fetchone()[0]
               for k in ("a", "b", "c")]
        assert seq == [True, True, False]
    assert len([n for n in notices if "rate limits use a table" in n]) == 1


def test_an_advisory_lock_cannot_stall_a_tenant(plain):
    """Any role can take advisory locks; the fallback serialises a tenant on
    a row of its own table instead, which no other role can lock."""
    t = str(uuid.uuid4())
    name = "adv_" + uuid.uuid4().hex[:8]
    with plain.connect() as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN")
    try:
        with plain.connect(user=name) as attacker, plain.connect() as victim:
            attacker.execute("SELECT pg_advisory_lock(hashtext('meshhook_limits.slots'), hashtext(%s))", (t,))
            with pytest.raises(Exception) as e:
                attacker.execute("SELECT * FROM meshhook_limits.fallback_tenants FOR UPDATE")
            assert e.value.sqlstate == "42501"
            victim.execute("SET statement_timeout = '3s'")
            assert acquire(victim, t)[0] is True
    finally:
        with plain.connect() as admin:
            admin.execute(f"DROP ROLE {name}")


def test_a_held_slot_row_does_not_stall_the_reaper(plain):
    """A tenant in a long transaction on its own expired slot: tick() reaps
    the other expired slots and still finishes."""
    t, other = str(uuid.uuid4()), str(uuid.uuid4())
    with plain.connect() as c, plain.connect(autocommit=False) as holder:
        held = acquire(c, t, lease="1 second")
        freed = acquire(c, other, lease="1 second")
        holder.execute("SELECT * FROM meshhook_limits.heartbeat_execution_slot(%s)", (held[1],))  # locks its row
        time.sleep(1.2)
        c.execute("SELECT meshhook_limits.tick()")
        assert c.execute("SELECT count(*) FROM meshhook_limits.fallback_slots WHERE slot_id = %s",
                         (freed[1],)).fetchone() == (0,)
        holder.rollback()
        c.execute("SELECT meshhook_limits.tick()")
        assert c.execute("SELECT count(*) FROM meshhook_limits.fallback_slots WHERE slot_id = %s",
                         (held[1],)).fetchone() == (0,)
