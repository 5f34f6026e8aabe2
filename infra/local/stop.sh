#!/usr/bin/env bash
# Stop the one-host stack started by start.sh: infra/local/stop.sh [SERVICE...] (default: all).
# Data, secrets and logs stay in FEDML_STACK_DIR; remove that folder to start afresh.
set -euo pipefail
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[ -d "$STATE" ] || { say "no stack in $STATE"; exit 0; }
select_services "$@"

want serve && halt serve
want worker && halt worker
want prefect && halt prefect
want mlflow && halt mlflow
want postgres && "$ROOT/infra/local/postgres.sh" stop "$PG_DATA"
exit 0
