# `make run`: create .venv if missing, install, run the whole pipeline on the embedded synthetic data.
# `make test`: the same install, then the test suite. Both are fast when already installed.
# The install includes examples/external-plugin (fuserec-rp3beta), a plugin found only via its entry point.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fuserec-installed
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: install run test lint typecheck docs clean

$(STAMP): pyproject.toml examples/external-plugin/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q -e examples/external-plugin
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/fuserec run

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/pytest -q tests examples/external-plugin/tests
	$(DOCS_BUILD)

# `make docs`: the documentation site (MkDocs, Material, mkdocstrings), offline, warnings are errors.
DOCS_BUILD := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site
docs: install
	$(DOCS_BUILD)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# `make typecheck`: mypy --strict (less warn_return_any) over fuserec/, settings in pyproject.toml [tool.mypy].
typecheck: install
	$(VENV)/bin/mypy

clean:
	rm -rf outputs .prefect
