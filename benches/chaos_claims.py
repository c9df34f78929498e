#!/usr/bin/env python3
"""Chaos for claiming (issue 18): workers outside PostgreSQL claim jobs from a
bound pg-boss queue and a bound pgmq queue, hold them a while and finish
them, while the server is crashed (kill -9 of a backend) or restarted
(pg_ctl restart -m fast) again and again. Every job a worker holds is in a
ledger kept by this process (the workers' own view: in once its claim has
returned, out just before its complete is sent, so the ledger never counts
more than the database holds); after every claim the ledger is counted per
tenant, per concurrency key and in total. The run fails if any count ever
exceeds its limit.

    .venv/bin/python benches/chaos_claims.py [--rounds 6] [--workers 6] [--pgboss 11|12]

Needs what `make test` sets up (scripts/setup.sh --test). Bounded: it stops
after --rounds crashes/restarts, and every request goes to a server on a
local socket. Not part of `make test` (it takes a few minutes).
"""
import argparse
import json
import os
import random
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import psycopg  # noqa: E402

from conftest import destroy_cluster, fresh_cluster  # noqa: E402
from test_claim import send  # noqa: E402
from test_queues import PGBOSS_MAJOR, boss, install_pgmq  # noqa: E402

S = "meshhook_limits"
TENANTS = [str(uuid.UUID(int=i + 1)) for i in range(5)]
KEYS = ["k0", "k1", "k2"]
TENANT_LIMIT, KEY_LIMIT, TOTAL_LIMIT = 3, 2, 10


class Ledger:
    def __init__(self):
        self.lock = threading.Lock()
        self.held = {}            # job -> (tenant, key)
        self.max_tenant = Counter()
        self.max_key = Counter()
        self.max_total = 0
        self.claims = 0
        self.violations = []

    def claimed(self, jobs):
        with self.lock:
            for j in jobs:
                self.held[j["id"]] = (j["tenant"], j["key"])
                self.claims += 1
            tenants = Counter(t for t, _ in self.held.values())
            keys = Counter((t, k) for t, k in self.held.values())
            for t, n in tenants.items():
                self.max_tenant[t] = max(self.max_tenant[t], n)
                if n > TENANT_LIMIT:
                    self.violations.append(f"tenant {t} held {n} > {TENANT_LIMIT}")
            for tk, n in keys.items():
                self.max_key[tk] = max(self.max_key[tk], n)
                if n > KEY_LIMIT:
                    self.violations.append(f"key {tk} held {n} > {KEY_LIMIT}")
            self.max_total = max(self.max_total, len(self.held))
            if len(self.held) > TOTAL_LIMIT:
                self.violations.append(f"total held {len(self.held)} > {TOTAL_LIMIT}")

    def finished(self, job):
        with self.lock:
            self.held.pop(job, None)


def worker(c, db, stop, ledger, queues, seed):
    rnd = random.Random(seed)
    conn = None
    mine = []                     # jobs this worker holds: (source, queue, id)
    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(c.dsn(db), autocommit=True, connect_timeout=5)
            if mine and (rnd.random() < 0.5 or len(mine) >= 3):
                # Out of the ledger just before the complete is sent, so the
                # ledger never counts more than the database holds (a claim
                # admitted into the room the complete frees is counted after
                # it). If the server went away meanwhile, the complete is sent
                # again after the reconnect (a second try of a committed one
                # changes nothing).
                source, q, job = mine[0]
                ledger.finished(job)
                if source == "pgboss":
                    conn.execute("UPDATE pgboss.job SET completed_on = now(), state = 'completed' "
                                 "WHERE name = %s AND id = %s AND state = 'active'", (q, job))
                else:
                    conn.execute("SELECT pgmq.archive(%s, %s::bigint)", (q, int(job)))
                mine.pop(0)
                continue
            source, q = rnd.choice(queues)
            rows = conn.execute(f"SELECT job_id, tenant_id::text, concurrency_key FROM {S}.claim_jobs(%s, %s, %s, "
                                "'10 minutes')", (source, q, rnd.randint(1, 3))).fetchall()
            ledger.claimed([{"id": r[0], "tenant": r[1], "key": r[2]} for r in rows])
            mine += [(source, q, r[0]) for r in rows]
            time.sleep(rnd.uniform(0, 0.05))
        except psycopg.Error:
            # The server is crashing or restarting: the jobs this worker
            # holds stay held (it finishes them once it can reconnect).
            conn = None
            time.sleep(0.2)
    if conn is not None:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workers", type=int, default=6)
    ap.add_argument("--pgboss", type=int, default=11, choices=[11, 12])
    ap.add_argument("--seconds-between", type=float, default=4.0)
    args = ap.parse_args()
    c = fresh_cluster("chaos", "meshhook_limits.restart_grace = '60s'", "fsync = off",
                      "meshhook_limits.sample_interval = '200ms'")
    db = "chaos"
    PGBOSS_MAJOR[db] = args.pgboss
    try:
        with c.connect(dbname="postgres") as conn:
            conn.execute(f"CREATE DATABASE {db}")
        with c.connect(dbname=db) as conn:
            conn.execute(f"CREATE EXTENSION {S}")
        install_pgmq(c, db)
        boss(c, db, "start")
        boss(c, db, "create-queue", name="jobs", options={})
        with c.connect(dbname=db) as conn:
            conn.execute("SELECT pgmq.create('mjobs')")
            for t in TENANTS:
                conn.execute(f"SELECT {S}.set_limit('concurrent_executions', %s, %s)", (TENANT_LIMIT, t))
            for k in KEYS:
                conn.execute(f"SELECT {S}.set_limit(%s, %s)", (f"concurrent_executions.{k}", KEY_LIMIT))
            conn.execute(f"SELECT {S}.set_limit('concurrent_executions_total', %s)", (TOTAL_LIMIT,))
            conn.execute(f"SELECT {S}.bind_queue('pgboss', 'jobs', key_path => 'key')")
            conn.execute(f"SELECT {S}.bind_queue('pgmq', 'mjobs', key_path => 'key')")
            datas = [{"tenant_id": random.choice(TENANTS), "key": random.choice(KEYS)} for _ in range(3000)]
            send(c, db, "jobs", datas)
            conn.execute("SELECT pgmq.send_batch('mjobs', %s::jsonb[])", ([json.dumps(d) for d in datas],))
        ledger, stop = Ledger(), threading.Event()
        queues = [("pgboss", "jobs"), ("pgmq", "mjobs")]
        threads = [threading.Thread(target=worker, args=(c, db, stop, ledger, queues, i))
                   for i in range(args.workers)]
        for t in threads:
            t.start()
        for r in range(args.rounds):
            time.sleep(args.seconds_between)
            how = "crash" if r % 2 == 0 else "restart"
            before = ledger.claims
            if how == "crash":
                with c.connect(dbname="postgres") as conn:
                    victim = conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = "
                                          "'client backend' AND pid <> pg_backend_pid() LIMIT 1").fetchone()
                if victim:
                    os.kill(victim[0], 9)
                time.sleep(0.3)
                c.wait_ready(60)
            else:
                c.restart("fast")
            print(f"round {r + 1}: {how}; {before} claims so far, {len(ledger.held)} held", flush=True)
        time.sleep(args.seconds_between)
        stop.set()
        for t in threads:
            t.join()
        print(f"claims: {ledger.claims}")
        print(f"max held per tenant: {max(ledger.max_tenant.values(), default=0)} (limit {TENANT_LIMIT})")
        print(f"max held per key:    {max(ledger.max_key.values(), default=0)} (limit {KEY_LIMIT})")
        print(f"max held in total:   {ledger.max_total} (limit {TOTAL_LIMIT})")
        if ledger.violations:
            print("OVER THE LIMIT:", *sorted(set(ledger.violations)), sep="\n  ")
            return 1
        print("never over a limit")
        return 0
    finally:
        destroy_cluster(c)


if __name__ == "__main__":
    sys.exit(main())
