#!/usr/bin/env bash
# Isolation specs (PostgreSQL's isolationtester): the transactional
# guarantees of slots and storage quotas under interleaved sessions, against
# a throwaway preloaded server of version PG (scripts/pgenv.sh).
#   tests/isolation/run.sh [spec...]      default: every spec in specs/
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/scripts/pgenv.sh"
pgxs=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/isolation
name=isolation-$$
out=/tmp/meshhook_limits/$name-out
specs=("$@")
if ((${#specs[@]} == 0)); then
  for f in "$here"/specs/*.spec; do specs+=("$(basename "$f" .spec)"); done
fi
trap 'bash "$root/scripts/pg.sh" destroy "$name" >/dev/null 2>&1 || true' EXIT
eval "$(bash "$root/scripts/pg.sh" start "$name" "meshhook_limits.restart_grace = 0" "fsync = off")"
mkdir -p "$out"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE meshhook_isolation"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d meshhook_isolation -c "CREATE EXTENSION meshhook_limits"
status=0
# --use-existing: the database above, on the server above.
"$pgxs/pg_isolation_regress" --use-existing --host="$PGHOST" --port="$PGPORT" --user=postgres \
  --bindir="$PG_BIN" --dbname=meshhook_isolation \
  --inputdir="$here" --outputdir="$out" "${specs[@]}" || status=$?
if ((status)); then
  cat "$out/regression.diffs" 2>/dev/null || true
fi
exit $status
