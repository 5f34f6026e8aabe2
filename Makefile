# Two commands do all set-up on a fresh machine:  make run  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Telemetry off for every tool (flows/_env.py sets the same defaults for direct `python -m` runs).
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY := false
export GX_ANALYTICS_ENABLED := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install run test bench-engine clean

install: $(STAMP)

# torch first, pinned to the CPU wheel, so that nothing later pulls a newer (CUDA) build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,flower]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m flows.pipeline $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Engine benchmark (bench/engine.py): writes bench/results/engine.json. QUICK=1 for the 2-minute version.
bench-engine: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.engine $(if $(QUICK),--quick) $(BENCH_ARGS)

# The shopping guide over HTTP (fedml/serving): models:/$(MODEL)@$(ALIAS) from MLFLOW_TRACKING_URI, by default
# the pipeline's embedded store. FEDML_SERVE_TOKEN, when set, guards POST /recommend. SERVE_ARGS: more flags.
.PHONY: serve bench-serve
MODEL ?= shopping-guide
ALIAS ?= production
HOST ?= 127.0.0.1
PORT ?= 8000
serve: $(STAMP)
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$${FEDML_HOME:-$(CURDIR)/.fedml}/mlflow.db} \
	$(PY) -m fedml.serving --model $(MODEL) --alias $(ALIAS) --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# Load test of the serving API on loopback (bench/serve.py): writes bench/results/serve.json.
bench-serve: $(STAMP)
	$(PY) -m bench.serve $(BENCH_ARGS)

# Quality benchmark (bench/quality.py): the privacy-utility sweep (DP-FedAvg, DP-SGD, local DP at epsilon 1-16) with
# federated, central, EASE and popularity references on MovieLens 100K, Tmall (../shared/data) and a synthetic shop of
# 100,000 shoppers; writes bench/results/quality.json and quality.png. QUICK=1: the CI check (quality-quick.*).
.PHONY: bench-quality
bench-quality: $(STAMP)
	$(PY) -m bench.quality $(if $(QUICK),--quick) $(BENCH_ARGS)

# Poisoned-clients benchmark (bench/robust.py): HR@10 with 10% of clients scaled or sign-flipped, with and without
# norm bounding + trimmed mean; writes bench/results/robust.json (QUICK=1: a small shop, robust-quick.json).
.PHONY: bench-robust
bench-robust: $(STAMP)
	$(PY) -m bench.robust $(if $(QUICK),--quick) $(BENCH_ARGS)

clean:
	rm -rf .fedml .pytest_cache

# Scheduled retraining (flows/deploy.py): the deployment shopping-guide-training/nightly, cron 0 2 * * * UTC, on the
# process work pool $(POOL) of the Prefect server at PREFECT_API_URL; `make worker` runs its flow runs.
# DEPLOY_ARGS: --cron, --timezone, --set section.key=value, --policy, --serve (no pool: this process runs the schedule).
.PHONY: deploy worker stack-up stack-down
POOL ?= fedml
deploy: $(STAMP)
	$(PY) -m flows.deploy --pool $(POOL) $(DEPLOY_ARGS)

worker: $(STAMP)
	$(VENV)/bin/prefect worker start --pool $(POOL) --type process --install-policy never

# The production stack on this host without containers (infra/local): PostgreSQL, MLflow server, Prefect server, the
# deployment, a worker and the serving API; data, logs, pid files and secrets in .fedml/stack. SERVICES: a subset.
stack-up: $(STAMP)
	infra/local/start.sh $(SERVICES)

stack-down:
	infra/local/stop.sh $(SERVICES)
