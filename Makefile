# Two commands do everything: `make serve` and `make test`. See README.md.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
GEN    := service/generated/rnnserve/v1/rnnserve_pb2.py
CONSTRAINTS := constraints.txt
PROTOS := $(shell find proto -name '*.proto')
IMAGE  ?= rnnserve
ORT    ?= cpu

.PHONY: install install-test constraints serve test train bench bench-soak bench-workers bench-gpu bench-scale-out bench-instructions proto lint docker docker-gpu docker-train clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

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
serve: install
	$(VENV)/bin/rnnserve serve

# tritonclient (the KServe v2 tests' client) declares protobuf<7, but its generated code runs on
# our protobuf 7 (tests/test_kserve.py proves it), so here it goes in without its pins. Users who
# want it beside rnnserve: see the README (one pip command; pip then picks protobuf 6).
$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS) $(STAMP)
	$(INSTALL) -e '.[$(ORT),training,test]'
	$(INSTALL) --no-deps tritonclient python-rapidjson
	touch $@

install-test: install $(VENV)/.installed-test

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
bench-instructions: install-test
	$(PY) -m bench.instructions $(if $(REV),--against $(REV))

# Needs nginx and redis-server (Debian: apt-get install nginx redis-server).
bench-scale-out: install-test
	$(PY) -m bench.scale_out

# After changing pyproject.toml's ranges: record the set the tests then pass with.
constraints: install-test
	{ sed -n '1,2p' $(CONSTRAINTS); $(PIP) freeze --exclude-editable | grep -v '^rnnserve' \
	  | LC_ALL=C sort -f; echo 'onnxruntime-gpu==1.31.1'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

lint: install-test
	$(VENV)/bin/ruff check service training tests bench

docker:
	docker build -t $(IMAGE) .

docker-gpu:
	docker build --build-arg FLAVOR=gpu -t $(IMAGE):gpu .

docker-train:
	docker build --target train -t $(IMAGE):train .

clean:
	rm -rf $(VENV) service/generated .pytest_cache .ruff_cache bench/results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
