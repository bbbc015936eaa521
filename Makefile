# adaparse-jax: `make test`, `make demo`, `make bench` on a fresh machine.
# Each target creates the virtual environment it needs in .venv (override with VENV=...).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# Two workers (three were tried on the 2-core CI machine: 11:46 of pytest either way).
PYTEST_ARGS ?= -n 2 --dist loadgroup
QUICK ?= 0

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(PY) -m adaparse_jax.demo

bench: $(STAMP)
	$(PY) -m benchmarks.run $(if $(filter 1,$(QUICK)),--quick,)

clean:
	rm -rf $(VENV) .pytest_cache
