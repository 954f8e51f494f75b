# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap what they need
# (venv, pinned deps, the Debian corpora) and are quick no-ops on a second run.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

.PHONY: demo test setup corpora bench clean

setup: $(STAMP) corpora

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so nothing later pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

corpora:
	@bash scripts/ensure-corpora.sh

demo: setup
	$(VENV)/bin/lmdistill demo

test: setup
	$(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

bench: setup
	$(PY) bench/losses.py

clean:
	rm -rf runs .cache
