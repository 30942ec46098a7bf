"""The CUDA image (make test-container-gpu; a ~2.8 GB image, so not part of CI's run): built on
a slim Python base with onnxruntime-gpu and the CUDA 13 / cuDNN 9 wheels its extras name. No GPU
is needed to show that everything ONNX Runtime's CUDA provider links, directly or through
cuDNN, resolves inside the image except the driver's libcuda.so, which the NVIDIA container
toolkit mounts from the host."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rnnserve.client import Client
from tests.container.conftest import IMAGE, Container, build, docker

pytestmark = pytest.mark.container_gpu
GPU_IMAGE = f"{IMAGE}:gpu"
DRIVER = {"libcuda.so.1"}

LINKS = """
import glob, json, os, subprocess, onnxruntime
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
site = os.path.dirname(os.path.dirname(onnxruntime.__file__))
dirs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
env = dict(os.environ, LD_LIBRARY_PATH=":".join(dirs))
libraries = [os.path.join(capi, "libonnxruntime_providers_cuda.so")]
libraries += sorted(p for d in dirs for p in glob.glob(os.path.join(d, "*.so*")))
missing = {}
for library in libraries:
    out = subprocess.run(["ldd", library], env=env, capture_output=True, text=True).stdout
    gone = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if gone:
        missing[os.path.basename(library)] = gone
print(json.dumps({"version": onnxruntime.__version__, "missing": missing,
                  "providers": onnxruntime.get_available_providers(),
                  "present": sorted(os.path.basename(p) for p in libraries)}))
"""


@pytest.fixture(scope="session")
def gpu_image(engine: None) -> str:
    build("docker-gpu", IMAGE)  # tags IMAGE:gpu
    size = int(docker("image", "inspect", "--format", "{{.Size}}", GPU_IMAGE).stdout)
    print(f"{GPU_IMAGE}: {size / 1e6:.0f} MB")
    return GPU_IMAGE


def test_every_library_of_the_cuda_provider_resolves_but_the_driver(gpu_image: str) -> None:
    found = json.loads(
        docker("run", "--rm", "--entrypoint", "python", gpu_image, "-c", LINKS).stdout
    )
    assert found["version"].startswith("1.31")
    assert "CUDAExecutionProvider" in found["providers"]
    unresolved = {lib: set(gone) - DRIVER for lib, gone in found["missing"].items()}
    assert not {lib: gone for lib, gone in unresolved.items() if gone}, unresolved
    # What the provider and cuDNN load at run time (dlopen), present by the names they ask for.
    for soname in (
        "libcudart.so.13",
        "libcublas.so.13",
        "libcublasLt.so.13",
        "libcurand.so.10",
        "libcufft.so.12",
        "libnvrtc.so.13",
        "libcudnn.so.9",
        "libcudnn_ops.so.9",
        "libcudnn_engines_precompiled.so.9",
    ):
        assert soname in found["present"], soname


def test_without_a_gpu_the_cuda_image_serves_on_the_cpu(gpu_image: str) -> None:
    server = Container(gpu_image)
    try:
        server.wait_serving()
        with Client(server.address) as client:
            y = client.predict("echo", np.ones((2, 3, 1), np.float32)).y
        assert y.shape == (2, 3, 2)
        assert any("CPUExecutionProvider" in m for m in server.messages())
    finally:
        server.remove()
