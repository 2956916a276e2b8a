# The front door: `make demo` runs the main job, `make test` runs the tests.
# Each target creates/refreshes the local virtualenv (.venv) by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: venv demo test unit integration lint bench up proto clean soak image

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(STAMP)

venv: $(STAMP)

## The main job: a local 3-node cluster serving worker processes that share a model's weights.
demo: $(STAMP)
	$(BIN)/tensorcache demo

## Everything CI checks: lint, the layering contracts, generated-code freshness, unit + integration tests.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/lint_imports.py
	$(BIN)/python scripts/typecheck.py
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

integration: $(STAMP)
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python scripts/lint_imports.py
	$(BIN)/python scripts/typecheck.py
	$(BIN)/ruff format --check .

## A bounded soak under faults (tests/soak): SOAK_SECONDS (default 120), SOAK_SEED to repeat one.
soak: $(STAMP)
	$(BIN)/python -m tests.soak.run

## Side-by-side benchmark vs Redis, Arrow Flight, a raw socket, memcpy (QUICK=1: smoke run).
bench: $(STAMP)
	$(BIN)/python -m bench $(if $(QUICK),--quick)
	$(BIN)/python -m bench.tiers $(if $(QUICK),--quick)  # compression per tensor kind; RAM vs disk tier vs file
	$(BIN)/python -m bench.tls $(if $(QUICK),--quick)  # data path: plaintext vs tokens vs mutual TLS
	$(BIN)/python -m bench.weights $(if $(QUICK),--quick)  # safetensors -> CPU tensors: cluster vs disk cold/warm
	$(BIN)/python -m bench.metrics_overhead $(if $(QUICK),--quick)  # get/put with metrics on vs off
	$(BIN)/python -m bench.torchget $(if $(QUICK),--quick)  # torch get vs numpy get; CUDA get vs host get (CUDA hosts)
	$(BIN)/python -m bench.kv $(if $(QUICK),--quick)  # prefix KV reuse: TTFT cached vs recompute; KV GB/s
	$(BIN)/python -m bench.smallops $(if $(QUICK),--quick)  # 4 KiB get/put, version, near hits, delete, put_many/get_many: vs Redis

## A local cluster in the foreground (Ctrl-C stops it).
up: $(STAMP)
	$(BIN)/tensorcache up

## Container image for k8s/ (needs docker or podman): make image [IMAGE=registry/name:tag].
IMAGE     ?= tensorcache:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CONTAINER ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
image:
	@test -n "$(CONTAINER)" || { echo "make image: needs docker or podman on PATH" >&2; exit 1; }
	$(CONTAINER) build -t $(IMAGE) .

## Regenerate proto/*_pb2*.py from proto/tensorcache.proto.
proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache *.egg-info
