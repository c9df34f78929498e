"""Integration tests against a real PostgreSQL server with meshhook_limits
preloaded, run as the `postgres` OS user through scripts/pg.sh.

The server version is the environment's PG (15, 16, 17 or 18; default 15), as
for every script (scripts/pgenv.sh); scripts/test.sh runs the suite once per
version. Tests marked `smoke` are the set run on every version.

Each test session gets its own throwaway cluster. Tests isolate themselves by
using fresh random tenant ids (see `tenant`), so they can share the database.
"""
import os
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parent.parent
PG_SH = ROOT / "scripts" / "pg.sh"
PG_MAJOR = int(os.environ.get("PG", "15"))
PG_BIN = ("/usr/lib/postgresql/15/bin" if PG_MAJOR == 15
          else str(ROOT / ".postgresql" / f"pg{PG_MAJOR}" / "bin"))


# The version this checkout builds, and every object CREATE EXTENSION
# installs as sorted text lines (tests/catalog_snapshot.sql): what the
# upgrade tests compare.
CURRENT_VERSION = next(line.split('"')[1] for line in (ROOT / "Cargo.toml").read_text().splitlines()
                       if line.startswith("version"))
CATALOG_SNAPSHOT = (ROOT / "tests" / "catalog_snapshot.sql").read_text()


def catalog_of(conn) -> list[str]:
    return [r[0] for r in conn.execute(CATALOG_SNAPSHOT).fetchall()]


def catalog_difference(expected: list[str], got: list[str]) -> tuple[list[str], list[str]]:
    """(lines only in expected, lines only in got): ([], []) when equal."""
    return [x for x in expected if x not in got], [x for x in got if x not in expected]


def requires(available: bool, what: str):
    """The pytestmark of a module that needs `what` (installed by
    scripts/setup.sh --test): skipped where it is missing, but under
    scripts/test.sh (MESHHOOK_TEST_STRICT=1, so in CI) a missing tool is an
    error, never a silent pass."""
    if os.environ.get("MESHHOOK_TEST_STRICT") == "1":
        if not available:
            pytest.fail(f"{what} is missing (scripts/setup.sh --test installs it)", pytrace=False)
        return []
    return pytest.mark.skipif(not available, reason=f"needs {what} (scripts/setup.sh --test)")


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: the set run on every PostgreSQL version (scripts/test.sh)")


class Cluster:
    def __init__(self, name: str, bin: str = PG_BIN):
        self.name = name
        self.bin = bin  # the installation's bin/ (tests/test_upgrade.py uses a copy)
        self.base = Path("/tmp/meshhook_limits") / name
        self.data = self.base / "data"
        self.dbname = "mltest"

    def start(self, *conf: str) -> None:
        out = subprocess.run([str(PG_SH), "start", self.name, *conf], check=True,
                             capture_output=True, text=True, env=self.env()).stdout
        env = dict(part.split("=", 1) for part in out.replace("export ", "").split())
        self.host, self.port = env["PGHOST"], int(env["PGPORT"])

    def env(self) -> dict:
        return {**os.environ, "MESHHOOK_PG_BIN": self.bin} if self.bin != PG_BIN else dict(os.environ)

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", f"{self.bin}/pg_ctl", "-D", str(self.data),
                        "-l", str(self.base / "server.log"), *args], check=True, capture_output=True)

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "-w", "stop")

    def restart(self, mode: str = "fast") -> None:
        """Stop (mode 'immediate' is a crash: no shutdown checkpoint) and start again."""
        self.stop(mode)
        self.pg_ctl("-w", "-t", "60", "start")
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                with self.connect(dbname="postgres") as c:
                    c.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)

    def dsn(self, dbname: str | None = None, user: str = "postgres") -> str:
        return f"host={self.host} port={self.port} user={user} dbname={dbname or self.dbname}"

    def connect(self, dbname: str | None = None, user: str = "postgres", autocommit: bool = True,
                **kw) -> psycopg.Connection:
        return psycopg.connect(self.dsn(dbname, user), autocommit=autocommit, **kw)

    def sql(self, query: str, params=None, dbname: str | None = None):
        """Run one statement as the superuser and return all rows (or None)."""
        with self.connect(dbname) as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None


class PgBouncer:
    """A real PgBouncer in front of a test server (scripts/pgbouncer.sh):
    transaction pooling, default_pool_size 2, admin console for postgres."""
    SCRIPT = ROOT / "scripts" / "pgbouncer.sh"

    def __init__(self, name: str, pg_port: int):
        self.name, self.pg_port = name, pg_port

    def start(self) -> None:
        out = subprocess.run([str(self.SCRIPT), "start", self.name, str(self.pg_port)], check=True,
                             capture_output=True, text=True).stdout
        env = dict(part.split("=", 1) for part in out.replace("export ", "").split())
        self.port, self.pid = int(env["PGBOUNCER_PORT"]), int(env["PGBOUNCER_PID"])

    def stop(self) -> None:
        subprocess.run([str(self.SCRIPT), "stop", self.name], check=True, capture_output=True)

    @property
    def conninfo(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname=pgbouncer user=postgres"

    def show(self, what: str) -> list[list[str]]:
        """An admin-console command (simple query protocol, through psql)."""
        out = subprocess.run([f"{PG_BIN}/psql", "-X", "-A", "-t", "-F", "\t", "-h", "127.0.0.1", "-p", str(self.port),
                              "-U", "postgres", "-d", "pgbouncer", "-c", what],
                             check=True, capture_output=True, text=True).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    def config(self, key: str) -> str:
        return next(r[1] for r in self.show("SHOW CONFIG") if r[0] == key)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def fresh_cluster(suffix: str, *conf: str, dbname: str = "mltest", create_db: bool = True) -> Cluster:
    """A new throwaway cluster (any old one of that name is removed) with extra
    postgresql.conf lines; destroy it with `destroy_cluster`."""
    c = Cluster(f"pytest-{suffix}-{os.getpid()}" if suffix else f"pytest-{os.getpid()}")
    c.dbname = dbname
    destroy_cluster(c)
    c.start(*conf)
    if create_db and dbname != "postgres":
        with c.connect(dbname="postgres") as conn:
            conn.execute(f"CREATE DATABASE {dbname}")
    return c


def destroy_cluster(c: Cluster) -> None:
    subprocess.run([str(PG_SH), "destroy", c.name], check=False, capture_output=True, env=c.env())


@pytest.fixture(scope="session")
def cluster():
    # The launcher serves only `postgres`, where the extension is not
    # created: no worker ticks in the test databases, so tests that need a
    # tick call tick() themselves (tests/test_claim_restart.py and
    # tests/test_worker.py have clusters whose workers serve every database).
    c = fresh_cluster("", "meshhook_limits.restart_grace = 0", "fsync = off", "meshhook_limits.database = 'postgres'")
    # Supabase's roles, as Supabase creates them.
    with c.connect() as conn:
        conn.execute("""
          DO $$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN CREATE ROLE anon NOLOGIN NOINHERIT; END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN CREATE ROLE authenticated NOLOGIN NOINHERIT; END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS; END IF;
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticator') THEN
              CREATE ROLE authenticator LOGIN NOINHERIT;
              GRANT anon, authenticated, service_role TO authenticator;
            END IF;
          END $$;""")
        conn.execute("CREATE EXTENSION meshhook_limits")
    yield c
    destroy_cluster(c)


@pytest.fixture
def tenant():
    """A fresh tenant id per test: tests share a database, never a tenant."""
    return str(uuid.uuid4())


@pytest.fixture
def admin(cluster):
    with cluster.connect() as c:
        yield c


def set_limit(conn, resource, value, tenant=None, project=None, **kw):
    args = ", ".join(f"{k} => %({k})s" for k in kw)
    conn.execute(
        f"SELECT meshhook_limits.set_limit(%(r)s, %(v)s, %(t)s, %(p)s{', ' + args if args else ''})",
        {"r": resource, "v": value, "t": tenant, "p": project, **kw})


def acquire(conn, tenant, project=None, run_id=None, lease=None):
    return conn.execute(
        "SELECT * FROM meshhook_limits.acquire_execution_slot(%s, %s, %s, %s::interval)",
        (tenant, project, run_id, lease)).fetchone()


def rpc(conn, claims: dict | None, query: str, params=None, role: str = "authenticated"):
    """Exactly what PostgREST does per request: a transaction, SET LOCAL ROLE,
    the JWT claims as a transaction-local setting, then the call."""
    import json
    with conn.transaction():
        conn.execute(f"SET LOCAL ROLE {role}")
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)",
                     (json.dumps(claims) if claims is not None else "",))
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else None


def sqlstate(excinfo) -> str:
    return excinfo.value.sqlstate
