#!/usr/bin/env bash
# The real queue systems the tests and benchmarks drive (idempotent):
#  - pg-boss 11, pg-boss 12 (npm alias pg-boss-12) and node-postgres from npm,
#    into tests/node/node_modules (the drivers pick one with PGBOSS_MAJOR)
#  - pgmq's SQL, taken from the pgmq crate on crates.io (the file its feature
#    install-sql-embedded embeds and runs), into .cache/pgmq/pgmq.sql
set -euo pipefail
cd "$(dirname "$0")/.."
PGMQ_CRATE=0.33.7

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
# Both majors: a node_modules from before pg-boss 12 was added has only 11.
if [[ ! -f tests/node/node_modules/pg-boss/package.json \
   || ! -f tests/node/node_modules/pg-boss-12/package.json ]]; then
  echo "[setup] npm ci (pg-boss 11 and 12) in tests/node"
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
fi

out=.cache/pgmq/pgmq.sql
if [[ ! -f $out ]]; then
  echo "[setup] fetching the pgmq crate $PGMQ_CRATE for its embedded SQL"
  crate=.cache/pgmq/crate
  mkdir -p "$crate/src"
  : > "$crate/src/lib.rs"
  cat > "$crate/Cargo.toml" <<TOML
[package]
name = "pgmq-sql-fetch"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
pgmq = { version = "=$PGMQ_CRATE", default-features = false, features = ["install-sql-embedded"] }
[workspace]
TOML
  manifest=$(cd "$crate" && cargo metadata --format-version 1 --quiet \
    | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="pgmq"))')
  cp "$(dirname "$manifest")/src/install/embedded/sql/pgmq.sql" "$out.tmp"
  mv "$out.tmp" "$out"
fi
