#!/usr/bin/env bash
# A throwaway PgBouncer (Debian's package) in front of a local PostgreSQL,
# run as the `postgres` OS user (PgBouncer refuses root): transaction
# pooling, default_pool_size 2, trust over 127.0.0.1, admin console
# (database pgbouncer) for user postgres, read-only (stats_users) for
# user meshhook_stats. Used by the tests, the demo and
# benches/pooler.sh.
#   scripts/pgbouncer.sh start NAME PG_PORT [extra [pgbouncer] ini lines...]
#   scripts/pgbouncer.sh stop NAME
#   scripts/pgbouncer.sh env NAME     prints PGBOUNCER_PORT / PGBOUNCER_PID exports
set -euo pipefail
cmd=${1:?usage: pgbouncer.sh start|stop|env NAME [PG_PORT]}; name=${2:?name}; shift 2
base=/tmp/meshhook_limits/pgbouncer-$name
as_pg() { if [[ $(id -un) == postgres ]]; then "$@"; elif [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else sudo -u postgres "$@"; fi; }
running() { [[ -f $base/pgbouncer.pid ]] && kill -0 "$(cat "$base/pgbouncer.pid")" 2>/dev/null; }

case $cmd in
  start)
    pg_port=${1:?PG_PORT}; shift
    command -v pgbouncer >/dev/null || { echo "pgbouncer is not installed (scripts/setup.sh installs it)" >&2; exit 1; }
    mkdir -p /tmp/meshhook_limits "$base"; chown postgres "$base" 2>/dev/null || true
    if ! running; then
      # A restart keeps the address of the first start.
      port=$(sed -n "s/^listen_port = \([0-9]*\)/\1/p" "$base/pgbouncer.ini" 2>/dev/null || true)
      [[ -n $port ]] || port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
      {
        echo "[databases]"
        echo "* = host=127.0.0.1 port=$pg_port"
        echo "[pgbouncer]"
        echo "listen_addr = 127.0.0.1"
        echo "listen_port = $port"
        echo "unix_socket_dir = $base"
        echo "auth_type = trust"
        echo "auth_file = $base/users.txt"
        echo "admin_users = postgres"
        echo "stats_users = meshhook_stats"
        echo "pool_mode = transaction"
        echo "default_pool_size = 2"
        echo "max_client_conn = 1000"
        echo "log_connections = 0"
        echo "log_disconnections = 0"
        echo "logfile = $base/pgbouncer.log"
        echo "pidfile = $base/pgbouncer.pid"
        for line in "$@"; do echo "$line"; done
      } >"$base/pgbouncer.ini"
      printf '"postgres" ""\n"meshhook_stats" ""\n' >"$base/users.txt"
      chown postgres "$base"/* 2>/dev/null || true
      as_pg pgbouncer -d "$base/pgbouncer.ini"
      for _ in $(seq 1 100); do
        psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d pgbouncer -c "SHOW VERSION" >/dev/null 2>&1 && break
        sleep 0.1
      done
    fi
    "$0" env "$name"
    ;;
  stop)
    if running; then
      pid=$(cat "$base/pgbouncer.pid")
      kill -CONT "$pid" 2>/dev/null || true
      kill -INT "$pid"
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    fi
    ;;
  env)
    port=$(sed -n "s/^listen_port = \([0-9]*\)/\1/p" "$base/pgbouncer.ini")
    echo "export PGBOUNCER_PORT=$port PGBOUNCER_PID=$(cat "$base/pgbouncer.pid" 2>/dev/null || echo 0)"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
