#!/usr/bin/env bash
# One idempotent set-up for `make demo`, `make test` and docker/: installs what
# is missing (Debian packages, cargo-pgrx), initialises pgrx against the
# system PostgreSQL 15, then builds and installs the extension.
# A second run on a ready machine only rebuilds what changed.
#   scripts/setup.sh            build + install the extension
#   scripts/setup.sh --test     also install test tools (python venv, promtool)
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=15
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
PGRX_VERSION=0.18.0
WANT_TEST=0
[[ "${1:-}" == "--test" ]] && WANT_TEST=1

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"

packages=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-client-$PG_MAJOR
          postgresql-contrib libclang-dev clang pkg-config sudo build-essential ca-certificates)
[[ $WANT_TEST == 1 ]] && packages+=(python3-venv postgresql-$PG_MAJOR-cron prometheus prometheus-postgres-exporter)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  log "installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
if ! grep -q "pg$PG_MAJOR" "$PGRX_HOME/config.toml" 2>/dev/null; then
  log "cargo pgrx init --pg$PG_MAJOR $PG_CONFIG"
  cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
fi

log "building and installing the extension (release)"
# Unlink the old library first: overwriting a loaded .so in place crashes
# running backends (SIGBUS); after an unlink they keep their copy mapped.
cargo build --release --quiet --no-default-features --features pg15 2>/dev/null || true
$SUDO rm -f "$($PG_CONFIG --pkglibdir)/meshhook_limits.so"
$SUDO env "PATH=$PATH" "HOME=$HOME" cargo pgrx install --release --pg-config "$PG_CONFIG" 2>&1 \
  | grep -Ev '^\s*(Copying|Writing|Discovered|Finished|Installing)' || true
test -f "$($PG_CONFIG --pkglibdir)/meshhook_limits.so" || { echo "install failed" >&2; exit 1; }
# The install scripts of released versions (sql/released/), so that an
# upgrade can be tested from them: CREATE EXTENSION ... VERSION '0.1.0'.
$SUDO cp sql/released/meshhook_limits--*.sql "$($PG_CONFIG --sharedir)/extension/"

if [[ $WANT_TEST == 1 ]]; then
  if [[ ! -x .venv/bin/pytest ]]; then
    log "creating .venv with pytest and psycopg"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check "pytest>=8" "psycopg[binary]>=3.2"
  fi
  bash scripts/install-queue-systems.sh
fi
log "ready"
