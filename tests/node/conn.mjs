// What tests/node/pgboss_driver.mjs, tests/node/claim_driver.mjs and
// benches/pgboss_load.mjs share.

// The connection settings pg-boss takes, from a libpq keyword/value string
// ("host=/tmp/x port=5432 user=postgres dbname=app") or a postgres:// URL.
export function parseConn (conn) {
  if (/^postgres(ql)?:\/\//.test(conn)) return { connectionString: conn }
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

// Run main() and print its result as one line of JSON (exit 0), or its error
// as {error, code} (exit 1): what the Python tests and runners read.
export function runAsJson (main) {
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
}

// The pg-boss major the drivers run: PGBOSS_MAJOR=11 (the default) imports
// npm's pg-boss 11.1.2 ('pg-boss', a default export), PGBOSS_MAJOR=12 imports
// pg-boss 12.38.1, installed under the npm alias 'pg-boss-12' (a named export,
// `import { PgBoss } from 'pg-boss-12'`). Imported on demand, so a machine
// with only one of them installed runs that one.
export async function loadPgBoss () {
  const major = (process.env.PGBOSS_MAJOR || '11').trim()
  if (major === '11') {
    const mod = await import('pg-boss')
    return { PgBoss: mod.default, major: 11, mod }
  }
  if (major === '12') {
    const mod = await import('pg-boss-12')
    return { PgBoss: mod.PgBoss, major: 12, mod }
  }
  throw new Error(`PGBOSS_MAJOR must be 11 or 12, not ${JSON.stringify(major)}`)
}

// Constructor options that keep a pg-boss of either major quiet: no
// supervisor, no scheduler, and (12) no instance registry row or heartbeat
// timer, no background index rebuilds.
export function quietOptions (major) {
  const options = { supervise: false, schedule: false }
  if (major >= 12) Object.assign(options, { registerInstance: false, reindex: false })
  return options
}
