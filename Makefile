# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(PY) -m fastclass.demo run demo

test: venv
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow"

bench: venv
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) bench/ingest.py
	$(PY) bench/verify.py
	$(PY) bench/dedup.py
	$(PY) bench/split.py
	$(PY) bench/crawl.py
	$(PY) bench/train.py
	$(PY) bench/scaling.py
	$(PY) bench/startup.py

clean:
	rm -rf demo bench/out .pytest_cache
