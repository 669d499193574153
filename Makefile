# Set-up is part of every target: the virtual environment is created (and the project
# installed into it) when missing or when pyproject.toml changed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench chaos lint clean lab docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m syft_split.demo $(ARGS)

# one pytest worker per core, a test file per worker at a time (module fixtures stay shared);
# PYTEST_ARGS="-n 0" runs everything in this process
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@set -e; for f in bench/*.py; do echo "== $$f"; $(PY) $$f $(BENCH_ARGS); done

# the chaos run (part of `make test`) once more, recording its summary in bench/results/chaos.json
chaos: $(STAMP)
	SYFT_SPLIT_RECORD=1 $(PY) -m pytest -n 0 "tests/test_chaos.py::test_chaos_run_equals_uninterrupted_run[plain]"

# JupyterLab on the tutorials (interactive: not part of test or CI)
lab: $(STAMP)
	$(PY) -m jupyter lab tutorials

# the documentation site into site/, warnings are errors; executes the tutorials whose
# executed copy in runs/notebooks/ is missing or older than the notebook (make test writes them)
docs: $(STAMP)
	$(PY) docs/notebooks.py --stale
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check syft_split he_layers tests bench docs tutorials/*.py
	$(PY) -m mypy syft_split

clean:
	rm -rf $(VENV) runs site docs/tutorials .cache .pytest_cache .mypy_cache .ruff_cache
