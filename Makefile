# Two commands do everything: `make serve` and `make test`. See README.md.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
GEN    := service/generated/rnnserve/v1/rnnserve_pb2.py
PROTOS := $(shell find proto -name '*.proto')
IMAGE  ?= rnnserve
ORT    ?= cpu

.PHONY: install install-test serve test train bench bench-soak bench-scale-out proto lint docker docker-gpu docker-train clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Serving dependencies only (no TensorFlow), then the generated gRPC code.
# ORT=gpu installs onnxruntime-gpu instead of onnxruntime (the CUDA image does this).
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[$(ORT)]'
	touch $@

$(GEN): $(PROTOS) $(STAMP)
	$(PY) -m service.protogen

install: $(STAMP) $(GEN)

proto: $(STAMP)
	$(PY) -m service.protogen

serve: install
	$(VENV)/bin/rnnserve serve --repository exported

# tritonclient (the KServe v2 tests' client) declares protobuf<7, but its generated code runs on
# our protobuf 7 (tests/test_kserve.py proves it), so it goes in without its pins.
TRITONCLIENT := tritonclient==2.73.0 python-rapidjson==1.25

$(VENV)/.installed-test: pyproject.toml $(STAMP)
	$(PIP) install --quiet -e '.[$(ORT),training,test]'
	$(PIP) install --quiet --no-deps $(TRITONCLIENT)
	touch $@

install-test: install $(VENV)/.installed-test

test: install-test
	$(PY) -m pytest

train: install-test
	$(PY) -m training train --task all --out exported

bench: install-test
	$(PY) -m bench.streaming
	$(PY) -m bench.predict
	$(PY) -m bench.ort_options
	$(PY) -m bench.plot

# A bounded soak: churn, long streams and big Predicts side by side, server RSS per round.
bench-soak: install-test
	$(PY) -m bench.soak

# Needs nginx and redis-server (Debian: apt-get install nginx redis-server).
bench-scale-out: install-test
	$(PY) -m bench.scale_out

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
