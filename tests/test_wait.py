"""acquire_execution_slot(..., wait => interval): a caller waits for room
instead of polling (docs/claiming.md, "Waiting instead of polling").

Real backends waiting on the slot table's condition variable: woken when a
slot stops counting, in order, cancellable, never holding a lock others
need, and leaving nothing behind when cancelled or terminated."""
import threading
import time

import psycopg
import pytest

from conftest import acquire, set_limit

S = "meshhook_limits"


def wait_acquire(cluster, tenant, wait, out, key, project=None):
    """One waiter in its own session: records (granted, reason, seconds)."""
    try:
        with cluster.connect() as c:
            t0 = time.monotonic()
            r = c.execute(f"SELECT granted, reason, slot_id FROM {S}.acquire_execution_slot(%s, %s, wait => %s::interval)",
                          (tenant, project, wait)).fetchone()
            out[key] = (r[0], r[1], time.monotonic() - t0, r[2], time.monotonic())
    except psycopg.Error as e:
        out[key] = ("error", e.sqlstate, None, None, time.monotonic())


def waiting_backends(admin, n, timeout=30.0):
    """Wait until n backends sleep in acquire_execution_slot's wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Extension' "
                            "AND query LIKE '%acquire_execution_slot%wait =>%'").fetchone()[0]
        if got >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"expected {n} waiting backends")


@pytest.mark.smoke
def test_a_waiter_is_granted_when_a_slot_is_released_not_at_its_timeout(cluster, admin, tenant):
    set_limit(admin, "concurrent_executions", 1, tenant)
    held = acquire(admin, tenant)[1]
    out = {}
    t = threading.Thread(target=wait_acquire, args=(cluster, tenant, "60 seconds", out, "w"))
    t.start()
    waiting_backends(admin, 1)
    time.sleep(0.3)
    released_at = time.monotonic()
    assert admin.execute(f"SELECT {S}.release_execution_slot(%s)", (held,)).fetchone()[0] is True
    t.join(60)
    granted, reason, _, slot, done_at = out["w"]
    assert (granted, reason) == (True, "granted")
    # Woken by the release, not by its 60 s timer running out (with half of
    # that as margin for a busy machine).
    assert done_at - released_at < 30
    admin.execute(f"SELECT {S}.release_execution_slot(%s)", (slot,))


def test_a_waiter_that_finds_no_room_gets_the_usual_refusal_after_its_wait(cluster, admin, tenant):
    set_limit(admin, "concurrent_executions", 1, tenant)
    held = acquire(admin, tenant)[1]
    out = {}
    wait_acquire(cluster, tenant, "700 milliseconds", out, "w")
    granted, reason, took, _, _ = out["w"]
    assert (granted, reason) == (False, "tenant_limit")
    assert 0.6 < took < 5  # ends at its 700 ms, not many times later
    # Without wait: refused at once, as before. One query, no sleep: 5 s is
    # room for a busy machine; a call that waited for room, with no release
    # coming, would not return at all.
    t0 = time.monotonic()
    assert acquire(admin, tenant)[:3] == (False, None, "tenant_limit")
    assert time.monotonic() - t0 < 5
    admin.execute(f"SELECT {S}.release_execution_slot(%s)", (held,))


def test_rollback_of_the_holder_wakes_the_waiter(cluster, admin, tenant):
    set_limit(admin, "concurrent_executions", 1, tenant)
    holder = cluster.connect(autocommit=False)
    acquire(holder, tenant)
    out = {}
    t = threading.Thread(target=wait_acquire, args=(cluster, tenant, "60 seconds", out, "w"))
    t.start()
    waiting_backends(admin, 1)
    rolled_back_at = time.monotonic()
    holder.rollback()
    holder.close()
    t.join(60)
    assert out["w"][:2] == (True, "granted")
    # Granted after the rollback, not at its 60 s timeout (half of that as
    # margin for a busy machine).
    assert out["w"][4] - rolled_back_at < 30
    admin.execute(f"SELECT {S}.release_execution_slot(%s)", (out["w"][3],))


def test_waiters_of_one_tenant_are_served_first_come_first_served(cluster, admin, tenant):
    set_limit(admin, "concurrent_executions", 1, tenant)
    held = acquire(admin, tenant)[1]
    out, threads = {}, []
    for i in range(4):
        t = threading.Thread(target=wait_acquire, args=(cluster, tenant, "60 seconds", out, i))
        t.start()
        threads.append(t)
        waiting_backends(admin, i + 1)
    # Hand the one slot on, waiter by waiter.
    slot = held
    order = []
    for _ in range(4):
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (slot,))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = [k for k, v in out.items() if v[0] is True and k not in order]
            if done:
                break
            time.sleep(0.01)
        assert len(done) == 1, out
        order.append(done[0])
        slot = out[done[0]][3]
    for t in threads:
        t.join(30)
    assert order == [0, 1, 2, 3]
    admin.execute(f"SELECT {S}.release_execution_slot(%s)", (slot,))


def test_across_tenants_the_total_goes_to_the_tenant_running_fewest(cluster, admin):
    import uuid
    busy, idle, third = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    # The whole database's total: what runs now plus four.
    live = admin.execute(f"SELECT count(*) FROM {S}.slots() WHERE state = 'live'").fetchone()[0]
    set_limit(admin, "concurrent_executions_total", live + 4)
    try:
        held = [acquire(admin, busy)[1] for _ in range(2)] + [acquire(admin, idle)[1], acquire(admin, third)[1]]
        assert all(held), "the total must have room for the four"
        out = {}
        # busy waits first, idle second; idle runs fewer (1 < 2), so when
        # room comes it goes first.
        tb = threading.Thread(target=wait_acquire, args=(cluster, busy, "60 seconds", out, "busy"))
        tb.start()
        waiting_backends(admin, 1)
        ti = threading.Thread(target=wait_acquire, args=(cluster, idle, "60 seconds", out, "idle"))
        ti.start()
        waiting_backends(admin, 2)
        time.sleep(0.3)  # both have tried and been refused for the total
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (held.pop(),))  # third's
        deadline = time.monotonic() + 30
        while not out and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        assert list(out) == ["idle"], out
        assert out["idle"][1] == "granted"
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (held.pop(),))  # idle's first
        tb.join(60)
        ti.join(60)
        assert out["busy"][1] == "granted"
        for k in out:
            admin.execute(f"SELECT {S}.release_execution_slot(%s)", (out[k][3],))
        for s in held:
            admin.execute(f"SELECT {S}.release_execution_slot(%s)", (s,))
    finally:
        admin.execute(f"SELECT {S}.clear_limit('concurrent_executions_total')")


@pytest.mark.parametrize("how", ["statement_timeout", "pg_cancel_backend", "pg_terminate_backend"])
def test_a_cancelled_waiter_leaves_nothing_behind(cluster, admin, tenant, how):
    set_limit(admin, "concurrent_executions", 1, tenant)
    held = acquire(admin, tenant)[1]
    out = {}

    def victim():
        try:
            with cluster.connect() as c:
                out["pid"] = c.info.backend_pid
                if how == "statement_timeout":
                    c.execute("SET statement_timeout = '300ms'")
                out["start"] = time.monotonic()
                c.execute(f"SELECT * FROM {S}.acquire_execution_slot(%s, wait => '60 seconds')", (tenant,))
                out["r"] = "returned"
        except psycopg.Error as e:
            out["r"] = e.sqlstate or type(e).__name__
        out["end"] = time.monotonic()

    t = threading.Thread(target=victim)
    t.start()
    if how == "statement_timeout":
        t.join(90)
        cause = out["start"]  # the 300 ms timeout runs from the statement's start
    else:
        waiting_backends(admin, 1)
        cause = time.monotonic()
        admin.execute(f"SELECT {how}(%s)", (out["pid"],))
        t.join(90)
    # Ended by the cancel, not by its 60 s wait running out (half of that as
    # margin for a busy machine).
    assert out["end"] - cause < 30, out
    assert out["r"] != "returned"
    if how != "pg_terminate_backend":
        assert out["r"] == "57014"  # query_canceled
    # The cancelled waiter is gone from the line: the next waiter of the same
    # tenant is not held behind it, and gets the slot as soon as it is free.
    after = {}
    t2 = threading.Thread(target=wait_acquire, args=(cluster, tenant, "60 seconds", after, "w"))
    t2.start()
    waiting_backends(admin, 1)
    released_at = time.monotonic()
    admin.execute(f"SELECT {S}.release_execution_slot(%s)", (held,))
    t2.join(60)
    assert after["w"][:2] == (True, "granted")
    # Granted on the release, not at its 60 s timeout behind a dead entry.
    assert after["w"][4] - released_at < 30
    admin.execute(f"SELECT {S}.release_execution_slot(%s)", (after["w"][3],))


def test_a_waiter_holds_no_lock_others_need(cluster, admin, tenant):
    """While a waiter sleeps, other tenants acquire and release, and an
    admin changes limits (which takes the limit tables' locks)."""
    import uuid
    set_limit(admin, "concurrent_executions", 1, tenant)
    held = acquire(admin, tenant)[1]
    out = {}
    t = threading.Thread(target=wait_acquire, args=(cluster, tenant, "60 seconds", out, "w"))
    t.start()
    waiting_backends(admin, 1)
    with cluster.connect() as other:
        other.execute("SET lock_timeout = '500ms'")
        t0 = time.monotonic()
        for _ in range(20):
            someone = str(uuid.uuid4())
            r = acquire(other, someone)
            assert r[0] is True
            other.execute(f"SELECT {S}.release_execution_slot(%s)", (r[1],))
        set_limit(other, "concurrent_executions", 2, tenant)
        changed_at = time.monotonic()
        # Not held until the waiter's 60 s wait ends (a heavyweight lock would
        # have hit lock_timeout; this bound catches any other kind of wait).
        assert changed_at - t0 < 30
    # The raised limit lets the waiter in: the limit change ended its wait,
    # well before its 60 s.
    t.join(60)
    assert out["w"][:2] == (True, "granted")
    assert out["w"][4] - changed_at < 30
    for s in (held, out["w"][3]):
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (s,))


def test_one_tenant_cannot_take_every_waiter_entry(cluster, admin, tenant):
    """meshhook_limits.tenant_waiters (here 3): a tenant's fourth concurrent
    waiter tries once and is refused at once instead of waiting, so the
    1,024 shared entries never all go to one tenant; another tenant still
    waits, and is granted when its slot is released (red-team finding: one
    tenant's sessions could take all 1,024)."""
    other = str(__import__("uuid").uuid4())
    admin.execute("ALTER SYSTEM SET meshhook_limits.tenant_waiters = 3")
    admin.execute("SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 10
        while admin.execute("SHOW meshhook_limits.tenant_waiters").fetchone()[0] != "3":
            assert time.monotonic() < deadline, "the reload did not reach this session"
            time.sleep(0.05)
        for t in (tenant, other):
            set_limit(admin, "concurrent_executions", 1, t)
        held = {t: acquire(admin, t)[1] for t in (tenant, other)}
        out = {}
        threads = [threading.Thread(target=wait_acquire, args=(cluster, tenant, "60 seconds", out, f"a{i}"))
                   for i in range(3)]
        for th in threads:
            th.start()
        waiting_backends(admin, 3, timeout=30)
        # The fourth of the tenant: no entry left for it, refused at once, not
        # after its 60 s (half of that as margin for a busy machine).
        wait_acquire(cluster, tenant, "60 seconds", out, "a3")
        granted, reason, took, _, _ = out["a3"]
        assert (granted, reason) == (False, "tenant_limit") and took < 30, out["a3"]
        # Another tenant still waits, and gets its slot when it is released.
        tb = threading.Thread(target=wait_acquire, args=(cluster, other, "60 seconds", out, "b"))
        tb.start()
        waiting_backends(admin, 4, timeout=30)
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (held[other],))
        tb.join(30)
        assert out["b"][:2] == (True, "granted"), out["b"]
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (out["b"][3],))
        # The tenant's three waiters: the first is granted on release, the
        # others in turn.
        admin.execute(f"SELECT {S}.release_execution_slot(%s)", (held[tenant],))
        for i in range(3):
            deadline = time.monotonic() + 30
            while not any(k.startswith("a") and k != "a3" and v[0] is True and not v[5:]
                          for k, v in out.items()):
                assert time.monotonic() < deadline, out
                time.sleep(0.02)
            k = next(k for k, v in out.items() if k.startswith("a") and k != "a3" and v[0] is True and not v[5:])
            out[k] = out[k] + ("released",)
            admin.execute(f"SELECT {S}.release_execution_slot(%s)", (out[k][3],))
        for th in threads:
            th.join(60)
    finally:
        admin.execute("ALTER SYSTEM RESET meshhook_limits.tenant_waiters")
        admin.execute("SELECT pg_reload_conf()")


def test_more_than_1024_waiters_of_one_tenant_leave_entries_for_another():
    """The attack of test_one_tenant_cannot_take_every_waiter_entry at full
    size, at the default meshhook_limits.tenant_waiters (64): one tenant
    sends 1,100 sessions, more than the 1,024 shared waiter entries, into
    acquire_execution_slot(..., wait => '10 minutes') against a full limit.
    Exactly 64 of them wait; the other 1,036 return at once, not granted
    ('tenant_limit'), instead of waiting. While the 64 wait, another tenant
    whose slot is held still gets an entry: it waits, and is granted when the
    slot is released. Without the cap (1,024) the attacker holds every entry
    and that tenant cannot wait at all.

    Own server (max_connections = 1200); the sessions are asynchronous
    connections driven from one thread. Every step loops until its count is
    reached, with a generous deadline: no fixed sleeps."""
    import asyncio
    import uuid

    from conftest import destroy_cluster, fresh_cluster

    n, cap = 1100, 64
    attacker, victim = str(uuid.uuid4()), str(uuid.uuid4())
    call = f"SELECT granted, reason, slot_id FROM {S}.acquire_execution_slot(%s, wait => '10 minutes')"

    async def attack(c):
        admin = await psycopg.AsyncConnection.connect(c.dsn(), autocommit=True)
        conns, tasks = [], []

        async def q(sql, params=None):
            cur = await admin.execute(sql, params)
            return await cur.fetchall() if cur.description else None

        async def waiting(app):
            """Sessions of `app` asleep in acquire_execution_slot's wait."""
            return (await q("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                            "AND wait_event_type = 'Extension'", (app,)))[0][0]

        async def ask(conn, tenant):
            cur = await conn.execute(call, (tenant,))
            return await cur.fetchone()

        try:
            assert (await q("SHOW meshhook_limits.tenant_waiters"))[0][0] == str(cap)
            # Both tenants full: one slot each, held by the admin session.
            held = {}
            for t in (attacker, victim):
                await q(f"SELECT {S}.set_limit('concurrent_executions', 1, %s)", (t,))
                held[t] = (await q(f"SELECT slot_id FROM {S}.acquire_execution_slot(%s)", (t,)))[0][0]
                assert held[t] is not None

            gate = asyncio.Semaphore(25)  # the postmaster forks one backend at a time anyway

            async def connect(app):
                async with gate:
                    conn = await psycopg.AsyncConnection.connect(c.dsn(), autocommit=True, application_name=app)
                    conns.append(conn)
                    return conn

            attackers = await asyncio.gather(*(connect("ml_attacker") for _ in range(n)))
            victim_conn = await connect("ml_victim")

            # The attack: every attacker session waits for room at once.
            tasks = [asyncio.create_task(ask(conn, attacker)) for conn in attackers]
            deadline = time.monotonic() + 60
            while True:  # until every call has either returned or is asleep
                returned = sum(t.done() for t in tasks)
                asleep = await waiting("ml_attacker")
                if returned + asleep == n:
                    break
                assert time.monotonic() < deadline, f"{returned} returned and {asleep} asleep of {n}"
                await asyncio.sleep(0.05)

            # While they wait, the victim still gets a waiter entry: it waits...
            v = asyncio.create_task(ask(victim_conn, victim))
            deadline = time.monotonic() + 30
            while await waiting("ml_victim") != 1:
                assert not v.done(), f"the victim could not wait: {v.result()} ({asleep} attacker waiters)"
                assert time.monotonic() < deadline, "the victim never waited"
                await asyncio.sleep(0.02)
            # ...and is granted when its slot is released (it asked for 10 minutes).
            assert (await q(f"SELECT {S}.release_execution_slot(%s)", (held[victim],)))[0][0] is True
            granted, reason, slot = await asyncio.wait_for(v, 30)
            assert (granted, reason) == (True, "granted") and slot is not None
            await q(f"SELECT {S}.release_execution_slot(%s)", (slot,))

            # Exactly the cap of the attacker's calls wait; every other one
            # returned at once (well inside its 10 minutes), not granted.
            done = [t.result() for t in tasks if t.done()]
            assert len(done) == n - cap, f"{len(done)} attacker calls returned, expected {n - cap}"
            assert all(r == (False, "tenant_limit", None) for r in done), \
                {r for r in done if r != (False, "tenant_limit", None)}
            deadline = time.monotonic() + 30
            while (asleep := await waiting("ml_attacker")) != cap:
                assert asleep < cap, f"{asleep} attacker sessions wait, more than {cap}"
                assert time.monotonic() < deadline, f"{asleep} attacker sessions wait, expected {cap}"
                await asyncio.sleep(0.02)

            # The 64 were real waiters: room for them (the ceiling raised past
            # what runs), and each is granted in turn, still within its wait.
            await q(f"SELECT {S}.set_limit('concurrent_executions', %s, %s)", (cap + 1, attacker))
            rest = await asyncio.wait_for(asyncio.gather(*(t for t in tasks if not t.done())), 60)
            assert len(rest) == cap and all(r[:2] == (True, "granted") for r in rest), rest
            assert (await q(f"SELECT count(*) FROM {S}.slots() WHERE tenant_id = %s AND state = 'live'",
                            (attacker,)))[0][0] == cap + 1
            assert await waiting("ml_attacker") == 0
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)
            await admin.close()

    c = fresh_cluster("waiters", "max_connections = 1200", "shared_buffers = 32MB", "fsync = off",
                      "meshhook_limits.restart_grace = 0", "meshhook_limits.database = 'postgres'")
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION meshhook_limits")
        asyncio.run(attack(c))
    finally:
        destroy_cluster(c)
