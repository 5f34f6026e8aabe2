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
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m flows.pipeline $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Engine benchmark (bench/engine.py): writes bench/results/engine.json. QUICK=1 for the 2-minute version.
bench-engine: $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.engine $(if $(QUICK),--quick) $(BENCH_ARGS)

clean:
	rm -rf .fedml .pytest_cache
