# twodwalk developer entry points (GNU make or BSD/macOS make 3.81+).
#   make venv   create .venv (if missing) and install twodwalk[dev] editable
#   make lab    open the notebooks in JupyterLab
#   make check  the fast loop: lint, format check, type check, tests without the slow groups
#   make test   lint, format check, type check, notebook strip check, tests + notebooks
#   make figures  every notebook's figures as PNGs in build/figures/, for review by eye
#   make lite   the tutorial as a static JupyterLite site in build/lite/ (no server needed;
#               PYODIDE_DIST=... points the build at an official Pyodide 0.27.7 release)
# Override the interpreter with e.g. `make test PYTHON=python3.12` (needs >= 3.11).

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.twodwalk-installed

.PHONY: venv lab check test bench figures lite clean-venv

venv: $(STAMP)

$(VPY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
		|| { echo "error: $(PYTHON) is older than 3.11; run make PYTHON=/path/to/python3.11+" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip

# Re-install only when pyproject.toml is newer than the stamp (or the venv is new).
$(STAMP): pyproject.toml $(VPY)
	$(VPY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

lab: $(STAMP)
	$(VPY) -m jupyter lab $$([ "$$(id -u)" = 0 ] && echo --allow-root) notebooks/00-start-here.ipynb

check: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy
	$(VPY) -m pytest -q -m "not slow" tests

test: $(STAMP)
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy
	$(VPY) -m nbstripout --verify notebooks/*.ipynb
	$(VPY) -m pytest tests

bench: $(STAMP)
	$(VPY) benchmarks/run.py

figures: $(STAMP)
	$(VPY) tools/figures.py build/figures

lite: $(STAMP)
	$(VPY) lite/build.py

clean-venv:
	rm -rf $(VENV)
