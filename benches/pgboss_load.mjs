#!/usr/bin/env node
// pg-boss load for benches/pgboss.sh: real pg-boss 11 (tests/node/node_modules)
// producers/consumers in one process, for a fixed time, printing jobs/s.
//
//   node benches/pgboss_load.mjs CONN init [--queues N]
//   node benches/pgboss_load.mjs CONN run  [--queues N] [--workers W] [--batch B]
//                                          [--seconds S] [--warmup S]
//
// CONN is libpq-style: "host=/tmp/x port=5432 user=postgres dbname=db".
//
// init: install/migrate the pgboss schema and create queues bench-0..N-1
//       with boss.createQueue (standard policy, pg-boss's defaults).
// run:  W concurrent worker loops, worker i on queue bench-(i mod N); each
//       iteration is a batched send, fetch and complete of B jobs:
//         boss.insert(queue, B jobs)            (pg-boss's batch send)
//         boss.fetch(queue, { batchSize: B })
//         boss.complete(queue, ids)
//       three statements, three autocommit transactions. Jobs completed in
//       the measured window (after --warmup) count. pg-boss's own timers
//       (supervise, schedule) are off so they cannot fall into one arm of an
//       A/B comparison and not the other.
//
// Output: one JSON object on stdout; exit 1 on any error.
import { createRequire } from 'node:module'

const require = createRequire(new URL('../tests/node/package.json', import.meta.url))
const PgBoss = require('pg-boss')

function parseConn (conn) {
  const out = {}
  for (const part of conn.trim().split(/\s+/)) {
    const i = part.indexOf('=')
    if (i < 0) throw new Error(`bad connection string part: ${part}`)
    const k = part.slice(0, i)
    const v = part.slice(i + 1)
    if (k === 'dbname' || k === 'database') out.database = v
    else if (k === 'port') out.port = Number(v)
    else if (k === 'host' || k === 'user' || k === 'password') out[k] = v
  }
  return out
}

function parseArgs (argv) {
  const o = { queues: 4, workers: 8, batch: 20, seconds: 20, warmup: 3 }
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, '')
    if (!(k in o)) throw new Error(`unknown option ${argv[i]}`)
    const v = Number(argv[i + 1])
    if (!Number.isFinite(v) || v < 0) throw new Error(`bad value for ${argv[i]}: ${argv[i + 1]}`)
    o[k] = v
  }
  return o
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function main () {
  const [conn, command, ...rest] = process.argv.slice(2)
  if (!conn || !command) throw new Error('usage: pgboss_load.mjs CONN init|run [options]')
  const o = parseArgs(rest)
  const queues = Array.from({ length: o.queues }, (_, i) => `bench-${i}`)
  const boss = new PgBoss({
    ...parseConn(conn),
    max: Math.max(o.workers, 2),
    application_name: 'pgboss_bench',
    supervise: false,
    schedule: false,
    migrate: command === 'init'
  })
  const errors = []
  boss.on('error', e => errors.push(e.message))
  await boss.start()
  try {
    if (command === 'init') {
      for (const q of queues) await boss.createQueue(q)
      return { queues: queues.length, schemaVersion: await boss.schemaVersion() }
    }
    if (command !== 'run') throw new Error(`unknown command ${command}`)
    if (!queues.length || !o.workers || !o.batch) throw new Error('run needs --queues, --workers and --batch >= 1')
    for (const q of queues) {
      if (!await boss.getQueue(q)) throw new Error(`queue ${q} missing: run init first`)
    }

    const t0 = Date.now()
    const measureFrom = t0 + o.warmup * 1000
    const measureTo = measureFrom + o.seconds * 1000
    let completed = 0
    let completedAll = 0
    let iterations = 0
    let emptyFetches = 0
    const data = { payload: 'x'.repeat(64) }

    async function worker (i) {
      const name = queues[i % queues.length]
      const batch = Array.from({ length: o.batch }, () => ({ data }))
      while (Date.now() < measureTo) {
        await boss.insert(name, batch)
        const jobs = await boss.fetch(name, { batchSize: o.batch })
        if (jobs.length === 0) { emptyFetches++; continue }
        const r = await boss.complete(name, jobs.map(j => j.id))
        const now = Date.now()
        completedAll += r.affected
        if (now >= measureFrom && now < measureTo) completed += r.affected
        iterations++
      }
    }

    await Promise.all(Array.from({ length: o.workers }, (_, i) => worker(i)))
    const elapsed = (Date.now() - t0) / 1000
    await sleep(10)
    if (errors.length) throw new Error(`pg-boss reported errors: ${errors.slice(0, 3).join('; ')}`)
    return {
      jobs_per_s: Math.round(completed / o.seconds * 10) / 10,
      completed,
      completed_total: completedAll,
      iterations,
      empty_fetches: emptyFetches,
      seconds: o.seconds,
      warmup: o.warmup,
      elapsed,
      workers: o.workers,
      batch: o.batch,
      queues: queues.length
    }
  } finally {
    await boss.stop({ graceful: false, wait: true, close: true })
  }
}

main().then(
  out => {
    process.stdout.write(JSON.stringify(out ?? null) + '\n')
    process.exit(0)
  },
  err => {
    process.stdout.write(JSON.stringify({ error: err.message, code: err.code ?? null }) + '\n')
    process.exit(1)
  }
)
