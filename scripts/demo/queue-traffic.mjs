// Demo traffic on real queue systems: pg-boss 11 (npm) jobs sent, fetched,
// completed and failed, so queue_health() has something to show.
// usage: node scripts/demo/queue-traffic.mjs <socket dir> <port> <database>
import PgBoss from '../../tests/node/node_modules/pg-boss/src/index.js'

const [host, port, database] = process.argv.slice(2)
const boss = new PgBoss({ host, port: Number(port), user: 'postgres', database, supervise: false, schedule: false })
boss.on('error', e => console.error('pg-boss:', e.message))
await boss.start()

const queues = { 'webhooks.inbound': 120, 'workflow.steps': 40, 'emails.outbound': 15 }
for (const [name, n] of Object.entries(queues)) {
  await boss.createQueue(name, { retryLimit: 0 })
  await boss.insert(name, Array.from({ length: n }, (_, i) => ({ data: { i } })))
}
// Work a part of each queue: some complete, a few fail, some stay active.
for (const name of Object.keys(queues)) {
  const jobs = await boss.fetch(name, { batchSize: 12 })
  const ids = jobs.map(j => j.id)
  await new Promise(resolve => setTimeout(resolve, 50))
  await boss.complete(name, ids.slice(0, 8))
  if (ids.length > 10) await boss.fail(name, ids.slice(8, 10), { message: 'upstream returned 502' })
}
await boss.stop({ graceful: false, wait: true })
console.log('pg-boss: %d jobs sent to %d queues, some fetched, completed and failed',
  Object.values(queues).reduce((a, b) => a + b, 0), Object.keys(queues).length)
