#!/usr/bin/env node
// Worker loads for benches/claim.sh: limit-aware fair claiming
// (meshhook_limits.claim_jobs) against real pg-boss 11 or 12 (PGBOSS_MAJOR=12;
// tests/node/node_modules)
// and pgmq, side by side with the queues' own fetch. One Node process runs W
// concurrent worker loops over pg-boss's own connection pool (pgmq: a pg
// pool of the same size); every statement is its own autocommit transaction.
//
//   node benches/claim_load.mjs CONN init --queue Q
//   node benches/claim_load.mjs CONN noisy --queue Q --arm claim|fetch|naive [options]
//   node benches/claim_load.mjs CONN weights --queue Q --weights 1,2,4 [options]
//   node benches/claim_load.mjs CONN throughput --queue Q --arm fetch|claim|claimrel|group [options]
//   node benches/claim_load.mjs CONN pgmq-throughput --queue Q --arm read|claim|claimrel [options]
//   node benches/claim_load.mjs CONN send|pgmq-send --queue Q [--workers W --tenants N --seconds S --warmup S]
//
// CONN is libpq-style: "host=/tmp/x port=5432 user=postgres dbname=db".
// Output: one JSON object on stdout; exit 1 on any error.
//
// The worker loops (one job in hand per loop with --batch 1):
//   claim     SELECT … FROM meshhook_limits.claim_jobs(source, Q, batch)
//             → sleep --run-ms → boss.complete(Q, ids) (pgmq: pgmq.archive);
//             the extension ends the slot with the job (the trigger
//             bind_queue puts on the queue table, or the worker's tick);
//             with --release 1 also SELECT release_execution_slot(slot)
//             for each, right after the complete
//   claimrel  (throughput) claim with the explicit release
//   group     (noisy and throughput, pg-boss 12) boss.fetch(Q, { batchSize, groupConcurrency:
//             --limit }) with each job in its tenant's group: pg-boss 12's
//             own per-group limit → sleep → boss.complete
//   fetch     boss.fetch(Q, { batchSize }) → sleep → boss.complete: plain
//             FIFO, no limits (pgmq `read`: pgmq.read(Q, vt, n) → archive)
//   naive     what a team writes today on pg-boss: boss.fetch(Q) →
//             acquire_execution_slot(tenant, NULL, job id) → granted: run,
//             complete, release; refused: put the job back, fetchable again
//             after the refusal's retry_after (--putback update: one UPDATE
//             back to state 'created', started_on NULL, start_after =
//             now() + retry_after, which keeps the job's created_on and so
//             its FIFO place and its retry count — pg-boss has no "defer"
//             call; --putback fail: boss.fail(), pg-boss's own retry, with the
//             jobs sent with retryLimit 1e6 and retryDelay --retry-delay s).
//             Every refusal is counted (churn).
// An empty claim or fetch sleeps --poll-ms before the next try.
//
// noisy: tenant A (--noisy-jobs, 0 = absent) is enqueued first with
//   boss.insert in chunks of 1000; the loops start; after --quiet-delay s the
//   --quiet-tenants quiet tenants enqueue --quiet-jobs each (one boss.insert
//   per tenant, one after the other). It stops when every quiet job is done or
//   --cap s after the quiet enqueue, lets the loops finish the job in hand,
//   and reports each job's wait (pgboss.job started_on − created_on) from the
//   database: percentiles over the quiet jobs (jobs never started count as
//   waiting at least until the stop), per tenant, A's progress, refusals.
//   --analyze 1: ANALYZE pgboss.job after A's enqueue (weights: after the
//   enqueue), so that the planner knows the queue is no longer empty.
// weights: --jobs per tenant (tenants 101.., one per weight) enqueued in
//   round-robin chunks; the loops claim/run/complete for --warmup +
//   --seconds; each tenant's share of the cost claimed in the measured
//   window (job cost: data.cost, 1 unless --cost-max > 1, then uniform
//   1..cost-max) against weight / sum(weights); also the time-averaged
//   running cost per tenant. Jobs still waiting per tenant at the end tell
//   whether every tenant stayed saturated.
// throughput / pgmq-throughput: the loops run with no sleep for --warmup +
//   --seconds; jobs completed (archived) in the measured window per second.
//   The queue is filled by the caller (a backlog), or with --produce 1 each
//   iteration first sends --batch jobs of --tenants tenants (boss.insert,
//   pgmq.send_batch), so the queue stays short.
// send / pgmq-send: enqueue cost (benches/enqueue.sh): W loops send one job
//   each (boss.send(Q, data) / SELECT pgmq.send(Q, data)) of tenants
//   1..--tenants in turn, with no sleep, for --warmup + --seconds; jobs sent
//   in the measured window per second.
//
// Over-admission checks, in every arm that takes slots: (1) in the process,
// the jobs each tenant has in hand (counted up when a claim returns, down
// just before its complete is sent, so never above what the database holds);
// (2) a sampler on its own connection reading
//   SELECT tenant_id, count(*) FROM meshhook_limits.slots() WHERE state = 'live' GROUP BY 1
// every --sample-ms ms. Both maxima are reported against --limit (per
// tenant) and --total (all tenants).
import { createRequire } from 'node:module'
import { loadPgBoss, parseConn, quietOptions, runAsJson } from '../tests/node/conn.mjs'

const require = createRequire(new URL('../tests/node/package.json', import.meta.url))
// pg-boss 11.1.2, or 12.38.1 with PGBOSS_MAJOR=12 (tests/node/conn.mjs).
const { PgBoss, major: PGBOSS_MAJOR } = await loadPgBoss()
const pg = require('pg')

const TEXT_OPTIONS = new Set(['queue', 'arm', 'putback', 'weights', 'source'])

function parseArgs (argv) {
  const o = {
    queue: '', arm: '', putback: 'update', weights: '1,2,4', source: 'pgboss',
    workers: 8, batch: 1, runMs: 20, pollMs: 5, sampleMs: 100,
    noisyJobs: 20000, quietTenants: 10, quietJobs: 200, quietDelay: 2, cap: 120,
    limit: 0, total: 0, release: 0, retryDelay: 5,
    jobs: 20000, costMax: 1, seconds: 60, warmup: 5, vt: 30, produce: 0, tenants: 100, analyze: 0
  }
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase())
    if (!(k in o)) throw new Error(`unknown option ${argv[i]}`)
    if (TEXT_OPTIONS.has(k)) {
      if (!/^[A-Za-z0-9_,.-]+$/.test(argv[i + 1] ?? '')) throw new Error(`bad value for ${argv[i]}: ${argv[i + 1]}`)
      o[k] = argv[i + 1]
      continue
    }
    const v = Number(argv[i + 1])
    if (!Number.isFinite(v) || v < 0) throw new Error(`bad value for ${argv[i]}: ${argv[i + 1]}`)
    o[k] = v
  }
  if (!o.queue) throw new Error('--queue is required')
  return o
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))
const tenant = n => `00000000-0000-4000-8000-${String(n).padStart(12, '0')}`
const NOISY = tenant(1000)
const round = (x, d = 3) => x == null ? null : Math.round(x * 10 ** d) / 10 ** d
function percentile (sorted, p) { // nearest rank; sorted ascending
  if (!sorted.length) return null
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))]
}

// --- claiming, one interface over the arms ----------------------------------------
// A "source" gives take(batch) → [{id, tenant, slot, cost}], done(jobs) (complete
// or archive), and for naive putBack(jobs, retryAfterSeconds[]).
function pgbossSource (boss, q, fetchOptions = {}) {
  const db = boss.getDb()
  return {
    db,
    async claim (batch) {
      const { rows } = await db.executeSql(
        'SELECT job_id, tenant_id, slot_id, data FROM meshhook_limits.claim_jobs($1, $2, $3)', ['pgboss', q, batch])
      return rows.map(r => ({ id: r.job_id, tenant: r.tenant_id, slot: r.slot_id, cost: Number(r.data?.cost ?? 1) }))
    },
    async fetch (batch) {
      const jobs = await boss.fetch(q, { ...fetchOptions, batchSize: batch })
      return jobs.map(j => ({ id: j.id, tenant: j.data?.tenant_id, slot: null, cost: Number(j.data?.cost ?? 1) }))
    },
    async done (jobs) {
      const r = await boss.complete(q, jobs.map(j => j.id))
      return r.affected
    },
    async produce (datas) {
      // With groupConcurrency: each job in its tenant's group.
      const group = fetchOptions.groupConcurrency ? data => ({ group: { id: data.tenant_id } }) : () => ({})
      await boss.insert(q, datas.map(data => ({ data, ...group(data) })))
    },
    async putBack (jobs, retryAfter, mode) {
      if (mode === 'fail') {
        await boss.fail(q, jobs.map(j => j.id), { message: 'concurrency limit' })
        return
      }
      await db.executeSql(
        `UPDATE pgboss.job j SET state = 'created', started_on = NULL,
                start_after = now() + make_interval(secs => r.after)
           FROM unnest($2::uuid[], $3::float8[]) AS r(id, after)
          WHERE j.name = $1 AND j.id = r.id AND j.state = 'active'`,
        [q, jobs.map(j => j.id), retryAfter])
    }
  }
}

function pgmqSource (pool, q, vt) {
  const db = { executeSql: (text, values) => pool.query(text, values) }
  return {
    db,
    async claim (batch) {
      const { rows } = await pool.query(
        'SELECT job_id, tenant_id, slot_id, data FROM meshhook_limits.claim_jobs($1, $2, $3)', ['pgmq', q, batch])
      return rows.map(r => ({ id: r.job_id, tenant: r.tenant_id, slot: r.slot_id, cost: 1 }))
    },
    async fetch (batch) {
      const { rows } = await pool.query('SELECT msg_id, message FROM pgmq.read($1, $2, $3)', [q, vt, batch])
      return rows.map(r => ({ id: r.msg_id, tenant: r.message?.tenant_id, slot: null, cost: 1 }))
    },
    async done (jobs) {
      const { rows } = await pool.query('SELECT count(*)::int AS n FROM pgmq.archive($1, $2::bigint[])', [q, jobs.map(j => j.id)])
      return rows[0].n
    },
    async produce (datas) {
      await pool.query('SELECT count(*) FROM pgmq.send_batch($1, $2::jsonb[])', [q, datas.map(d => JSON.stringify(d))])
    }
  }
}

async function releaseSlots (db, slots) {
  if (!slots.length) return 0
  const { rows } = await db.executeSql(
    'SELECT count(*) FILTER (WHERE NOT meshhook_limits.release_execution_slot(s)) AS missing FROM unnest($1::uuid[]) s',
    [slots])
  return Number(rows[0].missing)
}

// --- counters shared by the loops -------------------------------------------------
function makeStats (o) {
  return {
    claims: 0,
    emptyClaims: 0,
    claimed: 0,
    completed: 0,
    completeMismatch: 0,
    releaseMissing: 0,
    refusals: 0,
    claimedBy: {}, // tenant → jobs
    completedBy: {},
    costBy: {}, // tenant → cost claimed in the measured window
    inHand: {}, // tenant → jobs claimed and not yet released (or completed, without slots)
    inHandCost: {},
    maxInHand: {},
    maxInHandTotal: 0,
    inHandTotal: 0,
    busyIntegral: {}, // tenant → ∫ cost in hand dt over the measured window (ms)
    lastT: 0,
    errors: []
  }
}
function addTo (m, k, v) { m[k] = (m[k] ?? 0) + v }

// The running cost integral: call before every change of inHandCost.
function integrate (s, inWindow) {
  const now = Date.now()
  if (s.lastT && inWindow(s.lastT)) {
    for (const [t, c] of Object.entries(s.inHandCost)) addTo(s.busyIntegral, t, c * (now - s.lastT))
  }
  s.lastT = now
}

function taken (s, jobs, inWindow) {
  integrate(s, inWindow)
  for (const j of jobs) {
    addTo(s.inHand, j.tenant, 1)
    addTo(s.inHandCost, j.tenant, j.cost)
    s.inHandTotal += 1
    s.maxInHand[j.tenant] = Math.max(s.maxInHand[j.tenant] ?? 0, s.inHand[j.tenant])
  }
  s.maxInHandTotal = Math.max(s.maxInHandTotal, s.inHandTotal)
}
function given (s, jobs, inWindow) {
  integrate(s, inWindow)
  for (const j of jobs) {
    addTo(s.inHand, j.tenant, -1)
    addTo(s.inHandCost, j.tenant, -j.cost)
    // Only the tenants in hand: integrate() walks them on every change (with
    // 10,000 tenants, keeping the others made this process the bottleneck).
    if (s.inHandCost[j.tenant] === 0) delete s.inHandCost[j.tenant]
    s.inHandTotal -= 1
  }
}

// One loop: take jobs (claim, fetch or the naive fetch + acquire), "run" them,
// finish them; until stop() says so (checked between jobs only, so a job in
// hand is always finished).
async function loop (src, o, arm, s, stop, inWindow = () => true) {
  const release = arm === 'claimrel' || (arm === 'claim' && o.release)
  while (!stop()) {
    let jobs
    if (arm === 'claim' || arm === 'claimrel') {
      jobs = await src.claim(o.batch)
    } else {
      jobs = await src.fetch(o.batch)
    }
    s.claims++
    if (!jobs.length) {
      s.emptyClaims++
      if (o.pollMs) await sleep(o.pollMs)
      continue
    }
    let slots = jobs.map(j => j.slot)
    if (arm === 'naive') {
      const refused = []
      const after = []
      const granted = []
      slots = []
      for (const j of jobs) {
        const { rows: [a] } = await src.db.executeSql(
          `SELECT granted, slot_id, extract(epoch FROM retry_after)::float8 AS after
             FROM meshhook_limits.acquire_execution_slot($1::uuid, NULL, $2)`, [j.tenant, String(j.id)])
        if (a.granted) {
          granted.push(j)
          slots.push(a.slot_id)
        } else {
          refused.push(j)
          after.push(a.after ?? 1)
        }
      }
      if (refused.length) {
        s.refusals += refused.length
        await src.putBack(refused, after, o.putback)
      }
      jobs = granted
      if (!jobs.length) continue
    }
    taken(s, jobs, inWindow)
    s.claimed += jobs.length
    const t = Date.now()
    for (const j of jobs) {
      addTo(s.claimedBy, j.tenant, 1)
      if (inWindow(t)) addTo(s.costBy, j.tenant, j.cost)
    }
    if (o.runMs) await sleep(o.runMs)
    // Counted down before the complete is sent: the slot may end in the
    // complete's transaction (the claim trigger), never before it.
    given(s, jobs, inWindow)
    const n = await src.done(jobs)
    if (n !== jobs.length) s.completeMismatch += jobs.length - n
    s.completed += n
    for (const j of jobs) addTo(s.completedBy, j.tenant, 1)
    if (arm === 'naive' || release) s.releaseMissing += await releaseSlots(src.db, slots.filter(Boolean))
  }
}

// The sampler of live slots per tenant, on its own connection.
function slotSampler (conn, ms) {
  const client = new pg.Client(parseConn(conn))
  const max = {}
  let maxTotal = 0
  let maxTickMs = 0
  let samples = 0
  let running = true
  const done = (async () => {
    await client.connect()
    while (running) {
      const { rows } = await client.query(
        "SELECT tenant_id::text AS t, count(*)::int AS n FROM meshhook_limits.slots() WHERE state = 'live' GROUP BY 1")
      let total = 0
      for (const r of rows) {
        max[r.t] = Math.max(max[r.t] ?? 0, r.n)
        total += r.n
      }
      maxTotal = Math.max(maxTotal, total)
      // The extension's worker: its last tick, which ends claimed jobs' slots.
      const { rows: [w] } = await client.query('SELECT last_tick_ms::float8 AS ms FROM meshhook_limits.worker_state')
      maxTickMs = Math.max(maxTickMs, w?.ms ?? 0)
      samples++
      await sleep(ms)
    }
    await client.end()
  })()
  return {
    async stop () { running = false; await done; return { max, maxTotal, maxTickMs, samples } }
  }
}

function overAdmission (o, s, sampled) {
  const out = []
  if (o.limit) {
    for (const [t, n] of Object.entries(s.maxInHand)) if (n > o.limit) out.push(`tenant ${t} had ${n} jobs in hand (limit ${o.limit})`)
    for (const [t, n] of Object.entries(sampled?.max ?? {})) if (n > o.limit) out.push(`tenant ${t} had ${n} live slots (limit ${o.limit})`)
  }
  if (o.total) {
    if (s.maxInHandTotal > o.total) out.push(`${s.maxInHandTotal} jobs in hand in all (total limit ${o.total})`)
    if ((sampled?.maxTotal ?? 0) > o.total) out.push(`${sampled.maxTotal} live slots in all (total limit ${o.total})`)
  }
  return out
}

// group: each job in its tenant's pg-boss 12 group (groupConcurrency).
async function insertChunks (boss, q, rows, options = {}, group = false) {
  for (let i = 0; i < rows.length; i += 1000) {
    await boss.insert(q, rows.slice(i, i + 1000).map(data => ({
      data, ...options, ...(group ? { group: { id: data.tenant_id } } : {})
    })))
  }
}

// --- noisy neighbour ---------------------------------------------------------------
async function noisy (boss, conn, o) {
  const q = o.queue
  // group: pg-boss 12's own per-group limit, each tenant a group of --limit.
  const group = o.arm === 'group'
  if (group && PGBOSS_MAJOR < 12) throw new Error('--arm group needs pg-boss 12 (PGBOSS_MAJOR=12)')
  const src = pgbossSource(boss, q, group ? { groupConcurrency: o.limit } : {})
  const db = src.db
  const quiet = Array.from({ length: o.quietTenants }, (_, i) => tenant(i + 1))
  const quietTotal = o.quietTenants * o.quietJobs
  const jobOptions = o.arm === 'naive' && o.putback === 'fail' ? { retryLimit: 1000000, retryDelay: o.retryDelay } : {}
  const t0 = Date.now()
  await insertChunks(boss, q, Array.from({ length: o.noisyJobs }, () => ({ tenant_id: NOISY, bench: 'a' })), jobOptions, group)
  const enqueueNoisyS = (Date.now() - t0) / 1000
  if (o.analyze) await db.executeSql('ANALYZE pgboss.job')

  const s = makeStats(o)
  const sampler = o.arm === 'fetch' || group ? null : slotSampler(conn, o.sampleMs)
  let quietAt = 0
  let stopAt = Infinity
  let quietDone = 0
  const start = Date.now()
  const stop = () => Date.now() >= stopAt
  const countQuiet = () => quiet.reduce((a, t) => a + (s.completedBy[t] ?? 0), 0)
  const conductor = (async () => {
    await sleep(o.quietDelay * 1000)
    quietAt = Date.now()
    for (const t of quiet) await insertChunks(boss, q, Array.from({ length: o.quietJobs }, () => ({ tenant_id: t, bench: 'q' })), jobOptions, group)
    stopAt = quietAt + o.cap * 1000
    while (!stop()) {
      quietDone = countQuiet()
      if (quietDone >= quietTotal) { stopAt = Date.now(); break }
      await sleep(20)
    }
  })()
  await Promise.all([conductor, ...Array.from({ length: o.workers }, () => loop(src, o, o.arm, s, stop))])
  const stoppedAt = Date.now()
  const sampled = sampler ? await sampler.stop() : null
  quietDone = countQuiet()

  // Waits from the database: started_on − created_on of every quiet job;
  // jobs not started count as waiting until the stop (a lower bound).
  const { rows } = await db.executeSql(
    `SELECT data->>'tenant_id' AS t, state::text AS state,
            extract(epoch FROM started_on - created_on)::float8 AS wait,
            extract(epoch FROM to_timestamp($2::float8 / 1000) - created_on)::float8 AS age
       FROM pgboss.job WHERE name = $1 AND data->>'bench' = 'q'`, [q, stoppedAt])
  const waits = []
  const byTenant = {}
  let censored = 0
  for (const r of rows) {
    const started = r.state === 'completed' || r.state === 'active'
    const w = started ? r.wait : Infinity
    if (!started) censored++
    waits.push(w);
    (byTenant[r.t] ??= []).push(w)
  }
  const sorted = waits.sort((a, b) => a - b)
  const maxAge = rows.reduce((a, r) => Math.max(a, r.age), 0)
  const fmt = x => x === Infinity ? null : round(x)
  const perTenantP95 = Object.values(byTenant).map(ws => percentile(ws.sort((a, b) => a - b), 0.95))
  const { rows: [a] } = await db.executeSql(
    `SELECT count(*) FILTER (WHERE state = 'completed')::int AS done,
            count(*) FILTER (WHERE state = 'completed' AND completed_on >= to_timestamp($2::float8 / 1000))::int AS done_while_quiet
       FROM pgboss.job WHERE name = $1 AND data->>'bench' = 'a'`, [q, quietAt])
  const quietSeconds = (stoppedAt - quietAt) / 1000
  return {
    arm: o.arm,
    analyzed: !!o.analyze,
    putback: o.arm === 'naive' ? o.putback : null,
    workers: o.workers,
    batch: o.batch,
    run_ms: o.runMs,
    noisy_jobs: o.noisyJobs,
    quiet_tenants: o.quietTenants,
    quiet_jobs_per_tenant: o.quietJobs,
    quiet_total: quietTotal,
    quiet_jobs_in_db: rows.length,
    quiet_done: quietDone,
    quiet_not_started: censored,
    capped: quietDone < quietTotal,
    quiet_p50_s: fmt(percentile(sorted, 0.5)),
    quiet_p95_s: fmt(percentile(sorted, 0.95)),
    quiet_p99_s: fmt(percentile(sorted, 0.99)),
    quiet_max_s: fmt(sorted[sorted.length - 1]),
    quiet_wait_lower_bound_s: round(maxAge), // what a never-started job had waited at the stop
    quiet_tenant_p95_max_s: fmt(Math.max(...perTenantP95)),
    quiet_tenant_p95_min_s: fmt(Math.min(...perTenantP95)),
    quiet_seconds: round(quietSeconds),
    run_seconds: round((stoppedAt - start) / 1000),
    enqueue_noisy_s: round(enqueueNoisyS),
    noisy_done: a.done,
    noisy_done_while_quiet: a.done_while_quiet,
    noisy_jobs_per_s_while_quiet: round(a.done_while_quiet / quietSeconds, 1),
    refusals: s.refusals,
    claims: s.claims,
    empty_claims: s.emptyClaims,
    claimed: s.claimed,
    completed: s.completed,
    complete_mismatch: s.completeMismatch,
    release_missing: s.releaseMissing,
    max_in_hand: s.maxInHand,
    max_in_hand_noisy: s.maxInHand[NOISY] ?? 0,
    max_in_hand_quiet: Math.max(0, ...quiet.map(t => s.maxInHand[t] ?? 0)),
    max_in_hand_total: s.maxInHandTotal,
    sampled_max_live: sampled?.max ?? null,
    sampled_max_live_total: sampled?.maxTotal ?? null,
    max_tick_ms: sampled?.maxTickMs ?? null,
    samples: sampled?.samples ?? 0,
    over_admission: o.arm === 'fetch' ? [] : overAdmission(o, s, sampled)
  }
}

// --- weights -------------------------------------------------------------------------
async function weights (boss, conn, o) {
  const q = o.queue
  const src = pgbossSource(boss, q)
  const ws = o.weights.split(',').map(Number)
  if (ws.some(w => !(w > 0))) throw new Error(`bad --weights ${o.weights}`)
  const tenants = ws.map((_, i) => tenant(101 + i))
  const sumW = ws.reduce((a, b) => a + b, 0)
  // Enqueue: round-robin chunks of 1000 per tenant, so no tenant is wholly
  // older than another.
  const t0 = Date.now()
  let seed = 42
  const rand = () => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648 }
  for (let i = 0; i < o.jobs; i += 1000) {
    for (const t of tenants) {
      const n = Math.min(1000, o.jobs - i)
      const rows = Array.from({ length: n }, () => ({ tenant_id: t, cost: o.costMax > 1 ? 1 + Math.floor(rand() * o.costMax) : 1 }))
      await boss.insert(q, rows.map(data => ({ data })))
    }
  }
  const enqueueS = (Date.now() - t0) / 1000
  if (o.analyze) await src.db.executeSql('ANALYZE pgboss.job')
  const s = makeStats(o)
  const sampler = slotSampler(conn, o.sampleMs)
  const start = Date.now()
  const from = start + o.warmup * 1000
  const to = from + o.seconds * 1000
  const inWindow = t => t >= from && t < to
  const stop = () => Date.now() >= to
  await Promise.all(Array.from({ length: o.workers }, () => loop(src, o, 'claim', s, stop, inWindow)))
  integrate(s, inWindow)
  const sampled = await sampler.stop()
  const { rows } = await src.db.executeSql(
    `SELECT data->>'tenant_id' AS t, count(*)::int AS waiting FROM pgboss.job
      WHERE name = $1 AND state < 'active' GROUP BY 1`, [q])
  const waiting = Object.fromEntries(rows.map(r => [r.t, r.waiting]))
  const totalCost = tenants.reduce((a, t) => a + (s.costBy[t] ?? 0), 0)
  const totalBusy = tenants.reduce((a, t) => a + (s.busyIntegral[t] ?? 0), 0)
  const per = tenants.map((t, i) => {
    const target = ws[i] / sumW
    const share = totalCost ? (s.costBy[t] ?? 0) / totalCost : 0
    const busyShare = totalBusy ? (s.busyIntegral[t] ?? 0) / totalBusy : 0
    return {
      tenant: t,
      weight: ws[i],
      target: round(target, 4),
      cost_claimed: s.costBy[t] ?? 0,
      share: round(share, 4),
      deviation_pct: round(100 * (share - target) / target, 2),
      mean_running_cost: round((s.busyIntegral[t] ?? 0) / (o.seconds * 1000), 3),
      running_share: round(busyShare, 4),
      running_deviation_pct: round(100 * (busyShare - target) / target, 2),
      max_in_hand: s.maxInHand[t] ?? 0,
      sampled_max_live: sampled.max[t] ?? 0,
      waiting_at_end: waiting[t] ?? 0
    }
  })
  return {
    workers: o.workers,
    batch: o.batch,
    run_ms: o.runMs,
    cost_max: o.costMax,
    jobs_per_tenant: o.jobs,
    enqueue_s: round(enqueueS),
    seconds: o.seconds,
    warmup: o.warmup,
    total_limit: o.total,
    tenants: per,
    max_abs_deviation_pct: round(Math.max(...per.map(p => Math.abs(p.deviation_pct))), 2),
    max_abs_running_deviation_pct: round(Math.max(...per.map(p => Math.abs(p.running_deviation_pct))), 2),
    saturated: per.every(p => p.waiting_at_end > 0),
    claims_per_s: round(s.claimed / ((Date.now() - start) / 1000), 1),
    cost_per_s: round(totalCost / o.seconds, 1),
    claims: s.claims,
    empty_claims: s.emptyClaims,
    claimed: s.claimed,
    completed: s.completed,
    complete_mismatch: s.completeMismatch,
    release_missing: s.releaseMissing,
    max_in_hand_total: s.maxInHandTotal,
    sampled_max_live_total: sampled.maxTotal,
    max_tick_ms: sampled.maxTickMs,
    samples: sampled.samples,
    over_admission: overAdmission(o, s, sampled)
  }
}

// --- throughput -----------------------------------------------------------------------
async function throughput (src, conn, o) {
  const s = makeStats(o)
  const withSlots = o.arm === 'claim' || o.arm === 'claimrel'
  const sampler = withSlots ? slotSampler(conn, o.sampleMs) : null
  const start = Date.now()
  const from = start + o.warmup * 1000
  const to = from + o.seconds * 1000
  let inWindowJobs = 0
  const stop = () => Date.now() >= to
  // --produce 1: every iteration first sends --batch jobs of random tenants
  // (1..--tenants), so the queue stays as short as the loops keep it.
  let seq = 0
  const wrapped = {
    ...src,
    async fetch (batch) {
      if (o.produce) await src.produce(Array.from({ length: batch }, () => ({ tenant_id: tenant(1 + (seq++ * 7919) % o.tenants) })))
      return src.fetch(batch)
    },
    async claim (batch) {
      if (o.produce) await src.produce(Array.from({ length: batch }, () => ({ tenant_id: tenant(1 + (seq++ * 7919) % o.tenants) })))
      return src.claim(batch)
    },
    async done (jobs) {
      const n = await src.done(jobs)
      const t = Date.now()
      if (t >= from && t < to) inWindowJobs += n
      return n
    }
  }
  const o2 = { ...o, runMs: 0, release: o.arm === 'claimrel' ? 1 : 0 }
  await Promise.all(Array.from({ length: o.workers }, () => loop(wrapped, o2, o.arm, s, stop)))
  const sampled = sampler ? await sampler.stop() : null
  return {
    arm: o.arm,
    source: o.source,
    produce: !!o.produce,
    workers: o.workers,
    batch: o.batch,
    seconds: o.seconds,
    warmup: o.warmup,
    jobs_per_s: round(inWindowJobs / o.seconds, 1),
    completed_in_window: inWindowJobs,
    claimed: s.claimed,
    completed: s.completed,
    empty_claims: s.emptyClaims,
    complete_mismatch: s.completeMismatch,
    release_missing: s.releaseMissing,
    sampled_max_live_total: sampled?.maxTotal ?? null,
    max_tick_ms: sampled?.maxTickMs ?? null,
    samples: sampled?.samples ?? 0
  }
}

async function sendLoad (send, o) {
  const start = Date.now()
  const from = start + o.warmup * 1000
  const to = from + o.seconds * 1000
  let seq = 0
  let inWindow = 0
  await Promise.all(Array.from({ length: o.workers }, async () => {
    while (Date.now() < to) {
      await send({ tenant_id: tenant(1 + (seq++ * 7919) % o.tenants) })
      const t = Date.now()
      if (t >= from && t < to) inWindow++
    }
  }))
  return { workers: o.workers, tenants: o.tenants, seconds: o.seconds, jobs_per_s: round(inWindow / o.seconds, 1), sent: seq }
}

async function main () {
  const [conn, command, ...rest] = process.argv.slice(2)
  if (!conn || !command) throw new Error('usage: claim_load.mjs CONN init|noisy|weights|throughput|pgmq-throughput|send|pgmq-send [options]')
  const o = parseArgs(rest)
  if (command === 'pgmq-send') {
    const pool = new pg.Pool({ ...parseConn(conn), max: o.workers + 1, application_name: 'claim_bench' })
    try {
      return await sendLoad(data => pool.query('SELECT pgmq.send($1, $2::jsonb)', [o.queue, data]), o)
    } finally {
      await pool.end()
    }
  }
  if (command === 'pgmq-throughput') {
    const pool = new pg.Pool({ ...parseConn(conn), max: o.workers + 1, application_name: 'claim_bench' })
    try {
      return await throughput(pgmqSource(pool, o.queue, o.vt), conn, { ...o, source: 'pgmq', arm: o.arm === 'read' ? 'fetch' : o.arm })
    } finally {
      await pool.end()
    }
  }
  const boss = new PgBoss({
    ...parseConn(conn),
    max: o.workers + 2,
    application_name: 'claim_bench',
    ...quietOptions(PGBOSS_MAJOR),
    migrate: command === 'init'
  })
  const errors = []
  boss.on('error', e => errors.push(e.message))
  await boss.start()
  try {
    let out
    if (command === 'init') {
      await boss.createQueue(o.queue)
      out = { queue: o.queue, schemaVersion: await boss.schemaVersion() }
    } else {
      if (!await boss.getQueue(o.queue)) throw new Error(`queue ${o.queue} missing: run init first`)
      if (command === 'noisy') {
        if (!['claim', 'fetch', 'naive', 'group'].includes(o.arm)) throw new Error('noisy needs --arm claim|fetch|naive|group')
        out = await noisy(boss, conn, o)
      } else if (command === 'send') {
        out = await sendLoad(data => boss.send(o.queue, data), o)
      } else if (command === 'weights') {
        out = await weights(boss, conn, o)
      } else if (command === 'throughput') {
        if (!['claim', 'claimrel', 'fetch', 'group'].includes(o.arm)) throw new Error('throughput needs --arm fetch|claim|claimrel|group')
        if (o.arm === 'group') {
          // pg-boss 12's own per-group limit (each tenant a group of --limit).
          if (PGBOSS_MAJOR < 12) throw new Error('--arm group needs pg-boss 12 (PGBOSS_MAJOR=12)')
          out = await throughput(pgbossSource(boss, o.queue, { groupConcurrency: o.limit }), conn, { ...o, arm: 'fetch' })
          out.arm = 'group'
        } else {
          out = await throughput(pgbossSource(boss, o.queue), conn, o)
        }
      } else {
        throw new Error(`unknown command ${command}`)
      }
    }
    await sleep(10)
    if (errors.length) throw new Error(`pg-boss reported errors: ${errors.slice(0, 3).join('; ')}`)
    return out
  } finally {
    await boss.stop({ graceful: false, wait: true, close: true })
  }
}

runAsJson(main)
