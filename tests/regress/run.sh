#!/usr/bin/env bash
# pg_regress: deterministic SQL behaviour (bad input and its SQLSTATEs, ...)
# as plain SQL files with expected output, against a throwaway preloaded
# server of version PG (scripts/pgenv.sh).
#   tests/regress/run.sh [test...]      default: every file in sql/
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
source "$root/scripts/pgenv.sh"
pgxs=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/regress
name=regress-$$
out=/tmp/meshhook_limits/$name-out
tests=("$@")
if ((${#tests[@]} == 0)); then
  for f in "$here"/sql/*.sql; do tests+=("$(basename "$f" .sql)"); done
fi
trap 'bash "$root/scripts/pg.sh" destroy "$name" >/dev/null 2>&1 || true' EXIT
eval "$(bash "$root/scripts/pg.sh" start "$name" "meshhook_limits.restart_grace = 0" "fsync = off")"
mkdir -p "$out"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE meshhook_regress"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d meshhook_regress -c "CREATE EXTENSION meshhook_limits"
status=0
# --use-existing: the database above, on the server above.
"$pgxs/pg_regress" --use-existing --host="$PGHOST" --port="$PGPORT" --user=postgres \
  --bindir="$PG_BIN" --dbname=meshhook_regress \
  --inputdir="$here" --outputdir="$out" "${tests[@]}" || status=$?
if ((status)); then
  cat "$out/regression.diffs" 2>/dev/null || true
fi
exit $status
