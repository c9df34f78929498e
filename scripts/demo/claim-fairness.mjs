// Demo of claim_jobs on real pg-boss 11: a noisy tenant queues 400 jobs,
// then three quiet tenants queue 20 each. Four workers take jobs with
// plain boss.fetch() (FIFO) and then with meshhook_limits.claim_jobs()
// (limits and fair share), "run" each for 20 ms and complete it with
// boss.complete(). Prints, per tenant, when its jobs were taken.
// usage: node scripts/demo/claim-fairness.mjs <socket dir> <port> <database>
import PgBoss from '../../tests/node/node_modules/pg-boss/src/index.js'
import pg from '../../tests/node/node_modules/pg/lib/index.js'

const [host, port, database] = process.argv.slice(2)
const conn = { host, port: Number(port), user: 'postgres', database }
const boss = new PgBoss({ ...conn, supervise: false, schedule: false })
boss.on('error', e => console.error('pg-boss:', e.message))
await boss.start()

const tenants = {
  noisy: 'e0000000-0000-4000-8000-00000000000e',
  quiet1: 'f1000000-0000-4000-8000-000000000001',
  quiet2: 'f2000000-0000-4000-8000-000000000002',
  quiet3: 'f3000000-0000-4000-8000-000000000003'
}
const WORKERS = 4
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms))

async function enqueue (queue) {
  await boss.createQueue(queue, { retryLimit: 0 })
  await boss.insert(queue, Array.from({ length: 400 }, () => ({ data: { tenant_id: tenants.noisy } })))
  for (const name of ['quiet1', 'quiet2', 'quiet3']) {
    await boss.insert(queue, Array.from({ length: 20 }, () => ({ data: { tenant_id: tenants[name] } })))
  }
}

// Run workers until every quiet job is done; returns per tenant the
// milliseconds (since start) at which each job was taken.
async function run (queue, take) {
  const taken = Object.fromEntries(Object.keys(tenants).map(n => [n, []]))
  const byId = Object.fromEntries(Object.entries(tenants).map(([n, id]) => [id, n]))
  const quietLeft = () => ['quiet1', 'quiet2', 'quiet3'].reduce((n, t) => n + 20 - taken[t].length, 0)
  const t0 = Date.now()
  await Promise.all(Array.from({ length: WORKERS }, async () => {
    const db = new pg.Client(conn)
    await db.connect()
    while (quietLeft() > 0 && Date.now() - t0 < 60000) {
      const job = await take(db)
      if (!job) { await sleep(5); continue }
      taken[byId[job.tenant]].push(Date.now() - t0)
      await sleep(20)
      await boss.complete(queue, job.id)
    }
    await db.end()
  }))
  return taken
}

function report (title, taken) {
  console.log(`\n${title}`)
  console.log('  tenant   jobs taken   first at   quiet jobs done by')
  for (const [name, times] of Object.entries(taken)) {
    const last = name === 'noisy' ? '' : `${Math.max(...times)} ms`
    console.log(`  ${name.padEnd(8)} ${String(times.length).padStart(10)} ${String(Math.min(...times)).padStart(7)} ms   ${last}`)
  }
}

// 1. Plain FIFO: boss.fetch() takes jobs in queue order.
await enqueue('demo.fifo')
const fifo = await run('demo.fifo', async () => {
  const [job] = await boss.fetch('demo.fifo')
  return job && { id: job.id, tenant: job.data.tenant_id }
})
report('boss.fetch() (FIFO): the quiet tenants wait behind the noisy backlog', fifo)

// 2. claim_jobs: every tenant may run 2 at once; the 4 workers are shared
//    fairly among the tenants that have jobs. boss.complete() ends the slot
//    too (the trigger bind_queue put on pgboss.job).
await enqueue('demo.fair')
const setup = new pg.Client(conn)
await setup.connect()
await setup.query("SELECT meshhook_limits.bind_queue('pgboss', 'demo.fair')")
for (const id of Object.values(tenants)) {
  await setup.query("SELECT meshhook_limits.set_limit('concurrent_executions', 2, $1)", [id])
}
const fair = await run('demo.fair', async db => {
  const { rows: [job] } = await db.query("SELECT job_id, tenant_id FROM meshhook_limits.claim_jobs('pgboss', 'demo.fair')")
  return job && { id: job.job_id, tenant: job.tenant_id }
})
report('meshhook_limits.claim_jobs(): the noisy tenant is held to its share', fair)
const { rows } = await setup.query(
  `SELECT left(tenant_id::text, 8) || '…' AS tenant, waiting, running, runnable, blocked FROM meshhook_limits.explain_queues()
    WHERE queue = 'demo.fair' ORDER BY waiting DESC`)
console.log('\nexplain_queues() afterwards:')
console.table(rows)
await setup.end()
await boss.stop({ graceful: false, wait: true })
