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
// ab:   the same loops, run without a break for --pairs x 2 + 1 phases of
//       --phase seconds: worker off, on, off, on, ..., off. At each phase
//       boundary the meshhook_limits worker is switched with ALTER SYSTEM SET
//       meshhook_limits.sample_interval (--on-interval, e.g. '1s', and
//       --off-interval '1h': the worker then sleeps on its latch and costs
//       nothing) and pg_reload_conf(). The first --settle seconds of a phase
//       are not counted. Per phase: jobs completed per second, the CPU of the
//       worker process (--worker-pid, from /proc) and of the whole machine.
//
//   node benches/pgboss_load.mjs CONN ab [--queues N] [--workers W] [--batch B]
//        [--pairs P] [--phase S] [--settle S] [--warmup S] --worker-pid PID
//        [--on-interval 1s] [--off-interval 1h] [--keep SECONDS]
//
// Output: one JSON object on stdout; exit 1 on any error.
import { createRequire } from 'node:module'
import { readFileSync } from 'node:fs'
import { availableParallelism } from 'node:os'
import { parseConn, runAsJson } from '../tests/node/conn.mjs'

const require = createRequire(new URL('../tests/node/package.json', import.meta.url))
const PgBoss = require('pg-boss')

const TEXT_OPTIONS = new Set(['onInterval', 'offInterval'])

function parseArgs (argv) {
  const o = {
    queues: 4, workers: 8, batch: 20, seconds: 20, warmup: 3,
    pairs: 6, phase: 10, settle: 1, workerPid: 0, onInterval: '1s', offInterval: '1h', keep: 0
  }
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase())
    if (!(k in o)) throw new Error(`unknown option ${argv[i]}`)
    if (TEXT_OPTIONS.has(k)) {
      if (!/^[0-9]+(ms|s|min|h)$/.test(argv[i + 1] ?? '')) throw new Error(`bad interval for ${argv[i]}: ${argv[i + 1]}`)
      o[k] = argv[i + 1]
      continue
    }
    const v = Number(argv[i + 1])
    if (!Number.isFinite(v) || v < 0) throw new Error(`bad value for ${argv[i]}: ${argv[i + 1]}`)
    o[k] = v
  }
  return o
}

// CPU seconds: of one process (user + system) and of the whole machine (busy).
const HZ = 100 // USER_HZ on Linux
function procCpu (pid) {
  if (!pid) return 0
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const fields = f.slice(f.lastIndexOf(')') + 2).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / HZ
}
function machineBusy () {
  const l = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number)
  // user nice system idle iowait irq softirq steal
  return (l[0] + l[1] + l[2] + l[5] + l[6] + l[7]) / HZ
}

function median (xs) {
  const v = [...xs].sort((a, b) => a - b)
  const m = v.length >> 1
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2
}

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

// One iteration of a load loop: a batched send, fetch and complete of the
// same size; resolves to the jobs completed (0 when the fetch found none).
async function cycle (boss, name, batch) {
  await boss.insert(name, batch)
  const fetched = await boss.fetch(name, { batchSize: batch.length })
  if (fetched.length === 0) return 0
  const r = await boss.complete(name, fetched.map(j => j.id))
  return r.affected
}

// The load: W concurrent loops, loop i on queue i mod N, each running cycle()
// until `until`; onCycle(n, now) hears what each cycle completed.
function loops (boss, queues, o, until, onCycle) {
  const data = { payload: 'x'.repeat(64) }
  return Array.from({ length: o.workers }, async (_, i) => {
    const name = queues[i % queues.length]
    const batch = Array.from({ length: o.batch }, () => ({ data }))
    while (Date.now() < until) onCycle(await cycle(boss, name, batch), Date.now())
  })
}

async function main () {
  const [conn, command, ...rest] = process.argv.slice(2)
  if (!conn || !command) throw new Error('usage: pgboss_load.mjs CONN init|run [options]')
  const o = parseArgs(rest)
  const queues = Array.from({ length: o.queues }, (_, i) => `bench-${i}`)
  const boss = new PgBoss({
    ...parseConn(conn),
    max: Math.max(o.workers + 2, 2), // + 2: the ab conductor's ALTER SYSTEM and the keeper's DELETE
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
    if (command === 'ab') return await ab(boss, queues, o, errors)
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

    await Promise.all(loops(boss, queues, o, measureTo, (n, now) => {
      if (n === 0) { emptyFetches++; return }
      completedAll += n
      if (now >= measureFrom && now < measureTo) completed += n
      iterations++
    }))
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

// The interleaved comparison: one continuous load, the worker switched off
// and on under it. Neighbouring phases see the same job table (it grows all
// along), so drift cancels in the paired comparison.
async function ab (boss, queues, o, errors) {
  if (!queues.length || !o.workers || !o.batch || !o.pairs || !o.phase) {
    throw new Error('ab needs --queues, --workers, --batch, --pairs and --phase >= 1')
  }
  if (o.settle >= o.phase) throw new Error('--settle must be shorter than --phase')
  if (!o.workerPid) throw new Error('ab needs --worker-pid (the meshhook_limits worker process)')
  for (const q of queues) {
    if (!await boss.getQueue(q)) throw new Error(`queue ${q} missing: run init first`)
  }
  const db = boss.getDb()
  const setWorker = async on => {
    const interval = on ? o.onInterval : o.offInterval
    await db.executeSql(`ALTER SYSTEM SET meshhook_limits.sample_interval = '${interval}'`)
    await db.executeSql('SELECT pg_reload_conf()')
  }
  const arms = ['off']
  for (let i = 0; i < o.pairs; i++) arms.push('on', 'off')

  await setWorker(false)
  const t0 = Date.now() + o.warmup * 1000
  const end = t0 + arms.length * o.phase * 1000
  const phaseOf = t => Math.floor((t - t0) / (o.phase * 1000))
  const counted = t => t >= t0 && t < end && (t - t0) % (o.phase * 1000) >= o.settle * 1000
  const jobs = arms.map(() => 0)

  // --keep K: once a second, delete jobs completed more than K seconds ago,
  // as pg-boss's maintenance does with a short deleteAfterSeconds, so the job
  // table stays at its steady-state size instead of growing all run long.
  let deleted = 0
  async function keeper () {
    if (!o.keep) return
    while (Date.now() < end) {
      await sleep(1000)
      const r = await db.executeSql(
        `DELETE FROM pgboss.job WHERE state = 'completed' AND completed_on < now() - interval '${Number(o.keep)} seconds'`)
      deleted += r.rowCount ?? 0
    }
  }

  // Phase boundaries: switch the worker and read the CPU counters there.
  const cpu = []
  async function conductor () {
    for (let k = 0; k <= arms.length; k++) {
      const at = t0 + k * o.phase * 1000
      await sleep(Math.max(0, at - Date.now()))
      cpu.push({ worker: procCpu(o.workerPid), machine: machineBusy(), t: Date.now() })
      if (k < arms.length && (k === 0 || arms[k] !== arms[k - 1])) await setWorker(arms[k] === 'on')
    }
  }

  await Promise.all([conductor(), keeper(), ...loops(boss, queues, o, end, (n, now) => {
    if (counted(now)) jobs[phaseOf(now)] += n
  })])
  await setWorker(false) // the last phase was off; leave the worker asleep
  if (errors.length) throw new Error(`pg-boss reported errors: ${errors.slice(0, 3).join('; ')}`)

  const counted_s = o.phase - o.settle
  const phases = arms.map((arm, k) => {
    const dt = (cpu[k + 1].t - cpu[k].t) / 1000
    return {
      arm,
      jobs_per_s: jobs[k] / counted_s,
      worker_cpu_pct_of_core: 100 * (cpu[k + 1].worker - cpu[k].worker) / dt,
      machine_busy_pct: 100 * (cpu[k + 1].machine - cpu[k].machine) / dt / availableParallelism()
    }
  })
  const of = arm => phases.filter(p => p.arm === arm)
  const mean = xs => xs.reduce((a, b) => a + b, 0) / xs.length
  const offMean = mean(of('off').map(p => p.jobs_per_s))
  const onMean = mean(of('on').map(p => p.jobs_per_s))
  // Each on phase against the mean of the off phases on either side of it.
  const paired = []
  for (let k = 1; k < phases.length - 1; k += 2) {
    const ref = (phases[k - 1].jobs_per_s + phases[k + 1].jobs_per_s) / 2
    paired.push(100 * (ref - phases[k].jobs_per_s) / ref)
  }
  const pm = mean(paired)
  const se = paired.length > 1
    ? Math.sqrt(paired.reduce((a, x) => a + (x - pm) ** 2, 0) / (paired.length - 1) / paired.length)
    : null
  // How much neighbouring off phases differ from each other: the noise.
  const offPairs = []
  const offs = of('off')
  for (let k = 1; k < offs.length; k++) {
    offPairs.push(Math.abs(100 * (offs[k].jobs_per_s - offs[k - 1].jobs_per_s) / offs[k - 1].jobs_per_s))
  }
  return {
    phases,
    off_mean_jobs_per_s: offMean,
    on_mean_jobs_per_s: onMean,
    loss_pct: 100 * (offMean - onMean) / offMean,
    paired_loss_pct: paired,
    paired_loss_mean_pct: pm,
    paired_loss_median_pct: median(paired),
    paired_loss_stderr_pct: se,
    off_neighbour_diff_median_pct: offPairs.length ? median(offPairs) : null,
    worker_cpu_on_pct_of_core: mean(of('on').map(p => p.worker_cpu_pct_of_core)),
    worker_cpu_off_pct_of_core: mean(of('off').map(p => p.worker_cpu_pct_of_core)),
    deleted_jobs: deleted,
    keep_seconds: o.keep,
    phase_seconds: o.phase,
    settle_seconds: o.settle,
    pairs: o.pairs,
    workers: o.workers,
    batch: o.batch,
    queues: queues.length
  }
}

runAsJson(main)
