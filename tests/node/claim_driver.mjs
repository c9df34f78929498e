#!/usr/bin/env node
// The pg-boss calls tests/test_claim.py needs beyond tests/node/pgboss_driver.mjs:
//
//   [PGBOSS_MAJOR=11|12] node tests/node/claim_driver.mjs CONN COMMAND [JSON_ARGS]
//
// PGBOSS_MAJOR picks pg-boss 11 (default) or 12, as for pgboss_driver.mjs.
// JSON_ARGS '-' reads them from stdin. Same connection string, same output
// (one JSON value; {"error", "code"} and exit status 1 on failure) and the
// same quiet pg-boss (no supervisor, no scheduler) as pgboss_driver.mjs.
//
// Commands (JSON_ARGS in brackets):
//   insert {name, jobs}    boss.insert(name, jobs): many jobs, each with its
//                          own data (and id, priority, startAfter, retryLimit,
//                          expireInSeconds...; 12: heartbeatSeconds,
//                          group: {id, tier}), in one statement -> {inserted}
//   delete {name, ids}     boss.deleteJob(name, ids)
import { readFileSync } from 'node:fs'
import { loadPgBoss, parseConn, quietOptions, runAsJson } from './conn.mjs'

async function main () {
  const [conn, command, rawArgs] = process.argv.slice(2)
  if (!conn || !command) {
    throw new Error('usage: claim_driver.mjs CONN COMMAND [JSON_ARGS]')
  }
  // '-': the arguments on stdin (thousands of jobs do not fit in one argv string).
  const args = rawArgs ? JSON.parse(rawArgs === '-' ? readFileSync(0, 'utf8') : rawArgs) : {}
  const { PgBoss, major } = await loadPgBoss()
  const boss = new PgBoss({
    ...parseConn(conn),
    max: 2,
    application_name: 'claim_driver',
    ...quietOptions(major),
    migrate: false
  })
  boss.on('error', () => {})
  await boss.start()
  try {
    switch (command) {
      case 'insert':
        // boss.insert returns nothing for a batch: the ids are the caller's.
        // (Only a count back: a large stdout may be cut short by exit.)
        await boss.insert(args.name, args.jobs)
        return { inserted: args.jobs.length }
      case 'delete':
        return await boss.deleteJob(args.name, args.ids)
      default:
        throw new Error(`unknown command ${command}`)
    }
  } finally {
    await boss.stop({ graceful: false, wait: true, close: true })
  }
}

runAsJson(main)
