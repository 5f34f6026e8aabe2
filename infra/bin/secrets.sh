# shellcheck shell=bash
# Sourced by the stack's launchers: each secret may come as VAR or as VAR_FILE (a Docker secret, a
# file under the state dir). load_secrets sets VAR from the first line of VAR_FILE when VAR is unset.
FEDML_SECRET_VARS="FEDML_DB_PASSWORD MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_TRACKING_PASSWORD
FEDML_SERVE_TOKEN PREFECT_API_AUTH_STRING PREFECT_SERVER_API_AUTH_STRING"

load_secrets() {
  local var file file_var
  for var in $FEDML_SECRET_VARS; do
    file_var="${var}_FILE"
    file=${!file_var:-}
    if [ -z "${!var:-}" ] && [ -n "$file" ]; then
      [ -r "$file" ] || { echo "secret file $file ($file_var) is not readable" >&2; return 1; }
      export "$var=$(head -n 1 "$file")"
    fi
  done
}

# a value for a URL's user-info part (passwords may hold @, : or /); read from stdin, not argv
url_quote() { python -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.stdin.read().rstrip("\n"), safe=""))'; }

# the SQLAlchemy URL of database $2 with driver $1, from FEDML_DB_HOST/PORT/USER/PASSWORD
database_url() {
  : "${FEDML_DB_PASSWORD:?set FEDML_DB_PASSWORD or FEDML_DB_PASSWORD_FILE}"
  printf '%s://%s:%s@%s:%s/%s' "$1" "${FEDML_DB_USER:-fedml}" "$(printf '%s' "$FEDML_DB_PASSWORD" | url_quote)" \
    "${FEDML_DB_HOST:-127.0.0.1}" "${FEDML_DB_PORT:-5432}" "$2"
}

# new_secret FILE MODE [PREFIX]: a random secret (48 hex digits) in FILE, unless FILE has one already
new_secret() {
  [ -s "$1" ] && return 0
  (umask 077 && printf '%s%s\n' "${3:-}" "$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')" >"$1")
  chmod "$2" "$1"
}

# stack_secrets DIR MODE: every secret the stack needs, generated once into DIR (itself mode 700)
stack_secrets() {
  mkdir -p "$1"
  chmod 700 "$1"
  new_secret "$1/db_password" "$2"           # PostgreSQL role fedml
  new_secret "$1/mlflow_admin_password" "$2" # MLflow basic auth: user admin
  new_secret "$1/mlflow_secret_key" "$2"     # MLflow auth app: CSRF signing key
  new_secret "$1/prefect_auth" "$2" "admin:" # Prefect API basic auth, user:password
  new_secret "$1/serve_token" "$2"           # bearer token for POST /recommend
}
