# Two commands: `make demo` and `make test`. Both set everything up from nothing but Python 3.10+.
# `make test` is the fast suite (lint, unit and dag.test() tests); `make drills` runs the production
# drills (a real scheduler, triggerer and api-server); `make drills-distributed` the distributed ones
# (PostgreSQL, Redis, Celery); `make test-matrix` runs the fast suite, less its version-independent
# tests, on the other Airflow versions, Pythons and dependency versions (scripts/matrix.py: one uv
# environment per cell under .matrix/; MATRIX_CELLS=... picks cells). CI (.ci/run) runs all four.
PYTHON ?= python3
AIRFLOW_VERSION ?= 3.3.2
VENV ?= .venv
UV_HOME := .uv
UV := $(UV_HOME)/bin/uv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(AIRFLOW_VERSION)
MATRIX_JOBS ?= 2
# pytest-xdist workers for the fast suite (each has its own Airflow home and metadata DB)
TEST_WORKERS ?= 2
MATRIX_CELLS ?=

.PHONY: demo test drills lint setup clean test-matrix test-matrix-list bench under-load

setup: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install --quiet --disable-pip-version-check uv

$(STAMP): pyproject.toml $(UV)
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) -e '.[testing]' --group test "apache-airflow==$(AIRFLOW_VERSION)"
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -m "not drill" -n $(TEST_WORKERS)

# pytest exits 5 when it ran no test: make fails then too (a drill run that ran nothing is no pass).
drills: $(STAMP)
	$(PY) -m pytest tests/drills -m drill

test-matrix: $(UV)
	UV=$(abspath $(UV)) $(PYTHON) scripts/matrix.py --jobs $(MATRIX_JOBS) $(MATRIX_CELLS)

test-matrix-list:
	@$(PYTHON) scripts/matrix.py --list

# The benchmarks of BENCHMARKS.md, full mode (~25 min on 2 cores); each prints its Markdown table.
bench: $(STAMP)
	$(PY) benchmarks/bench_triggerer.py
	$(PY) benchmarks/bench_transfer.py
	$(PY) benchmarks/profile_transfer.py
	$(PY) benchmarks/bench_import.py
	$(PY) benchmarks/bench_hook.py
	$(PY) benchmarks/bench_budget.py
	$(PY) benchmarks/bench_webhooks.py

# The reliability proof of RELIABILITY.md: ROUNDS rounds of `make test` + `make drills` while two
# busy loops keep both cores loaded; prints each round's results and times.
ROUNDS ?= 3
under-load: $(STAMP)
	bash scripts/under_load.sh $(ROUNDS)

clean:
	rm -rf $(VENV) $(UV_HOME) .matrix build dist *.egg-info

# The distributed drills (RELIABILITY.md, "Distributed"): PostgreSQL and Redis from Debian's packages
# (apt-get installs them when missing: run as root), a CeleryExecutor with two workers, two triggerers,
# a batch against the rate-limited local ModelRoute server; four scenarios, ~10 min on 2 cores.
# ITEMS: executions per scenario; RATE_LIMIT: the local server's requests per minute per key.
ITEMS ?= 25
RATE_LIMIT ?= 60
.PHONY: drills-distributed
drills-distributed: $(STAMP)
	MODELROUTE_DRILLS_DISTRIBUTED=1 MODELROUTE_DISTRIBUTED_ITEMS=$(ITEMS) \
		MODELROUTE_DISTRIBUTED_RATE_LIMIT=$(RATE_LIMIT) $(PY) -m pytest tests/drills_distributed -m drill -q -s

# The release: sdist and wheel in dist/ (uv build), checked with twine; the version is __version__ in
# airflow_provider_modelroute/__init__.py.
.PHONY: dist test-dist
dist: $(UV)
	rm -rf dist
	$(UV) build --quiet --out-dir dist
	$(UV) tool run --quiet twine check --strict dist/*

# The built wheel installed with plain pip into fresh venvs (Airflow 3.3 and 2.11), running the
# README's first DAG to a landed file (slow: two Airflow installs; tests/test_dist.py).
test-dist: dist $(STAMP)
	MODELROUTE_WHEEL="$$(ls dist/*.whl)" $(PY) -m pytest tests/test_dist.py -m dist -n 2 -rA
