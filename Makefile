# One command for each habit, used by people and CI alike.
#   make serve   install and serve (an embedded llama.cpp backend when none is configured)
#   make test    install everything the tests need and run them all
#   make check   format check, lint, types
#   make bench   the benchmark against a direct connection and nginx (about 50 minutes)
#   make bench-balance   the balancing strategies on a simulated fleet (about 15 minutes)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A portable llama.cpp build: the default (-march=native) can emit instructions that a
# virtual machine advertises but does not run, and a wheel built here is cached for reuse.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: install serve test check format system-packages bench bench-balance

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,llamacpp]'
	touch $@

install: $(VENV)/.installed

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

test: install system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install system-packages
	$(BIN)/python -m bench $(ARGS)

bench-balance: install system-packages
	$(BIN)/python -m bench balance $(ARGS)

check: install
	$(BIN)/ruff format --check gateway adapters tests bench
	$(BIN)/ruff check gateway adapters tests bench
	$(BIN)/mypy

format: install
	$(BIN)/ruff format gateway adapters tests bench
	$(BIN)/ruff check --fix gateway adapters tests bench
