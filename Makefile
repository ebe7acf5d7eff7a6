# The README's commands. Each creates .venv if missing and installs the package under constraints.txt.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
# Re-install only when the project's metadata or pins change.
BASE_STAMP := $(VENV)/.installed-base
DEV_STAMP  := $(VENV)/.installed-dev
PYTEST_ARGS ?= -n 2

.PHONY: test demo bench lint install install-dev clean

$(PY):
	$(PYTHON) -c 'import sys; sys.exit("softmaxkit needs Python >= 3.10") if sys.version_info < (3, 10) else None'
	$(PYTHON) -m venv $(VENV)

# The demo needs the `cli` extra (scikit-learn, matplotlib, rich, typer, pandas); `dev` includes it.
$(BASE_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) -e ".[cli]"
	touch $@

$(DEV_STAMP): pyproject.toml constraints.txt | $(PY)
	$(PIP) -e ".[dev]"
	touch $@ $(BASE_STAMP)

install: $(BASE_STAMP)
install-dev: $(DEV_STAMP)

lint: $(DEV_STAMP)
	$(PY) -m ruff check src tests benchmarks

test: $(DEV_STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(BASE_STAMP)
	$(VENV)/bin/softmaxkit demo

bench: $(DEV_STAMP)
	$(PY) -m benchmarks --quick --no-csv

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
