# Billing Ops. `make run` and `make test` need nothing but Python 3.11+ on the machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: run test bench soak lint services stop status install clean help

help:
	@echo "make run     - web + worker + beat + demo data (private PostgreSQL/Redis unless URLs are set)"
	@echo "make test    - the whole test suite (same bootstrap)"
	@echo "make bench   - benchmarks on the demo data (prints figures; see README)"
	@echo "make soak    - 20 users browse while a 1,000,000-line upsert and a lock cleanup run"
	@echo "               (SOAK_ARGS=--short: the bounded CI version; see README)"
	@echo "make lint    - ruff and mypy"
	@echo "make services / stop / status - the private PostgreSQL and Redis alone"

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m billing_ops.devstack run

test: $(STAMP)
	$(PY) -m billing_ops.devstack test $(PYTEST_ARGS)

# mypy loads the settings (django-stubs); these placeholders only let them load, nothing connects.
TYPECHECK_ENV := DJANGO_SECRET_KEY=typecheck-only DATABASE_URL=postgresql://typecheck@localhost/typecheck \
	REDIS_URL=redis://localhost/0 BILLING_OPS_ENVIRONMENTS=.ci/environments.toml

bench: $(STAMP)
	$(PY) -m billing_ops.devstack bench $(BENCH_ARGS)

soak: $(STAMP)
	$(PY) -m billing_ops.devstack soak $(SOAK_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(TYPECHECK_ENV) $(VENV)/bin/mypy billing_ops locks reconciliation audit

services: $(STAMP)
	$(PY) -m billing_ops.devstack up

stop: $(STAMP)
	$(PY) -m billing_ops.devstack down

status: $(STAMP)
	$(PY) -m billing_ops.devstack status

clean:
	rm -rf $(VENV) var
