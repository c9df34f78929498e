// What tests/node/pgboss_driver.mjs and benches/pgboss_load.mjs share.

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
