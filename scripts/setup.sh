#!/usr/bin/env bash
# One idempotent set-up for `make demo`, `make test` and docker/: installs what
# is missing (Debian packages, cargo-pgrx, PostgreSQL 16-18 trees), initialises
# pgrx against every PostgreSQL here, then builds and installs the extension
# into each version asked for. A second run on a ready machine only rebuilds
# what changed.
#   scripts/setup.sh                  build + install for PostgreSQL 15
#   PG="15 17" scripts/setup.sh       ... for 15 and 17 (any of 15 16 17 18)
#   scripts/setup.sh --test           also install test tools (python venv, promtool)
set -euo pipefail
cd "$(dirname "$0")/.."

read -ra VERSIONS <<<"${PG:-15}"
PGRX_VERSION=0.18.0
WANT_TEST=0
[[ "${1:-}" == "--test" ]] && WANT_TEST=1

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }
SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"

# Debian's PostgreSQL 15 always: it also makes the `postgres` OS user the
# servers of every version run as.
packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15
          postgresql-contrib pgbouncer patchelf libclang-dev clang pkg-config sudo build-essential ca-certificates)
[[ $WANT_TEST == 1 ]] && packages+=(python3-venv postgresql-15-cron prometheus prometheus-postgres-exporter)
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

bash scripts/install-pg.sh "${VERSIONS[@]}"

# pgrx knows every PostgreSQL here (init replaces its list, so name them all).
PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
init_args=() missing_init=0
for major in 15 16 17 18; do
  PG=$major source scripts/pgenv.sh
  [[ -x $PG_CONFIG ]] || continue
  init_args+=(--pg$major "$PG_CONFIG")
  grep -q "^pg$major = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml" 2>/dev/null || missing_init=1
done
if ((missing_init)); then
  log "cargo pgrx init ${init_args[*]}"
  cargo pgrx init "${init_args[@]}" >/dev/null
fi

for major in "${VERSIONS[@]}"; do
  PG=$major source scripts/pgenv.sh
  log "building and installing the extension (release) for PostgreSQL $major"
  # Build first, then unlink the old library: overwriting a loaded .so in
  # place crashes running backends (SIGBUS); after an unlink they keep their
  # copy mapped.
  cargo build --release --quiet --no-default-features --features pg$major 2>/dev/null || true
  $SUDO rm -f "$($PG_CONFIG --pkglibdir)/meshhook_limits.so"
  $SUDO env "PATH=$PATH" "HOME=$HOME" cargo pgrx install --release --pg-config "$PG_CONFIG" 2>&1 \
    | sed 's/\x1b\[[0-9;]*m//g' | grep -Ev '^\s*(Copying|Writing|Discovered|Finished|Installing)' || true
  test -f "$($PG_CONFIG --pkglibdir)/meshhook_limits.so" || { echo "install failed" >&2; exit 1; }
  # The install scripts of released versions (sql/released/), so that an
  # upgrade can be tested from them: CREATE EXTENSION ... VERSION '0.1.0'.
  $SUDO cp sql/released/meshhook_limits--*.sql "$($PG_CONFIG --sharedir)/extension/"
done

if [[ $WANT_TEST == 1 ]]; then
  if [[ ! -x .venv/bin/pytest ]]; then
    log "creating .venv with pytest and psycopg"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check "pytest>=8" "psycopg[binary]>=3.2"
  fi
  bash scripts/install-queue-systems.sh
fi
log "ready"
