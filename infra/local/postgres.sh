#!/usr/bin/env bash
# A PostgreSQL cluster on 127.0.0.1 for the stack on one host (and for the tests): created on first
# start, with one login role that owns the stack's databases.
#
#   infra/local/postgres.sh start DATADIR PORT PASSWORD_FILE [DATABASE...]
#   infra/local/postgres.sh stop DATADIR
#   infra/local/postgres.sh status DATADIR
#
# FEDML_DB_USER names the role (default fedml); its password is the first line of PASSWORD_FILE.
# The server listens on 127.0.0.1:PORT only (password auth, scram-sha-256) and on a Unix socket in
# DATADIR (peer auth, used here to create the role and databases). initdb refuses to run as root:
# as root the cluster belongs to the `postgres` user, so DATADIR's parents must let that user in
# (/tmp or /var/lib/postgresql do; a folder under /root does not). Logs: DATADIR/server.log.
set -euo pipefail

die() { echo "postgres.sh: $*" >&2; exit 1; }

pg_bindir() {
  local dir
  if [ -n "${FEDML_PG_BIN:-}" ]; then echo "$FEDML_PG_BIN"; return; fi
  # the newest installed major version (Debian: /usr/lib/postgresql/<major>/bin)
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] || dir=$(dirname "$(command -v postgres 2>/dev/null || command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")
  [ -x "$dir/pg_ctl" ] || die "PostgreSQL not found (apt-get install postgresql, or set FEDML_PG_BIN)"
  echo "$dir"
}

# run a command as the cluster's owner: `postgres` when we are root, else ourselves
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

owner_name() { if [ "$(id -u)" = 0 ]; then echo postgres; else id -un; fi; }

sql_quote() { local s=${1//\'/\'\'}; printf "'%s'" "$s"; }

start() {
  local data=$1 port=$2 password_file=$3; shift 3
  local bin user password
  bin=$(pg_bindir)
  user=${FEDML_DB_USER:-fedml}
  [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
  [[ $user =~ ^[a-z_][a-z0-9_]*$ ]] || die "FEDML_DB_USER must be a plain lower-case name, got '$user'"
  [ -r "$password_file" ] || die "password file not readable: $password_file"
  password=$(head -n 1 "$password_file")
  [ -n "$password" ] || die "password file is empty: $password_file"
  for db in "$@"; do
    [[ $db =~ ^[a-z_][a-z0-9_]*$ ]] || die "database names must be plain lower-case names, got '$db'"
  done

  mkdir -p "$data"
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || die "no 'postgres' user to run the server as (apt-get install postgresql creates it)"
    chown postgres: "$data"
    chmod 700 "$data"
    as_owner test -w "$data" || die "the postgres user cannot reach $data: choose a DATADIR under /tmp or /var/lib/postgresql"
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    as_owner "$bin/initdb" -D "$data" --username="$(owner_name)" --encoding=UTF8 --locale=C \
      --auth-local=peer --auth-host=scram-sha-256 --no-instructions >/dev/null
  fi
  if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    echo "postgres already running in $data"
  else
    as_owner "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories='$data'" start >/dev/null ||
      { tail -n 20 "$data/server.log" >&2; die "postgres did not start"; }
  fi

  # the role, its password and the databases (idempotent); the password goes in on stdin, not argv
  {
    echo "SELECT format('CREATE ROLE %I LOGIN', '$user') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user')\\gexec"
    echo "ALTER ROLE $user WITH LOGIN PASSWORD $(sql_quote "$password");"
    for db in "$@"; do
      echo "SELECT format('CREATE DATABASE %I OWNER %I', '$db', '$user') WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db')\\gexec"
    done
  } | as_owner "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$data" -p "$port" -d postgres >/dev/null
  echo "postgres on 127.0.0.1:$port (data $data, role $user, databases: ${*:-none})"
}

stop() {
  local data=$1 bin
  bin=$(pg_bindir)
  [ -f "$data/PG_VERSION" ] || { echo "no cluster in $data"; return 0; }
  if as_owner "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_owner "$bin/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null
    echo "postgres stopped ($data)"
  else
    echo "postgres not running ($data)"
  fi
}

status() {
  as_owner "$(pg_bindir)/pg_ctl" -D "$1" status
}

case "${1:-}" in
  start) [ $# -ge 4 ] || die "usage: $0 start DATADIR PORT PASSWORD_FILE [DATABASE...]"; shift; start "$@" ;;
  stop) [ $# -eq 2 ] || die "usage: $0 stop DATADIR"; stop "$2" ;;
  status) [ $# -eq 2 ] || die "usage: $0 status DATADIR"; status "$2" ;;
  *) die "usage: $0 start|stop|status DATADIR ..." ;;
esac
