#!/usr/bin/env bash
# Every test: pgrx's #[pg_test] unit tests, then the integration tests in
# tests/ against a real preloaded server (scripts/pg.sh). Run after setup.sh --test.
#   scripts/test.sh [rust|integration|all]
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
export CARGO_TERM_COLOR=never
status=0

if [[ $what == all || $what == rust ]]; then
  echo "== cargo fmt --check, cargo clippy -D warnings"
  cargo fmt --check || status=1
  cargo clippy --quiet --no-default-features --features pg15 -- -D warnings || status=1

  echo "== cargo pgrx test (#[pg_test] inside a real server, as the postgres user)"
  work=/tmp/meshhook_limits/pgrx-test
  rm -rf "$work"; mkdir -p "$work"; chown postgres "$work" 2>/dev/null || true
  cargo pgrx test pg15 --runas postgres --pgdata "$work/data" || status=1
  # cargo pgrx test installs its debug pg_test build into the server's lib
  # directory; put the release build users run back before anything else.
  bash scripts/setup.sh >/dev/null || status=1
fi

if [[ $what == all || $what == integration ]]; then
  echo "== integration tests (tests/, real server, real clients)"
  .venv/bin/pytest -q -p no:cacheprovider tests/ || status=1
fi
exit $status
