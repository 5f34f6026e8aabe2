# shellcheck shell=bash
# Settings and helpers shared by start.sh and stop.sh (sourced).
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STATE=$(realpath -m "${FEDML_STACK_DIR:-$ROOT/.fedml/stack}")
VENV=${FEDML_VENV:-$ROOT/.venv}
PG_DATA=$(realpath -m "${FEDML_PG_DATA:-$STATE/postgres}")
PG_PORT=${FEDML_PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
PREFECT_PORT=${PREFECT_PORT:-4200}
SERVE_PORT=${FEDML_SERVE_PORT:-8000}
WORK_POOL=${FEDML_WORK_POOL:-fedml}
MODEL=${FEDML_MODEL:-shopping-guide}
SECRETS=$STATE/secrets
RUN=$STATE/run
LOGS=$STATE/logs
SERVICES=(postgres mlflow prefect deploy worker serve)

export PATH="$VENV/bin:$PATH"
# nothing the stack runs may phone home (the same defaults as flows/_env.py)
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
  PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY=false \
  PREFECT_SERVER_UI_ENABLED=${PREFECT_SERVER_UI_ENABLED:-true} GX_ANALYTICS_ENABLED=false \
  RAY_USAGE_STATS_ENABLED=0 FLWR_TELEMETRY_ENABLED=0 TQDM_DISABLE=1

say() { echo "[stack] $*"; }
die() { echo "[stack] error: $*" >&2; exit 1; }

# the pid of a service started by launch, when it is still running
running() {
  local pid
  [ -f "$RUN/$1.pid" ] || return 1
  pid=$(cat "$RUN/$1.pid")
  kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# launch NAME CMD...: run CMD in its own session (so that stop.sh ends its children too), log to logs/NAME.log
launch() {
  local name=$1; shift
  if running "$name" >/dev/null; then say "$name already running (pid $(running "$name"))"; return 0; fi
  mkdir -p "$RUN" "$LOGS"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  say "$name started (pid $!, log $LOGS/$name.log)"
}

# halt NAME: TERM the service's process group, KILL it after 30 s
halt() {
  local name=$1 pid i
  if ! pid=$(running "$name"); then rm -f "$RUN/$name.pid"; say "$name not running"; return 0; fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for i in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; fi
  rm -f "$RUN/$name.pid"
  say "$name stopped"
}

# wait_http NAME URL SECONDS: until URL answers 200, the service dies, or time runs out
wait_http() {
  local name=$1 url=$2 seconds=$3 deadline=$((SECONDS + $3))
  while [ $SECONDS -lt $deadline ]; do
    running "$name" >/dev/null || { tail -n 30 "$LOGS/$name.log" >&2; die "$name exited during start-up"; }
    if python -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$url" 2>/dev/null; then
      say "$name healthy at $url"
      return 0
    fi
    sleep 1
  done
  tail -n 30 "$LOGS/$name.log" >&2
  die "$name not healthy after $seconds s"
}

# select_services [SERVICE...]: the services named (default: all), checked; then `want NAME` tells if NAME is one
select_services() {
  wanted=("$@")
  [ ${#wanted[@]} -gt 0 ] || wanted=("${SERVICES[@]}")
  for service in "${wanted[@]}"; do
    [[ " ${SERVICES[*]} " == *" $service "* ]] || die "unknown service '$service' (one of: ${SERVICES[*]})"
  done
}
want() { [[ " ${wanted[*]} " == *" $1 "* ]]; }
