# jdcloud-image-sync. Every target bootstraps .venv itself: a fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv jdc demo test test-db lint format bench bench-small bench-accounts bench-scale soak lock clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required (found %s); set PYTHON=python3.11" % sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev]'
	@touch $(STAMP)

venv: $(STAMP)

## make jdc: the JD Cloud CLI in .venv-jdc/ (its pins conflict with .venv), for tests/test_jdc_cli.py.
JDC_STAMP := .venv-jdc/.installed-stamp
$(JDC_STAMP): tests/jdc-requirements.txt
	$(PYTHON) -m venv .venv-jdc
	.venv-jdc/bin/python -m pip install --quiet --disable-pip-version-check -r tests/jdc-requirements.txt
	@touch $(JDC_STAMP)

jdc: $(JDC_STAMP)

## make demo: simulator + embedded PostgreSQL, sync, change, sync, show the history.
demo: $(STAMP)
	$(BIN)/image-sync demo

## make test: the whole suite on TEST_DATABASE_URL, or an embedded PostgreSQL when unset.
## It runs in TEST_WORKERS pytest-xdist workers (each with a database of its own, and an
## embedded server of its own when TEST_DATABASE_URL is unset), a module per worker at a time;
## then the few `long` tests (soak, kill samples) alone: they measure windows of time that
## a second worker's CPU load made them miss.
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not long" $(PARALLEL)
	$(BIN)/python -m pytest -m "long and not slow"

## make test-db: only the tests that use a database (CI reruns them on the system PostgreSQL).
test-db: $(STAMP)
	$(BIN)/python -m pytest -m "db and not slow and not long" $(PARALLEL)
	$(BIN)/python -m pytest -m "db and long and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m bench

bench-small: $(STAMP)
	$(BIN)/python -m bench --small

## make bench-accounts: one daemon tick over BENCH_ACCOUNTS=100 accounts, 3 daemons vs 1.
BENCH_ACCOUNTS ?= 100
bench-accounts: $(STAMP)
	$(BIN)/python -m bench --accounts $(BENCH_ACCOUNTS)

## make bench-scale: 10k, 100k and 1M images without latency, and the point-in-time reads
## on a synthesised 1M-image / 3M-event history (about 15 minutes on 2 cores).
bench-scale: $(STAMP)
	$(BIN)/python -m bench --scale --history

## make soak: replicas, churn, faults, kills and a database restart; SOAK_MINUTES=20 by default.
SOAK_MINUTES ?= 20
soak: $(STAMP)
	$(BIN)/python -m bench.soak --minutes $(SOAK_MINUTES)

## make lock: refresh requirements.lock (used by the Dockerfile) from pyproject.toml.
lock: $(STAMP)
	deploy/tools/lock.sh

clean:
	rm -rf $(VENV) .venv-jdc .pytest_cache .mypy_cache .ruff_cache
