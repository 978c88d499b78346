#!/usr/bin/env bash
# Starts or stops a throwaway PostgreSQL on 127.0.0.1 whose data lives in DIR.
#
#   scripts/postgres.sh start DIR   prints the server's URL (its "postgres" database) and
#                                   keeps it in DIR/url; already running: prints it again
#   scripts/postgres.sh stop DIR    stops that server (DIR stays; remove it to throw it away)
#
# PostgreSQL refuses to run as root, so as root the server runs as PG_OS_USER (default: the
# Debian package's "postgres" user, else a "pgtest" user created on first use). PGPORT picks
# the port (default: a free one). The settings trade durability for speed: tests only.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)
data="$dir/data"

bindir=${PG_BINDIR:-}
if [ -z "$bindir" ]; then
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
fi
[ -x "$bindir/pg_ctl" ] || { echo "PostgreSQL server tools not found (apt-get install postgresql)" >&2; exit 1; }

run_as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$os_user" -- "$@"
  else
    "$@"
  fi
}

os_user=$(id -un)
if [ "$(id -u)" = 0 ]; then
  os_user=${PG_OS_USER:-}
  if [ -z "$os_user" ]; then
    if id postgres >/dev/null 2>&1; then os_user=postgres; else os_user=pgtest; fi
  fi
  id "$os_user" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$os_user"
  chown "$os_user" "$dir"
  if ! runuser -u "$os_user" -- test -w "$dir"; then
    echo "$dir must be reachable by the user $os_user (a folder under /tmp works)" >&2
    exit 1
  fi
fi

case "$action" in
  start)
    if run_as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      cat "$dir/url"
      exit 0
    fi
    if [ ! -s "$data/PG_VERSION" ]; then
      run_as_owner "$bindir/initdb" -D "$data" -U postgres --auth=trust --encoding=UTF8 --locale=C.UTF-8 \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    port=${PGPORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    run_as_owner mkdir -p "$dir/run"
    # Every gunicorn worker keeps a pool plus one listening connection, so allow plenty.
    run_as_owner "$bindir/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir/run -c max_connections=500 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      start >/dev/null || { tail -n 20 "$dir/server.log" >&2; exit 1; }
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/postgres" >"$dir/url"
    cat "$dir/url"
    ;;
  stop)
    if run_as_owner "$bindir/pg_ctl" -D "$data" status >/dev/null 2>&1; then
      run_as_owner "$bindir/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    fi
    ;;
  *)
    usage
    ;;
esac
