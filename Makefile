# Two commands do everything: `make serve` and `make test`. See README.md.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
GEN    := service/rnnserve/generated/rnnserve/v1/rnnserve_pb2.py
CONSTRAINTS := constraints.txt
PROTOS := $(shell find proto -name '*.proto')
IMAGE  ?= rnnserve
ORT    ?= cpu

.PHONY: install install-test constraints serve test docs test-container test-container-gpu train bench bench-soak bench-workers bench-gpu bench-scale-out bench-instructions bench-tiered proto lint torch-exports docker docker-gpu docker-train clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet -c $(CONSTRAINTS) pip

# Serving dependencies only (no TensorFlow), at the tested versions; installing the package
# generates its gRPC code from proto/ (setup.py). ORT=gpu installs onnxruntime-gpu instead of
# onnxruntime (the CUDA image does this).
INSTALL := $(PIP) install --quiet -c $(CONSTRAINTS)

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS) | $(PY)
	$(INSTALL) -e '.[$(ORT)]'
	touch $@

# An edited .proto: rebuild the package, which regenerates the code.
$(GEN): $(PROTOS)
	$(INSTALL) --no-deps -e .

install: $(STAMP) $(GEN)

proto: $(STAMP)
	$(INSTALL) --no-deps -e .

# Every flag also comes from its RNNSERVE_* variable (e.g. RNNSERVE_REPOSITORY=… make serve).
# The KServe v2 HTTP door on 8080 as in the container (RNNSERVE_HTTP_PORT=-1 turns it off).
serve: install
	RNNSERVE_HTTP_PORT=$${RNNSERVE_HTTP_PORT:-8080} $(VENV)/bin/rnnserve serve

# tritonclient (the KServe v2 tests' client) declares protobuf<7, but its generated code runs on
# our protobuf 7 (tests/test_kserve.py proves it), so here it goes in without its pins. Users who
# want it beside rnnserve: see the README (one pip command; pip then picks protobuf 6).
# geventhttpclient is what tritonclient.http needs (tests/test_http.py).
$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) $(STAMP)
	$(INSTALL) -e '.[$(ORT),training,test,docs]'
	$(INSTALL) --no-deps tritonclient python-rapidjson
	$(INSTALL) geventhttpclient
	touch $@

# checkov, which tests/test_deploy.py runs on deploy/kubernetes, in a virtual environment of
# its own: its many dependencies would conflict with the pinned set above.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := .venv-checkov

$(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION):
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV) || python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

install-test: install $(VENV)/.installed-test $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

test: install-test
	$(PY) -m pytest

train: install-test
	$(PY) -m training train --task all --out exported

bench: install-test
	$(PY) -m bench.streaming
	$(PY) -m bench.predict
	$(PY) -m bench.v2_unary
	$(PY) -m bench.ort_options
	$(PY) -m bench.plot

# A bounded soak: churn, long streams and big Predicts side by side, server RSS per round.
bench-soak: install-test
	$(PY) -m bench.soak

# CPU vs CUDA with host state vs CUDA with device-resident state, parity first (bench/gpu.py;
# needs onnxruntime-gpu: make install ORT=gpu).
bench-gpu: install-test
	$(PY) -m bench.gpu

# Steps/s and server CPU per step for 1, 2, 4, ... workers side by side (bench/workers.py).
bench-workers: install-test
	$(PY) -m bench.workers

# Instructions per message inside the server, beside the floor's; REV=<git rev> adds that
# revision's (bench/instructions.py; needs valgrind: apt-get install valgrind).
# 100,000 sessions through 1,000 in memory (--session-ttl and an SQLite store): cold and hot
# step latency side by side, every output checked (about 10 minutes on 2 cores).
bench-tiered: install-test
	$(PY) -m bench.tiered

bench-instructions: install-test
	$(PY) -m bench.instructions $(if $(REV),--against $(REV))

# Needs nginx and redis-server (Debian: apt-get install nginx redis-server).
bench-scale-out: install-test
	$(PY) -m bench.scale_out

# After changing pyproject.toml's ranges: record the set the tests then pass with.
# The CUDA block at the end (onnxruntime-gpu and its nvidia-* libraries) is kept as it is.
constraints: install-test
	{ sed -n '1,2p' $(CONSTRAINTS); $(PIP) freeze --all --exclude-editable \
	  | grep -v -E '^(rnnserve|setuptools|wheel)\b' | LC_ALL=C sort -f; \
	  sed -n '/^# The CUDA image/,$$p' $(CONSTRAINTS); } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

lint: install-test
	$(VENV)/bin/ruff check service training tests bench
	$(VENV)/bin/ruff format --check service training tests bench
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# The documentation site (docs/, mkdocs.yml) into site/: strict, so a broken link, a missing
# page or an unknown anchor fails, as in CI.
docs: install-test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# BuildKit builds only the stages a target needs (the CPU image never touches the CUDA
# libraries or TensorFlow). DOCKER_BUILD_ARGS passes more flags, e.g. the secrets of a private
# package index: DOCKER_BUILD_ARGS='--secret id=pipconf,src=pip.conf --secret id=pipca,src=ca.pem'
DOCKER ?= docker
DOCKER_BUILD := DOCKER_BUILDKIT=1 $(DOCKER) build $(DOCKER_BUILD_ARGS)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

docker:
	$(DOCKER_BUILD) --target cpu -t $(IMAGE):$(VERSION) -t $(IMAGE) .

docker-gpu:
	$(DOCKER_BUILD) --target gpu -t $(IMAGE):$(VERSION)-gpu -t $(IMAGE):gpu .

docker-train:
	$(DOCKER_BUILD) --target train -t $(IMAGE):train .

# The images as deployed, on a real Docker engine (`docker` must reach one: DOCKER_HOST). Not
# part of `make test`; CI runs it after, on the engine ../shared/container/engine.sh starts.
test-container: install-test
	$(PY) -m pytest -m container tests/container

# The CUDA image (a large download): every library ONNX Runtime's CUDA provider links resolves
# inside it but the driver's libcuda.so, checked without a GPU.
test-container-gpu: install-test
	$(PY) -m pytest -m container_gpu tests/container

# What today's torch.onnx.export writes, committed in tests/torch_exports/ (torch is far too
# heavy for the test environment). pip takes torch's CPU wheel where the machine's pip is set
# up with one (find-links); elsewhere point PIP_FIND_LINKS or PIP_INDEX_URL at one.
TORCH       := 2.13.0
ONNXSCRIPT  := 0.7.2
TORCH_VENV  := .venv-torch
torch-exports:
	$(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install --quiet -c $(CONSTRAINTS) \
		torch==$(TORCH) onnxscript==$(ONNXSCRIPT) numpy onnx
	$(TORCH_VENV)/bin/python tests/torch_exports/export.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(TORCH_VENV) service/rnnserve/generated .pytest_cache .ruff_cache bench/results site
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
