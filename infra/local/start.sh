#!/usr/bin/env bash
# The production stack on one host, without containers:
#   postgres  PostgreSQL on 127.0.0.1 (databases mlflow, mlflow_auth, prefect)
#   mlflow    MLflow tracking server: PostgreSQL store, artifact folder, basic auth
#   prefect   Prefect API server on PostgreSQL, with basic auth
#   deploy    registers the scheduled training deployment (python -m flows.deploy; FEDML_DEPLOY_ARGS)
#   worker    a Prefect process worker on the work pool
#   serve     the serving API (python -m fedml.serving) for the production alias
#
#   infra/local/start.sh [SERVICE...]     start (default: all, in this order); idempotent
#   infra/local/stop.sh [SERVICE...]      stop (default: all, in reverse order)
#   . .fedml/stack/env                    client settings: MLFLOW_TRACKING_URI, credentials, PREFECT_API_URL, ...
#
# Everything lives under FEDML_STACK_DIR (default .fedml/stack): secrets/ (generated on first start,
# mode 600), logs/, run/ (pid files), postgres/ (FEDML_PG_DATA), mlartifacts/ (FEDML_ARTIFACTS_DESTINATION).
# Ports: FEDML_PG_PORT (55432), MLFLOW_PORT (5000), PREFECT_PORT (4200), FEDML_SERVE_PORT (8000).
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ -x "$VENV/bin/python" ] || die "no virtualenv at $VENV (make install, or set FEDML_VENV)"
ARTIFACTS=${FEDML_ARTIFACTS_DESTINATION:-$STATE/mlartifacts}
MLFLOW_URL=http://127.0.0.1:$MLFLOW_PORT
PREFECT_URL=http://127.0.0.1:$PREFECT_PORT/api

# shellcheck source=../bin/secrets.sh
. "$ROOT/infra/bin/secrets.sh"
mkdir -p "$RUN" "$LOGS"
stack_secrets "$SECRETS" 600

export FEDML_DB_HOST=127.0.0.1 FEDML_DB_PORT=$PG_PORT FEDML_DB_USER=${FEDML_DB_USER:-fedml}
export FEDML_DB_PASSWORD_FILE=$SECRETS/db_password
# what a client of the stack needs (the flow runs get it from the worker)
CLIENT_ENV=(
  MLFLOW_TRACKING_URI="$MLFLOW_URL" MLFLOW_TRACKING_USERNAME=admin
  MLFLOW_TRACKING_PASSWORD_FILE="$SECRETS/mlflow_admin_password"
  PREFECT_API_URL="$PREFECT_URL" PREFECT_API_AUTH_STRING_FILE="$SECRETS/prefect_auth"
)

start_postgres() {
  "$ROOT/infra/local/postgres.sh" start "$PG_DATA" "$PG_PORT" "$SECRETS/db_password" mlflow mlflow_auth prefect
}

start_mlflow() {
  launch mlflow env MLFLOW_ARTIFACTS_DESTINATION="$ARTIFACTS" MLFLOW_PORT="$MLFLOW_PORT" \
    MLFLOW_AUTH_ADMIN_PASSWORD_FILE="$SECRETS/mlflow_admin_password" \
    MLFLOW_FLASK_SERVER_SECRET_KEY_FILE="$SECRETS/mlflow_secret_key" MLFLOW_AUTH_CONFIG_PATH="$RUN/mlflow-auth.ini" \
    "$ROOT/infra/bin/mlflow-server"
}

start_prefect() {
  launch prefect env PREFECT_PORT="$PREFECT_PORT" PREFECT_HOME="$STATE/prefect-server" \
    PREFECT_SERVER_API_AUTH_STRING_FILE="$SECRETS/prefect_auth" "$ROOT/infra/bin/prefect-server"
}

run_deploy() {
  say "deploy: python -m flows.deploy --pool $WORK_POOL ${FEDML_DEPLOY_ARGS:-}"
  # shellcheck disable=SC2086  # FEDML_DEPLOY_ARGS is a list of words on purpose
  (cd "$ROOT" && env "${CLIENT_ENV[@]}" PREFECT_HOME="$STATE/prefect-client" \
    "$ROOT/infra/bin/with-secrets" python -m flows.deploy --pool "$WORK_POOL" ${FEDML_DEPLOY_ARGS:-}) 2>&1 |
    tee -a "$LOGS/deploy.log"
}

start_worker() {
  launch worker env "${CLIENT_ENV[@]}" PREFECT_HOME="$STATE/prefect-worker" \
    "$ROOT/infra/bin/with-secrets" prefect worker start --pool "$WORK_POOL" --type process --install-policy never \
    --name "local-$(hostname)"
}

start_serve() {
  launch serve env "${CLIENT_ENV[@]}" FEDML_SERVE_TOKEN_FILE="$SECRETS/serve_token" \
    "$ROOT/infra/bin/with-secrets" python -m fedml.serving --model "$MODEL" --alias production \
    --host 127.0.0.1 --port "$SERVE_PORT"
}

wait_worker() {
  local deadline=$((SECONDS + 120))
  until grep -q "started!" "$LOGS/worker.log" 2>/dev/null; do
    running worker >/dev/null || { tail -n 30 "$LOGS/worker.log" >&2; die "worker exited during start-up"; }
    [ $SECONDS -lt $deadline ] || die "worker not started after 120 s (see $LOGS/worker.log)"
    sleep 1
  done
  say "worker polling work pool '$WORK_POOL'"
}

write_env() {
  (umask 077 && cat >"$STATE/env" <<ENV
# client settings for the stack in $STATE:  . $STATE/env
export MLFLOW_TRACKING_URI=$MLFLOW_URL
export MLFLOW_TRACKING_USERNAME=admin
export MLFLOW_TRACKING_PASSWORD="\$(head -n 1 '$SECRETS/mlflow_admin_password')"
export PREFECT_API_URL=$PREFECT_URL
export PREFECT_API_AUTH_STRING="\$(head -n 1 '$SECRETS/prefect_auth')"
export FEDML_SERVE_URL=http://127.0.0.1:$SERVE_PORT
export FEDML_SERVE_TOKEN="\$(head -n 1 '$SECRETS/serve_token')"
ENV
  )
}

select_services "$@"

want postgres && start_postgres
want mlflow && start_mlflow
want prefect && start_prefect  # both servers start at once; each takes 10-30 s
want mlflow && wait_http mlflow "$MLFLOW_URL/health" 240
want prefect && wait_http prefect "$PREFECT_URL/health" 240
want deploy && run_deploy
want worker && start_worker && wait_worker
want serve && start_serve && wait_http serve "http://127.0.0.1:$SERVE_PORT/healthz" 180
write_env
say "up: ${wanted[*]}; client settings: . $STATE/env"
