# Morgana: `make run` starts the backend on embedded defaults; `make test` runs the suite.
# Everything a target needs is installed by the target itself (pinned, cached in .cache/).

SHELL := /bin/bash
UV_VERSION := 0.13.8
UV := $(shell command -v uv 2>/dev/null || echo .cache/uv/bin/uv)
SYNC := $(UV) sync --frozen --extra api --extra agent
RUN := $(UV) run --frozen --extra api --extra agent
PYTEST_ARGS ?=
# Byte-compiled once at install, as in the images: where PYTHONDONTWRITEBYTECODE is set (CI,
# containers), every process would otherwise compile each module it imports from source: 3.5 s
# more CPU for each agent worker's forkserver, 0.3 s more for each call's process.
export UV_COMPILE_BYTECODE := 1

.PHONY: help install test-tools lint run test bench migrate check-config clean

help:
	@echo "make run          start the API on http://localhost:$${PORT:-8000} (embedded Postgres, local model; voice once make test built LiveKit)"
	@echo "make test         install test dependencies, lint and type-check, and run the whole suite"
	@echo "make lint         ruff (lint and format check) and mypy --strict on the product code"
	@echo "make bench        run the benchmarks (API beside a raw Starlette baseline; voice turn latency;"
	@echo "                  autoscaler reaction beside KEDA/HPA defaults; a soak, SOAK_MINUTES=3)"
	@echo "make migrate      apply database migrations to the configured database"
	@echo "make check-config validate the configuration from the environment and .env"

.cache/uv/bin/uv:
	python3 -m venv .cache/uv
	.cache/uv/bin/pip install --quiet "uv==$(UV_VERSION)"

install: $(if $(filter .cache/uv/bin/uv,$(UV)),.cache/uv/bin/uv)
	$(SYNC)

run: install
	.venv/bin/python -m morgana_devtools.run

# Debian packages (espeak-ng for the speech stand-in, shellcheck, podman/buildah/runc/mmdebstrap
# for the images, containerd and the CNI plugins for the node), and from the Go module proxy at
# pinned releases a LiveKit server, helm, etcd, kube-apiserver, kube-controller-manager, kubectl,
# and for a real node kubelet, kube-scheduler, kube-proxy and CoreDNS, cached in
# ~/.cache/morgana/tools (reused by CI; the first build takes several minutes). The images themselves are built by the tests
# (scripts/build-images.sh), from the code under test.
test-tools:
	bash scripts/install-test-deps.sh
	bash scripts/build-livekit-server.sh
	bash scripts/build-k8s-tools.sh
	bash scripts/build-node-tools.sh

# ruff over the whole tree; mypy (strict) over the product code: src/ and controller/.
lint: install
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

test: install lint test-tools
	$(RUN) pytest $(PYTEST_ARGS)

bench: install test-tools
	$(RUN) python -m bench.api_bench $(BENCH_ARGS)
	$(RUN) python -m bench.stream_log_bench $(BENCH_ARGS)
	$(RUN) python -m bench.voice_bench $(BENCH_ARGS)
	$(RUN) python -m bench.controller_bench $(BENCH_ARGS)
	$(RUN) python -m bench.soak --minutes $${SOAK_MINUTES:-3}

migrate: install
	$(RUN) morgana-api migrate

check-config: install
	$(RUN) morgana-api check-config

clean:
	rm -rf .venv .cache .pytest_cache bench-results
