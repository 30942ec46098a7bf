#!/usr/bin/env bash
# bench/gpu.py on the offline GPU machine (../shared/offline-gpu/README.md): reassembles the
# onnxruntime-gpu wheel from the parts already copied to /tmp/ort plus .device/ort/part04,
# installs it with .device/wheels into /tmp/site, and writes what it measured under $OUT.
# Usage, from the project root there: bash bench/on_gpu_host.sh [bench.gpu flags...]
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/ort /tmp/pkg
trap 'cp -r /tmp/bench-gpu-* "$OUT/" 2>/dev/null || true' EXIT
cp .device/ort/part04 /tmp/ort/
( cd /tmp/ort && cat part0* > "$(cat "$OLDPWD/.device/ort/NAME")" \
  && cp "$OLDPWD/.device/ort/SHA256" . && sha256sum -c SHA256 )
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
  /tmp/ort/*.whl .device/wheels/*.whl
ln -sfn "$PWD/service" /tmp/pkg/rnnserve  # the package's import name, as setup.py maps it
export PYTHONPATH=/tmp/site:/tmp/pkg:$PWD PYTHONUNBUFFERED=1
python3 -c "import onnxruntime as o; o.preload_dlls(); print(o.__version__, o.get_available_providers())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
status=0
python3 -m bench.gpu "$@" 2>&1 | tee "$OUT/gpu.txt" || status=$?
cp bench/results/gpu.json "$OUT/" 2>/dev/null || true
exit "$status"
