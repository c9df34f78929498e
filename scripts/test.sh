#!/usr/bin/env bash
# Every test, on every supported PostgreSQL, in tiers: pgrx's #[pg_test]
# unit tests; pg_regress (tests/regress: plain SQL against expected output);
# isolation specs (tests/isolation: interleaved sessions, by PostgreSQL's
# isolationtester); the integration tests in tests/ (pytest, real servers
# and clients). Run after `PG="15 16 17 18" scripts/setup.sh --test`.
#   scripts/test.sh [rust|integration|all]
# Versions (environment):
#   FULL_PG  (default "15 17")  unit tests + the whole integration suite:
#                               what Supabase runs
#   SMOKE_PG (default "16 18")  unit tests + the integration tests marked
#                               `smoke` (tests/conftest.py)
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
read -ra FULL <<<"${FULL_PG-15 17}"
read -ra SMOKE <<<"${SMOKE_PG-16 18}"
export CARGO_TERM_COLOR=never
# A test module whose tools are missing fails instead of skipping (tests/conftest.py).
export MESHHOOK_TEST_STRICT=1
failed=()

if [[ $what == all || $what == rust ]]; then
  echo "== cargo fmt --check, cargo clippy -D warnings"
  cargo fmt --check || failed+=(fmt)
  for major in "${FULL[@]}" "${SMOKE[@]}"; do
    cargo clippy --quiet --no-default-features --features "pg$major" -- -D warnings || failed+=("clippy pg$major")
  done

  for major in "${FULL[@]}" "${SMOKE[@]}"; do
    echo "== PostgreSQL $major: cargo pgrx test (#[pg_test] inside a real server, as the postgres user)"
    work=/tmp/meshhook_limits/pgrx-test-$major
    rm -rf "$work"; mkdir -p "$work"; chown postgres "$work" 2>/dev/null || true
    cargo pgrx test "pg$major" --runas postgres --pgdata "$work/data" || failed+=("pgrx test pg$major")
    # cargo pgrx test installs its debug pg_test build into the server's lib
    # directory; put the release build users run back before anything else.
    PG=$major bash scripts/setup.sh >/dev/null || failed+=("setup pg$major")
  done
fi

if [[ $what == all || $what == integration ]]; then
  for major in "${FULL[@]}" "${SMOKE[@]}"; do
    echo "== PostgreSQL $major: pg_regress (tests/regress: plain SQL and its expected output)"
    PG=$major bash tests/sql_tests.sh regress || failed+=("regress pg$major")
    echo "== PostgreSQL $major: isolation specs (tests/isolation, isolationtester)"
    PG=$major bash tests/sql_tests.sh isolation || failed+=("isolation pg$major")
  done
  for major in "${FULL[@]}"; do
    echo "== PostgreSQL $major: integration tests (tests/, real server, real clients)"
    PG=$major .venv/bin/pytest -q -p no:cacheprovider tests/ || failed+=("pytest pg$major")
  done
  for major in "${SMOKE[@]}"; do
    echo "== PostgreSQL $major: integration smoke tests (tests/ -m smoke)"
    PG=$major .venv/bin/pytest -q -p no:cacheprovider -m smoke tests/ || failed+=("pytest -m smoke pg$major")
  done
fi

if ((${#failed[@]})); then
  printf '== FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "== all passed"
