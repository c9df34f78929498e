#!/usr/bin/env bash
# A throwaway PostgreSQL cluster with meshhook_limits preloaded, run as the
# `postgres` OS user (PostgreSQL refuses root), socket under /tmp. The version
# is PG (default 15, see scripts/pgenv.sh) when the cluster is created, and
# the cluster's own version afterwards.
#   [PG=17] scripts/pg.sh start NAME [extra postgresql.conf lines...]
#   scripts/pg.sh stop NAME
#   scripts/pg.sh env NAME     prints PGHOST/PGPORT exports (and PG_BIN)
set -euo pipefail
cmd=${1:?usage: pg.sh start|stop|env NAME}; name=${2:?name}; shift 2
base=/tmp/meshhook_limits/$name
data=$base/data
[[ -f $data/PG_VERSION ]] && PG=$(cat "$data/PG_VERSION")
source "$(dirname "$0")/pgenv.sh"
as_pg() { if [[ $(id -un) == postgres ]]; then "$@"; elif [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
}

case $cmd in
  start)
    mkdir -p "$base"; chown postgres "$base" 2>/dev/null || true; chmod 755 /tmp/meshhook_limits "$base" 2>/dev/null || true
    if [[ ! -f $data/PG_VERSION ]]; then
      as_pg "$PG_BIN/initdb" -D "$data" -A trust -U postgres --no-sync -E UTF8 --locale=C.UTF-8 >/dev/null
      port=$(free_port)
      {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$base'"
        echo "shared_preload_libraries = 'meshhook_limits'"
        echo "max_connections = 200"
        echo "log_min_messages = warning"
        echo "logging_collector = off"
        for line in "$@"; do echo "$line"; done
      } | as_pg tee -a "$data/postgresql.conf" >/dev/null
    fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      as_pg "$PG_BIN/pg_ctl" -D "$data" -l "$base/server.log" -w -t 60 start >/dev/null
    fi
    "$0" env "$name"
    ;;
  stop)
    [[ -f $data/PG_VERSION ]] && as_pg "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
  destroy)
    "$0" stop "$name"; rm -rf "$base"
    ;;
  env)
    port=$(sed -n "s/^port = \([0-9]*\)/\1/p" "$data/postgresql.conf" | tail -1)
    echo "export PGHOST=$base PGPORT=$port PGUSER=postgres PGDATA=$data PG_BIN=$PG_BIN"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
