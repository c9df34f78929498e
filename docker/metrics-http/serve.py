#!/usr/bin/env python3
"""The minimal reference for "any SQL-based exporter calling metrics()":
per scrape, run `SELECT meshhook_limits.metrics()` and serve the text as is
on /metrics. sql_exporter, pgmetrics-style collectors or a sidecar of your own
do the same: one query, one text column, no parsing (the function already
speaks the Prometheus text format, version 0.0.4).

Connection: the libpq variables (PGHOST, PGPORT, PGUSER, PGPASSWORD,
PGDATABASE). The role needs read-only monitoring rights: membership of
meshhook_limits_monitor (or pg_monitor). Uses psycopg when importable, else psql.
  serve.py [--listen HOST:PORT]        (default 0.0.0.0:9188)
"""
import argparse, subprocess, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

QUERY = "SELECT meshhook_limits.metrics()"

def scrape() -> str:
    try:
        import psycopg
    except ImportError:
        return subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", QUERY], check=True,
                              capture_output=True, text=True, timeout=30).stdout.rstrip("\n") + "\n"
    with psycopg.connect("", autocommit=True, connect_timeout=10) as conn:
        return conn.execute(QUERY).fetchone()[0]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] != "/metrics":
            code, ctype, body = 404, "text/plain", "try /metrics\n"
        else:
            try:
                code, ctype, body = 200, "text/plain; version=0.0.4; charset=utf-8", scrape()
            except Exception as e:  # the scrape fails loudly: Prometheus marks the target down (up = 0)
                err = getattr(e, "stderr", None) or str(e)
                code, ctype, body = 500, "text/plain", f"metrics() failed: {err}\n"
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):  # quiet: one line per failure only
        if not args or str(args[1]) != "200":
            sys.stderr.write("%s %s\n" % (self.address_string(), fmt % args))

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", default="0.0.0.0:9188")
    host, port = ap.parse_args().listen.rsplit(":", 1)
    ThreadingHTTPServer((host, int(port)), Handler).serve_forever()
