#!/usr/bin/env node
// A small CLI around the real pg-boss (tests/node/node_modules) for the
// Python integration tests:
//
//   [PGBOSS_MAJOR=11|12] node tests/node/pgboss_driver.mjs CONN COMMAND [JSON_ARGS]
//
// PGBOSS_MAJOR picks the pg-boss: 11 (default, npm pg-boss 11.1.2) or 12
// (pg-boss 12.38.1, installed as the npm alias pg-boss-12). Same commands and
// output on both; the ones only pg-boss 12 has say so.
//
// CONN is a libpq-style "host=/tmp/x port=5432 user=postgres dbname=db"
// (database= works too) or a postgres:// URL. Each call starts pg-boss with
// its timers off (supervise: false, schedule: false; on 12 also no instance
// registry and no index rebuilds), so nothing happens in the background:
// expiry is run on demand with the `supervise` command, and (12) flow
// resolution with `resolve-flow`, the way pg-boss's own timers would. Output:
// one JSON value on stdout; on failure {"error": message, "code": sqlstate}
// on stdout and exit status 1.
//
// Commands (JSON_ARGS in brackets):
//   start {bamTimeoutSeconds}               install/migrate the pgboss schema; on 12 also
//                                           waits (default 180 s) for the index builds a
//                                           migration queues in pgboss.bam -> {installed,
//                                           schemaVersion, bam: [{status, count}] (12)}
//   create-queue {name, options}            boss.createQueue(name, options); options pass
//                                           through: policy (standard, short, singleton,
//                                           stately, exclusive; 12: key_strict_fifo),
//                                           partition, retryLimit, retryDelay, retryBackoff,
//                                           retryDelayMax, expireInSeconds, retentionSeconds,
//                                           deleteAfterSeconds, deadLetter, warningQueueSize;
//                                           12: heartbeatSeconds (>= 10), notify
//   delete-queue {name}
//   send {name, count, data, options}       -> [ids]; options pass through to boss.send
//                                           (priority, startAfter, singletonKey,
//                                           singletonSeconds, retryLimit, expireInSeconds...;
//                                           12: heartbeatSeconds, group: {id, tier})
//   fetch {name, batchSize, includeMetadata, options} -> [jobs]; options pass through
//                                           (12: groupConcurrency, ignoreGroups,
//                                           minPriority, maxPriority, ignoreStartAfter)
//   complete {name, ids | jobs, data}       jobs: [{id, retryCount}] fences the call to that
//                                           attempt (12); ids: plain ids
//   fail {name, ids | jobs, data}   cancel {name, ids}
//   touch {name, ids | jobs}                (12) boss.touch: renew heartbeat_on
//   flow {name, childName, data, options, childOptions} | {jobs}
//                                           (12) boss.flow: a parent in `name` and a child
//                                           in `childName` (default `name`) that dependsOn
//                                           it; or `jobs` as boss.flow takes them
//                                           ([{ref, name, data, options, dependsOn}]).
//                                           -> {ref: id} ({parent, child} for the short form)
//   resolve-flow                            (12) boss.resolveFlow(): unblock the children of
//                                           completed parents now -> {resolved, errors}
//   dependencies {name, id}                 (12) {dependsOn: getDependencies, dependents:
//                                           getDependents}
//   supervise {name}                        boss.supervise(name): cache stats, expire jobs
//                                           (timed out and, 12, heartbeat lost)
//   job {name, id}                          boss.getJobById(name, id)
//   stats {name}                            {stats, queue}: queue is getQueue(name), read
//                                           first (pgboss.queue's cached counts as they are);
//                                           stats counts the job table now: on 11
//                                           getQueueStats(name); on 12 pg-boss 12's own count
//                                           statement (the one getQueueStats runs when it
//                                           refreshes, run read-only), since 12's
//                                           getQueueStats serves pgboss.queue's cache and
//                                           rewrites it when it recounts
//   queues                                  boss.getQueues()
//   version                                 {installed, schemaVersion, major, package}
import { createRequire } from 'node:module'
import { loadPgBoss, parseConn, quietOptions, runAsJson } from './conn.mjs'

function needs12 (major, command) {
  if (major < 12) throw new Error(`${command} needs pg-boss 12 (PGBOSS_MAJOR=12)`)
}

// The ids argument of the settle calls: `jobs` ([{id, retryCount}], 12's
// attempt-fenced form) or `ids` (plain ids).
function idArg (args) {
  return args.jobs ?? args.ids
}

// Waits until pgboss.bam has no pending or in_progress command (or the
// timeout passes) -> getBamStatus() rows ([] on a fresh install).
async function waitForBam (boss, timeoutSeconds) {
  const deadline = Date.now() + timeoutSeconds * 1000
  for (;;) {
    const rows = await boss.getBamStatus()
    const busy = rows.some(r => r.status === 'pending' || r.status === 'in_progress')
    if (!busy || Date.now() > deadline) return rows.map(r => ({ status: r.status, count: r.count }))
    await new Promise(resolve => setTimeout(resolve, 250))
  }
}

function packageVersion (major) {
  const require = createRequire(import.meta.url)
  return require(major >= 12 ? 'pg-boss-12/package.json' : 'pg-boss/package.json').version
}

async function main () {
  const [conn, command, rawArgs] = process.argv.slice(2)
  if (!conn || !command) {
    throw new Error('usage: pgboss_driver.mjs CONN COMMAND [JSON_ARGS]')
  }
  const args = rawArgs ? JSON.parse(rawArgs) : {}
  const { PgBoss, major } = await loadPgBoss()
  const boss = new PgBoss({
    ...parseConn(conn),
    max: 2,
    application_name: 'pgboss_driver',
    ...quietOptions(major),
    migrate: command === 'start',
    // 12: how often its BAM runner looks for index builds a migration left (the least it takes)
    ...(major >= 12 ? { bamIntervalSeconds: 10 } : {}),
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
    return { installed, schemaVersion: version, major, package: packageVersion(major) }
  }
  let resolved = 0
  if (major >= 12) boss.on('flow', e => { resolved += Number(e.resolved) || 0 })
  await boss.start()
  try {
    switch (command) {
      case 'start': {
        const out = { installed: await boss.isInstalled(), schemaVersion: await boss.schemaVersion() }
        // 12 builds a migration's indexes after start() returns (its BAM
        // runner, pgboss.bam); wait for them so the schema is complete.
        if (major >= 12) out.bam = await waitForBam(boss, args.bamTimeoutSeconds ?? 180)
        return out
      }
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
        return await boss.fetch(args.name, {
          ...(args.options || {}),
          batchSize: args.batchSize ?? 1,
          includeMetadata: !!args.includeMetadata
        })
      case 'complete':
        return await boss.complete(args.name, idArg(args), args.data)
      case 'fail':
        return await boss.fail(args.name, idArg(args), args.data ?? { message: 'failed by the test' })
      case 'cancel':
        return await boss.cancel(args.name, args.ids)
      case 'touch':
        needs12(major, command)
        return await boss.touch(args.name, idArg(args))
      case 'flow': {
        needs12(major, command)
        if (args.jobs) return await boss.flow(args.jobs)
        const child = args.childName ?? args.name
        return await boss.flow([
          { ref: 'parent', name: args.name, data: args.data ?? { role: 'parent' }, options: args.options },
          { ref: 'child', name: child, data: args.childData ?? { role: 'child' }, options: args.childOptions, dependsOn: ['parent'] }
        ])
      }
      case 'resolve-flow':
        needs12(major, command)
        await boss.resolveFlow()
        return { resolved, errors }
      case 'dependencies':
        needs12(major, command)
        return {
          dependsOn: await boss.getDependencies(args.name, args.id),
          dependents: await boss.getDependents(args.name, args.id)
        }
      case 'supervise':
        await boss.supervise(args.name)
        return { errors }
      case 'job':
        return await boss.getJobById(args.name, args.id)
      case 'stats': {
        // getQueue first: it reads pgboss.queue's cached counts as they are;
        // getQueueStats counts the job table (and merges into pg-boss's cache).
        const queue = await boss.getQueue(args.name)
        if (major < 12) {
          const stats = await boss.getQueueStats(args.name)
          return { stats: { ...stats }, queue }
        }
        // 12: getQueueStats() serves pgboss.queue's cache while it is under an
        // hour old (a minute with force) and rewrites that cache when it
        // recounts, so count with 12's own statement, read-only.
        const plans = await import('pg-boss-12/dist/plans.js')
        const query = plans.getQueueStats(plans.DEFAULT_SCHEMA, queue.table, [args.name])
        const { rows } = await boss.getDb().executeSql(query.text, [[args.name]])
        return { stats: { ...queue, ...rows[0] }, queue }
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
