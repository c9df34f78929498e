#!/usr/bin/env node
// A small CLI around the real pg-boss (tests/node/node_modules) for the
// Python integration tests:
//
//   node tests/node/pgboss_driver.mjs CONN COMMAND [JSON_ARGS]
//
// CONN is a libpq-style "host=/tmp/x port=5432 user=postgres dbname=db"
// (database= works too) or a postgres:// URL. Each call starts pg-boss with
// its timers off (supervise: false, schedule: false), so nothing happens in
// the background: expiry is run on demand with the `supervise` command, the
// way pg-boss's own supervisor would. Output: one JSON value on stdout; on
// failure {"error": message, "code": sqlstate} on stdout and exit status 1.
//
// Commands (JSON_ARGS in brackets):
//   start                                   install/migrate the pgboss schema
//   create-queue {name, options}            boss.createQueue(name, options)
//   delete-queue {name}
//   send {name, count, data, options}       -> [ids]
//   fetch {name, batchSize, includeMetadata} -> [jobs]
//   complete {name, ids}   fail {name, ids, data}   cancel {name, ids}
//   supervise {name}                        boss.supervise(name): cache stats, expire jobs
//   job {name, id}                          boss.getJobById(name, id)
//   stats {name}                            {stats: getQueueStats(name), queue: getQueue(name)}
//   queues                                  boss.getQueues()
//   version                                 {installed, schemaVersion}
import PgBoss from 'pg-boss'
import { parseConn, runAsJson } from './conn.mjs'

async function main () {
  const [conn, command, rawArgs] = process.argv.slice(2)
  if (!conn || !command) {
    throw new Error('usage: pgboss_driver.mjs CONN COMMAND [JSON_ARGS]')
  }
  const args = rawArgs ? JSON.parse(rawArgs) : {}
  const boss = new PgBoss({
    ...parseConn(conn),
    max: 2,
    application_name: 'pgboss_driver',
    supervise: false,
    schedule: false,
    migrate: command === 'start',
    monitorIntervalSeconds: 1,
    maintenanceIntervalSeconds: 1
  })
  const errors = []
  boss.on('error', e => errors.push(e.message))
  if (command === 'version') {
    // Without starting: isInstalled() works on a database without the schema.
    await boss.getDb().open()
    const installed = await boss.isInstalled()
    const version = installed ? await boss.schemaVersion() : null
    await boss.getDb().close()
    return { installed, schemaVersion: version }
  }
  await boss.start()
  try {
    switch (command) {
      case 'start':
        return { installed: await boss.isInstalled(), schemaVersion: await boss.schemaVersion() }
      case 'create-queue':
        await boss.createQueue(args.name, args.options || {})
        return await boss.getQueue(args.name)
      case 'delete-queue':
        await boss.deleteQueue(args.name)
        return null
      case 'send': {
        const ids = []
        for (let i = 0; i < (args.count ?? 1); i++) {
          ids.push(await boss.send(args.name, args.data ?? { i }, args.options || {}))
        }
        return ids
      }
      case 'fetch':
        return await boss.fetch(args.name, { batchSize: args.batchSize ?? 1, includeMetadata: !!args.includeMetadata })
      case 'complete':
        return await boss.complete(args.name, args.ids)
      case 'fail':
        return await boss.fail(args.name, args.ids, args.data ?? { message: 'failed by the test' })
      case 'cancel':
        return await boss.cancel(args.name, args.ids)
      case 'supervise':
        await boss.supervise(args.name)
        return { errors }
      case 'job':
        return await boss.getJobById(args.name, args.id)
      case 'stats': {
        // getQueue first: it reads pgboss.queue's cached counts as they are;
        // getQueueStats counts the job table (and merges into pg-boss's cache).
        const queue = await boss.getQueue(args.name)
        const stats = await boss.getQueueStats(args.name)
        return { stats: { ...stats }, queue }
      }
      case 'queues':
        return await boss.getQueues()
      default:
        throw new Error(`unknown command ${command}`)
    }
  } finally {
    await boss.stop({ graceful: false, wait: true, close: true })
  }
}

runAsJson(main)
