# AI Shard developer commands. `make up` runs the local shard; `make check` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# uv from PATH, or bootstrapped into .tools/ on a machine that has only Python.
UV := $(or $(shell command -v uv 2>/dev/null),.tools/bin/uv)
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON ?= python3.11
RUN := $(UV) run --frozen

.PHONY: help install up check lint docs protos protos-check types test bench clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet "uv>=0.9,<1"

install: $(UV) ## Install every package and tool into .venv from uv.lock.
	$(UV) sync --frozen

up: install ## Start the whole shard locally with the demo models (Ctrl-C stops it).
	$(RUN) shard up

check: install lint protos-check types test ## Everything CI runs.

lint: ## buf lint and format, ruff lint and format, docs/cli.md up to date.
	$(RUN) python scripts/protos.py lint
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) python scripts/cli_docs.py check

docs: ## Regenerate docs/cli.md from the shard CLI.
	$(RUN) python scripts/cli_docs.py generate

protos: ## Regenerate the committed API package from protos/.
	$(RUN) python scripts/protos.py generate

protos-check: ## Fail when the committed generated API is stale.
	$(RUN) python scripts/protos.py check

types: ## mypy --strict over all hand-written code.
	$(RUN) mypy

test: ## The test suite, on real etcd, Triton and gRPC on loopback.
	$(RUN) pytest

bench: install ## Router and client-side routing against Triton gRPC; gateway against Triton HTTP; an encrypted task against the same requests sent directly.
	$(RUN) python -m bench.router_vs_direct
	$(RUN) python -m bench.gateway_vs_triton
	$(RUN) python -m bench.task_vs_direct

clean: ## Remove the environment and caches.
	rm -rf .venv .tools .mypy_cache .ruff_cache .pytest_cache
