# Sourced by the scripts: which PostgreSQL to use. PG (default 15) is a major
# version; 15 is Debian's packaged server, 16-18 are the trees that
# scripts/install-pg.sh unpacks under .postgresql/.
#   PG=17 make demo      PG=17 scripts/pg.sh start NAME
# Sets PG_MAJOR, PG_BIN, PG_CONFIG. (A file to source: no `set -e` of its own.)
# MESHHOOK_PG_BIN, if set, is used instead: a relocated copy of an
# installation, as tests/test_upgrade.py makes to install an old release.
PG_MAJOR=${PG:-15}
if [[ -n ${MESHHOOK_PG_BIN:-} ]]; then
  PG_BIN=$MESHHOOK_PG_BIN
  PG_MAJOR=$("$PG_BIN/pg_config" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
else case $PG_MAJOR in
  15) PG_BIN=/usr/lib/postgresql/15/bin ;;
  16|17|18) PG_BIN=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.postgresql/pg$PG_MAJOR/bin ;;
  *) echo "PG=$PG_MAJOR: supported PostgreSQL versions are 15, 16, 17 and 18" >&2; exit 2 ;;
esac; fi
PG_CONFIG=$PG_BIN/pg_config
