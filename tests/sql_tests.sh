#!/usr/bin/env bash
# PostgreSQL's own test drivers against a throwaway preloaded server of
# version PG (scripts/pgenv.sh):
#   tests/sql_tests.sh regress [name...]    pg_regress: tests/regress/sql/*.sql
#                                           against tests/regress/expected/
#   tests/sql_tests.sh isolation [name...]  isolationtester: tests/isolation/specs/*.spec
#                                           against tests/isolation/expected/
# With no names, every test of the kind. On a difference, prints the diff.
set -euo pipefail
kind=${1:?usage: sql_tests.sh regress|isolation [name...]}; shift
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/scripts/pgenv.sh"
case $kind in
  regress) driver=regress/pg_regress; dir=$root/tests/regress; files=sql; ext=sql ;;
  isolation) driver=isolation/pg_isolation_regress; dir=$root/tests/isolation; files=specs; ext=spec ;;
  *) echo "unknown kind $kind (regress or isolation)" >&2; exit 2 ;;
esac
driver=$("$PG_CONFIG" --pkglibdir)/pgxs/src/test/$driver
names=("$@")
if ((${#names[@]} == 0)); then
  for f in "$dir/$files"/*."$ext"; do names+=("$(basename "$f" ."$ext")"); done
fi
name=$kind-$$
out=/tmp/meshhook_limits/$name-out
trap 'bash "$root/scripts/pg.sh" destroy "$name" >/dev/null 2>&1 || true' EXIT
eval "$(bash "$root/scripts/pg.sh" start "$name" "meshhook_limits.restart_grace = 0" "fsync = off")"
mkdir -p "$out"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d postgres -c "CREATE DATABASE meshhook_$kind"
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -d "meshhook_$kind" -c "CREATE EXTENSION meshhook_limits"
status=0
# --use-existing: the database above, on the server above.
"$driver" --use-existing --host="$PGHOST" --port="$PGPORT" --user=postgres --bindir="$PG_BIN" \
  --dbname="meshhook_$kind" --inputdir="$dir" --outputdir="$out" "${names[@]}" || status=$?
if ((status)); then
  cat "$out/regression.diffs" 2>/dev/null || true
  echo "(results in $out/results: after reading the diff, copy a result to expected/ to accept it)"
fi
exit $status
