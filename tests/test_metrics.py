"""metrics() and the monitoring stack under docker/, with real components:

(a) `SELECT meshhook_limits.metrics()` after real activity (slots granted,
    refused and revoked, rate limits allowed and denied, metered usage, tracked
    storage, a pgmq queue whose name holds a double quote and a backslash, a
    session whose application_name does too) passes `promtool check metrics`
    with no finding; counters grow with the events; tenant labels can be
    capped and switched off; non-admins get 42501.
(b) Into a real Prometheus: prometheus-postgres-exporter with
    docker/postgres-exporter/queries.yaml, and docker/metrics-http/serve.py
    (the reference for "any SQL exporter calling metrics()"), scraped with
    docker/prometheus/prometheus.yml (targets rewritten to loopback ports,
    intervals to 1 s) and docker/prometheus/rules.yml.
(c) Every panel query (and variable) of docker/grafana/dashboards/meshhook_limits.json
    returns data from that Prometheus.
(d) `promtool test rules docker/prometheus/rules_test.yml`.

Everything runs in a database of its own (pgmq's schema never leaks into other
modules); this module calls tick() itself, the session worker ticks elsewhere.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest

from conftest import PG_BIN, ROOT, PgBouncer, requires, rpc, set_limit, sqlstate

S = "meshhook_limits"
DB = "mlmetrics"
DOCKER = ROOT / "docker"
PGMQ_SQL = ROOT / ".cache" / "pgmq" / "pgmq.sql"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
EXPORTER = shutil.which("prometheus-postgres-exporter") or "/usr/bin/prometheus-postgres-exporter"
HOSTILE_QUEUE = 'hostile"q\\x'           # pgmq refuses $ ; -- and ', not " or \
HOSTILE_APP = 'app "quoted" back\\slash'
PGBOSS_QUEUE = "payments"

pytestmark = requires(all(os.access(p, os.X_OK) for p in (PROMTOOL, PROMETHEUS, EXPORTER)) and PGMQ_SQL.exists()
                      and shutil.which("pgbouncer") is not None,
                      "promtool, prometheus, prometheus-postgres-exporter, pgbouncer and pgmq's SQL")


# --------------------------------------------------------------------------- helpers

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')


def unescape(v: str) -> str:
    return re.sub(r'\\(.)', lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def parse(text: str) -> dict:
    """{(name, ((label, value), ...)): float} of a text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable line: {line!r}"
        name, labels, value = m.groups()
        pairs = tuple(sorted((k, unescape(v)) for k, v in _LABEL.findall(labels or "")))
        out[(name, pairs)] = float(value)
    return out


def val(samples: dict, name: str, **labels) -> float | None:
    want = tuple(sorted(labels.items()))
    return samples.get((name, want))


def series(samples: dict, name: str) -> list[dict]:
    return [dict(k[1]) for k in samples if k[0] == name]


def promtool_findings(text: str) -> str:
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    return (p.stdout + p.stderr).strip() + ("" if p.returncode == 0 else f" (rc={p.returncode})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metrics(conn) -> str:
    return conn.execute(f"SELECT {S}.metrics()").fetchone()[0]


def tick(conn) -> None:
    """One tick, then a pg-boss-shaped sample beside it (pgmq has no failure
    state, so this is the only source of an error ratio here)."""
    conn.execute(f"SELECT {S}.tick()")
    conn.execute(f"""
      INSERT INTO {S}.queue_samples (sampled_at, source, queue, queued, active, failed_recent, oldest_age,
                                     p50_ms, p95_ms, throughput_per_min, error_rate, status)
      SELECT max(sampled_at), 'pgboss', %s, 12, 3, 5, interval '42 seconds', 150, 900, 30, 0.25, 'critical'
        FROM {S}.queue_samples""", (PGBOSS_QUEUE,))


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def mdb(cluster):
    """A database with the extension, pgmq (a hostile queue name), a tracked
    table, a metrics role like docker/db/init.sql's, and two tenants: A is
    busy (a live slot, 95% of a meter, stored rows), B only metered."""
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    role = f"mlm_metrics_{os.getpid()}"
    viewer = f"mlm_viewer_{os.getpid()}"
    with cluster.connect(dbname=DB) as c:
        c.execute(f"CREATE EXTENSION {S}")
        c.execute(f"DROP ROLE IF EXISTS {role}")
        c.execute(f"DROP ROLE IF EXISTS {viewer}")
        c.execute(f"CREATE ROLE {role} LOGIN IN ROLE meshhook_limits_admin, pg_monitor")
        c.execute(f"CREATE ROLE {viewer} LOGIN")
        c.execute("CREATE TABLE docs (tenant_id uuid NOT NULL, body text)")
        c.execute(f"SELECT {S}.track_storage('docs', 'tenant_id')")
    subprocess.run([f"{PG_BIN}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", cluster.host, "-p", str(cluster.port),
                    "-U", "postgres", "-d", DB, "-f", str(PGMQ_SQL)], check=True, capture_output=True, timeout=60)
    with cluster.connect(dbname=DB) as c:
        c.execute("SELECT pgmq.create(%s)", (HOSTILE_QUEUE,))
        for i in range(4):
            c.execute("SELECT pgmq.send(%s, %s::jsonb)", (HOSTILE_QUEUE, json.dumps({"n": i})))
        time.sleep(0.05)
        # Two processed (archived: p50/p95 and throughput), one in flight, one waiting.
        for (msg_id,) in c.execute("SELECT msg_id FROM pgmq.read(%s, 30, 3)", (HOSTILE_QUEUE,)).fetchall()[:2]:
            c.execute("SELECT pgmq.archive(%s, %s::bigint)", (HOSTILE_QUEUE, msg_id))
    # A PgBouncer sampled through dblink, with a client connected through it
    # (a pool is listed from its first client on).
    bouncer = PgBouncer(f"metrics-{os.getpid()}", cluster.port)
    bouncer.start()
    with cluster.connect(dbname=DB) as c:
        c.execute("CREATE EXTENSION dblink")
        c.execute(f"SELECT {S}.add_pooler('edge', %s)", (bouncer.conninfo,))
    pooled = psycopg.connect(f"host=127.0.0.1 port={bouncer.port} user=postgres dbname={DB}",
                             autocommit=True, prepare_threshold=None)
    pooled.execute("SELECT 1")
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    yield {"cluster": cluster, "role": role, "viewer": viewer, "a": a, "b": b, "pooled": pooled}
    pooled.close()
    bouncer.stop()
    with cluster.connect(dbname="postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"DROP ROLE IF EXISTS {role}")
        c.execute(f"DROP ROLE IF EXISTS {viewer}")


@pytest.fixture(scope="module")
def activity(mdb):
    """Real events, with metrics() read before and after (the counters are
    cluster-wide shared memory: compare deltas)."""
    cl, a, b = mdb["cluster"], mdb["a"], mdb["b"]
    conn = cl.connect(dbname=DB)
    app = psycopg.connect(cl.dsn(DB), autocommit=True, application_name=HOSTILE_APP)
    before = parse(metrics(conn))
    set_limit(conn, "concurrent_executions", 2, a)
    set_limit(conn, "requests_per_second", 1, a, burst=1)
    set_limit(conn, "api_calls", 100, a, window_length="1 hour")
    set_limit(conn, "api_calls", 1000, b, window_length="1 hour")
    live = conn.execute(f"SELECT granted, slot_id FROM {S}.acquire_execution_slot(%s, NULL, 'live', '10 minutes')",
                        (a,)).fetchone()
    # 'short' must still count for `refused`, the next statement, however
    # slow the machine: a lease of some seconds, waited out below.
    short = conn.execute(f"SELECT granted, slot_id FROM {S}.acquire_execution_slot(%s, NULL, 'short', '3 seconds')",
                         (a,)).fetchone()
    refused = conn.execute(f"SELECT granted, reason FROM {S}.acquire_execution_slot(%s)", (a,)).fetchone()
    assert live[0] and short[0] and refused == (False, "tenant_limit")
    decisions = [conn.execute(f"SELECT allowed FROM {S}.check_rate_limit(%s, 'api')", (a,)).fetchone()[0]
                 for _ in range(2)]
    assert decisions == [True, False]
    assert conn.execute(f"SELECT status FROM {S}.record_usage(%s, 'api_calls', 95)", (a,)).fetchone()[0] == "warning"
    conn.execute(f"SELECT {S}.record_usage(%s, 'api_calls', 10)", (b,))
    conn.execute("INSERT INTO docs SELECT %s, repeat('x', 1000) FROM generate_series(1, 5)", (a,))
    # The short lease runs out, and is revoked (by this reap, or the worker's).
    deadline = time.monotonic() + 60
    while conn.execute(f"SELECT count(*) FROM {S}.slots() WHERE slot_id = %s AND state = 'live'",
                       (short[1],)).fetchone()[0]:
        assert time.monotonic() < deadline, "the short lease was not revoked"
        time.sleep(0.2)
        conn.execute(f"SELECT {S}.reap_execution_slots()")
    tick(conn)
    after_text = metrics(conn)
    yield {**mdb, "conn": conn, "before": before, "after": parse(after_text), "text": after_text,
           "live_slot": live[1]}
    conn.execute(f"SELECT {S}.release_execution_slot(%s)", (live[1],))
    app.close()
    conn.close()


# --------------------------------------------------------------------------- (a) the exposition

@pytest.mark.smoke
def test_exposition_is_clean_and_counts_events(activity):
    before, after, text, a = activity["before"], activity["after"], activity["text"], activity["a"]
    assert promtool_findings(text) == ""

    def delta(name, **labels):
        return (val(after, name, **labels) or 0) - (val(before, name, **labels) or 0)

    assert delta("meshhook_limits_slot_grants_total") >= 2
    assert delta("meshhook_limits_slot_refusals_total", reason="tenant_limit") >= 1
    assert delta("meshhook_limits_slot_revocations_total", reason="lease_expired") >= 1
    assert delta("meshhook_limits_rate_limit_decisions_total", result="allowed") >= 1
    assert delta("meshhook_limits_rate_limit_decisions_total", result="denied") >= 1
    assert delta("meshhook_limits_worker_ticks_total") >= 1
    assert val(after, "meshhook_limits_slots_live") >= 1

    # Per tenant: live slots (shared memory), limits, usage ratio, stored bytes.
    assert val(after, "meshhook_limits_tenant_slots_live", tenant_id=a) == 1
    assert val(after, "meshhook_limits_tenant_limit", tenant_id=a, resource="concurrent_executions") == 2
    assert val(after, "meshhook_limits_tenant_usage_ratio", tenant_id=a, resource="api_calls") == pytest.approx(0.95)
    assert val(after, "meshhook_limits_tenant_usage_ratio", tenant_id=a,
               resource="concurrent_executions") == pytest.approx(0.5)
    assert val(after, "meshhook_limits_tenant_storage_bytes", tenant_id=a) > 5000

    # Label values with " and \ come back exactly (escaped on the way out).
    q = {"source": "pgmq", "queue": HOSTILE_QUEUE}
    assert val(after, "meshhook_limits_queue_queued", **q) == 1
    assert val(after, "meshhook_limits_queue_active", **q) == 1
    assert val(after, "meshhook_limits_queue_processing_p50_seconds", **q) > 0
    assert val(after, "meshhook_limits_queue_status", status="ok", **q) == 1
    assert val(after, "meshhook_limits_queue_error_ratio", source="pgboss", queue=PGBOSS_QUEUE) == 0.25
    assert val(after, "meshhook_limits_pool_connections_by_application", application=HOSTILE_APP) >= 1
    assert 'queue="hostile\\"q\\\\x"' in text

    # The in-database tenant_near_limit rule (for 0) fired on this tick.
    assert val(after, "meshhook_limits_alerts", rule="tenant_near_limit", severity="warning", state="firing") >= 1


def test_counters_grow_between_scrapes(activity):
    conn, a = activity["conn"], activity["a"]
    first = parse(metrics(conn))
    conn.execute(f"SELECT {S}.check_rate_limit(%s, 'other')", (a,))
    conn.execute(f"SELECT {S}.acquire_execution_slot(%s)", (a,))       # 1 live of 2: granted
    second = parse(metrics(conn))
    allowed = lambda s: val(s, "meshhook_limits_rate_limit_decisions_total", result="allowed")
    assert allowed(second) >= allowed(first) + 1
    grants = lambda s: val(s, "meshhook_limits_slot_grants_total")
    assert grants(second) >= grants(first) + 1    # one live slot of 2: this one is granted
    for (name, labels), v in first.items():
        if name.endswith("_total"):
            assert val(second, name, **dict(labels)) >= v, name
    conn.execute(f"""SELECT {S}.release_execution_slot(slot_id) FROM {S}.slots()
                      WHERE tenant_id = %s AND state = 'live' AND slot_id <> %s""", (a, activity["live_slot"]))


def test_tenant_labels_capped_and_switched_off(activity):
    conn, a, b = activity["conn"], activity["a"], activity["b"]
    tenants = lambda s: {lab["tenant_id"] for (n, ls) in s for lab in [dict(ls)] if "tenant_id" in lab}
    assert {a, b} <= tenants(parse(metrics(conn)))
    try:
        conn.execute("SET meshhook_limits.metrics_max_tenants = 1")
        capped = parse(metrics(conn))
        # The busiest first: a tenant holding live slots (A, unless another
        # module's tenant holds more: the slot table is cluster-wide).
        assert len(tenants(capped)) == 1
        assert tenants(capped) <= {s["tenant_id"] for s in series(capped, "meshhook_limits_tenant_slots_live")}
        assert promtool_findings(metrics(conn)) == ""
        conn.execute("SET meshhook_limits.metrics_tenant_labels = off")
        off = metrics(conn)
        assert promtool_findings(off) == ""
        assert "tenant_id=" not in off
        assert val(parse(off), "meshhook_limits_slot_grants_total") is not None
    finally:
        conn.execute("RESET meshhook_limits.metrics_max_tenants")
        conn.execute("RESET meshhook_limits.metrics_tenant_labels")


@pytest.mark.smoke
def test_metrics_are_for_admins_only(activity):
    cl, a = activity["cluster"], activity["a"]
    with cl.connect(dbname=DB, user=activity["viewer"]) as c:
        with pytest.raises(psycopg.Error) as e:
            metrics(c)
        assert sqlstate(e) == "42501"
    with cl.connect(dbname=DB, user="authenticator") as c:
        with pytest.raises(psycopg.Error) as e:
            rpc(c, {"app_metadata": {"tenant_id": a}}, f"SELECT {S}.metrics()")
        assert sqlstate(e) == "42501"
    with cl.connect(dbname=DB, user=activity["role"]) as c:   # the exporters' role (docker/db/init.sql)
        assert "meshhook_limits_slots_capacity" in metrics(c)


# --------------------------------------------------------------------------- (b) into Prometheus

class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        self.procs.append((name, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True)))

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.tmp / f"{n}.log").read_text()[-2000:] for n, _ in self.procs)

    def stop(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def query(self, expr: str, at: float | None = None) -> list:
        params = {"query": expr, **({"time": str(at)} if at else {})}
        body = json.loads(http_get(f"{self.prom}/api/v1/query?" + urllib.parse.urlencode(params)))
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def label_values(self, label: str, match: str) -> list:
        url = f"{self.prom}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
        return json.loads(http_get(url))["data"]


@pytest.fixture(scope="module")
def stack(activity):
    cl, role = activity["cluster"], activity["role"]
    tmp = Path(tempfile.mkdtemp(prefix="mlm-prom-"))
    st = Stack(tmp)
    try:
        exp_port, shim_port, prom_port = free_port(), free_port(), free_port()
        st.spawn("exporter", [EXPORTER, f"--extend.query-path={DOCKER / 'postgres-exporter' / 'queries.yaml'}",
                              f"--web.listen-address=127.0.0.1:{exp_port}", "--log.level=warn"],
                 env={**os.environ, "DATA_SOURCE_NAME":
                      f"host={cl.host} port={cl.port} user={role} dbname={DB} sslmode=disable"})
        pgenv = {**os.environ, "PGHOST": cl.host, "PGPORT": str(cl.port), "PGUSER": role, "PGDATABASE": DB}
        # System python3 (no psycopg: the psql path) for Prometheus; the venv's (psycopg) checked once below.
        st.spawn("shim", ["/usr/bin/python3", str(DOCKER / "metrics-http" / "serve.py"),
                          "--listen", f"127.0.0.1:{shim_port}"], env=pgenv)
        st.shim2 = free_port()
        st.spawn("shim-psycopg", [sys.executable, str(DOCKER / "metrics-http" / "serve.py"),
                                  "--listen", f"127.0.0.1:{st.shim2}"], env=pgenv)
        st.exporter, st.shim = f"http://127.0.0.1:{exp_port}", f"http://127.0.0.1:{shim_port}"

        # docker/prometheus/prometheus.yml with loopback targets and 1 s intervals; rules.yml beside it.
        cfg = (DOCKER / "prometheus" / "prometheus.yml").read_text()
        for old, new in [("scrape_interval: 15s", "scrape_interval: 1s"),
                         ("evaluation_interval: 15s", "evaluation_interval: 1s"),
                         ('"metrics-http:9188"', f'"127.0.0.1:{shim_port}"'),
                         ('"postgres-exporter:9187"', f'"127.0.0.1:{exp_port}"')]:
            assert cfg.count(old) == 1, old
            cfg = cfg.replace(old, new)
        (tmp / "prometheus.yml").write_text(cfg)
        shutil.copy(DOCKER / "prometheus" / "rules.yml", tmp / "rules.yml")
        st.spawn("prometheus", [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                                "--log.level=warn"])
        st.prom = f"http://127.0.0.1:{prom_port}"
        deadline = time.time() + 30
        while True:
            try:
                if all(st.query(q) for q in ['meshhook_limits_slots_capacity{job="meshhook_limits"}',
                                             'meshhook_limits_pgx_slots_capacity{job="postgres_exporter"}']):
                    break
            except OSError:
                pass
            dead = [n for n, p in st.procs if p.poll() is not None]
            assert not dead and time.time() < deadline, f"stack not scraping (dead: {dead})\n{st.logs()}"
            time.sleep(0.3)
        yield st
    finally:
        st.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_both_scrape_paths_reach_prometheus(stack, activity):
    a = activity["a"]
    for job in ("meshhook_limits", "postgres_exporter"):
        assert [r["value"][1] for r in stack.query(f'up{{job="{job}"}}')] == ["1"], job
    # The exporter loaded the queries file and every query ran.
    assert stack.query("max(pg_exporter_user_queries_load_error)")[0]["value"][1] == "0"
    assert stack.query("max(pg_exporter_last_scrape_error)")[0]["value"][1] == "0"

    # The same facts from both paths, with the hostile queue name intact.
    for name in ("meshhook_limits_queue_queued", "meshhook_limits_pgx_queue_queued"):
        got = {r["metric"]["queue"]: r["value"][1] for r in stack.query(f'{name}{{source="pgmq"}}')}
        assert got == {HOSTILE_QUEUE: "1"}, name
    for name in ('meshhook_limits_tenant_limit{resource="concurrent_executions"}',
                 'meshhook_limits_pgx_tenant_limit_value{resource="concurrent_executions"}'):
        got = [r["value"][1] for r in stack.query(name.replace("{", f'{{tenant_id="{a}",'))]
        assert got == ["2"], name
    assert stack.query(f'meshhook_limits_pgx_tenant_usage_ratio{{tenant_id="{a}",resource="api_calls"}}')[0][
        "value"][1] == "0.95"
    assert stack.query('meshhook_limits_pgx_rate_limit_denied_total')[0]["value"][1] != "0"
    assert stack.query(f'meshhook_limits_pgx_tenant_slots_live{{tenant_id="{a}"}}')[0]["value"][1] == "1"

    # rules.yml, evaluated by Prometheus: tenant_near_limit fires for tenant A (for 0).
    deadline = time.time() + 10
    while not stack.query(f'ALERTS{{alertname="MeshhookTenantNearLimit",alertstate="firing",tenant_id="{a}"}}'):
        assert time.time() < deadline, stack.query("ALERTS")
        time.sleep(0.5)

    # The exporter's own families for meshhook_limits pass promtool's lint too,
    # and the psycopg flavour of the shim serves a clean exposition.
    findings = promtool_findings(http_get(f"{stack.exporter}/metrics"))
    assert [f for f in findings.splitlines() if "meshhook" in f] == []
    assert promtool_findings(http_get(f"http://127.0.0.1:{stack.shim2}/metrics")) == ""


# --------------------------------------------------------------------------- (c) the dashboard

def dashboard_exprs() -> tuple[list, list]:
    dash = json.loads((DOCKER / "grafana" / "dashboards" / "meshhook_limits.json").read_text())
    panels, exprs = [], []
    for p in dash["panels"]:
        for sub in [p, *p.get("panels", [])]:
            if sub["type"] == "row":
                continue
            panels.append(sub)
            assert sub.get("targets"), f"panel without a query: {sub['title']}"
            for t in sub["targets"]:
                assert t.get("expr"), f"panel target without PromQL: {sub['title']}"
                exprs.append((sub["title"], t["refId"], t["expr"]))
    variables = [v for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs, variables


def grafana_subst(expr: str) -> str:
    for var in ("cluster", "tenant", "queue"):
        expr = expr.replace(f"${var}", ".*")     # the variables' "All" (allValue .*)
    return expr.replace("$__rate_interval", "30s")


def test_every_dashboard_query_returns_data(stack, activity):
    exprs, variables = dashboard_exprs()
    assert len(exprs) >= 30
    conn, a = activity["conn"], activity["a"]
    deadline = time.time() + 25
    while True:
        # Keep things happening: rates need samples that move.
        conn.execute(f"SELECT {S}.check_rate_limit(%s, 'dash')", (a,))
        activity["pooled"].execute("SELECT 1")  # pooled transactions: a rate that moves
        tick(conn)
        empty = [(title, ref, e) for title, ref, e in exprs if not stack.query(grafana_subst(e))]
        if not empty or time.time() > deadline:
            break
        time.sleep(1)
    assert empty == [], "panel queries without data:\n" + "\n".join(map(str, empty))
    for v in variables:
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"])
        assert m, v["query"]
        assert stack.label_values(m.group(2), grafana_subst(m.group(1))), v["name"]
    assert a in stack.label_values("tenant_id", "meshhook_limits_tenant_limit")
    assert HOSTILE_QUEUE in stack.label_values("queue", "meshhook_limits_queue_queued")


# --------------------------------------------------------------------------- (d) rules unit tests

def test_promtool_rules():
    p = subprocess.run([PROMTOOL, "test", "rules", str(DOCKER / "prometheus" / "rules_test.yml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    p = subprocess.run([PROMTOOL, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
