"""Upgrades: ALTER EXTENSION meshhook_limits UPDATE from every released
version gives exactly the catalog of a fresh install, and keeps the state.

The released install scripts are kept in sql/released/ (scripts/setup.sh
copies them into the server's extension directory); sql/releases.txt names
the commit each was cut from."""
import uuid

import pytest

from conftest import CURRENT_VERSION, ROOT, catalog_difference, catalog_of

RELEASED = sorted(p.name.split("--")[1][:-4] for p in (ROOT / "sql" / "released").glob("meshhook_limits--*.sql"))


def catalog(cluster, db):
    with cluster.connect(dbname=db) as c:
        return catalog_of(c)


def new_db(cluster):
    name = "up_" + uuid.uuid4().hex[:8]
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"CREATE DATABASE {name}")
    return name


def drop_db(cluster, name):
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.smoke
@pytest.mark.parametrize("old", RELEASED)
def test_upgraded_catalog_equals_fresh_install(cluster, old):
    fresh, upgraded = new_db(cluster), new_db(cluster)
    try:
        cluster.sql("CREATE EXTENSION meshhook_limits", dbname=fresh)
        cluster.sql(f"CREATE EXTENSION meshhook_limits VERSION '{old}'", dbname=upgraded)
        cluster.sql("ALTER EXTENSION meshhook_limits UPDATE", dbname=upgraded)
        assert cluster.sql("SELECT extversion FROM pg_extension WHERE extname = 'meshhook_limits'",
                           dbname=upgraded) == [(CURRENT_VERSION,)]
        assert catalog_difference(catalog(cluster, fresh), catalog(cluster, upgraded)) == ([], []), \
            "the upgrade script does not reproduce a fresh install"
    finally:
        drop_db(cluster, fresh)
        drop_db(cluster, upgraded)


@pytest.mark.smoke
@pytest.mark.parametrize("old", RELEASED)
def test_upgrade_keeps_state_and_recounts_storage(cluster, old):
    db = new_db(cluster)
    t = str(uuid.uuid4())
    try:
        with cluster.connect(dbname=db) as c:
            c.execute(f"CREATE EXTENSION meshhook_limits VERSION '{old}'")
            c.execute("SELECT meshhook_limits.create_plan('pro')")
            c.execute("SELECT meshhook_limits.set_plan_limit('pro', 'concurrent_executions', 20)")
            c.execute("SELECT meshhook_limits.assign_plan(%s, 'pro')", (t,))
            c.execute("SELECT meshhook_limits.set_limit('storage_bytes', 1000, %s)", (t,))
            c.execute("SELECT meshhook_limits.set_limit('executions_per_day', 10, window_length => '1 day')")
            c.execute("SELECT meshhook_limits.record_usage(%s, 'executions_per_day', 9)", (t,))
            c.execute("CREATE TABLE docs (tenant uuid, body text)")
            c.execute("SELECT meshhook_limits.track_storage('docs', 'tenant')")
            c.execute("INSERT INTO docs SELECT %s, repeat('x', 100) FROM generate_series(1, 5)", (t,))
            c.execute("ALTER EXTENSION meshhook_limits UPDATE")
            # Limits resolve as before; usage is kept.
            eff = dict(c.execute("SELECT resource, source FROM meshhook_limits.effective_limits(%s)", (t,)).fetchall())
            assert eff["concurrent_executions"] == "plan" and eff["storage_bytes"] == "tenant"
            used = c.execute("SELECT used FROM meshhook_limits.usage(%s) WHERE resource = 'executions_per_day'",
                             (t,)).fetchone()
            assert used[0] == 9
            # Stored bytes are counted again the 0.2.0 way (values' sizes),
            # so deleting what was stored before the upgrade ends at zero...
            total = c.execute("SELECT bytes FROM meshhook_limits.storage_totals WHERE tenant_id = %s", (t,)).fetchone()[0]
            assert total == 5 * (16 + 100)
            # ...and the quota is still enforced.
            with pytest.raises(Exception) as e:
                c.execute("INSERT INTO docs SELECT %s, repeat('y', 500)", (t,))
            assert e.value.sqlstate == "53400"
            c.execute("DELETE FROM docs")
            total = c.execute("SELECT bytes FROM meshhook_limits.storage_totals WHERE tenant_id = %s", (t,)).fetchone()[0]
            assert total == 0
    finally:
        drop_db(cluster, db)
