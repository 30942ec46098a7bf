"""Compile proto/ into service/rnnserve/generated/ (the package `rnnserve.generated`).

Run by the build (setup.py's build_py, so a wheel from a clean checkout carries the code and
grpcio-tools stays a build-time tool) and by `make proto`. The generated code is not committed:
proto/ stays the one source of truth.

The build pins an older grpcio-tools on purpose: its gencode (protobuf 6.31) loads on every
protobuf runtime from 6.31 up, so rnnserve installs beside tritonclient, which wants
protobuf < 7, as well as on protobuf 7. Newer gencode refuses older runtimes at import.

protoc writes absolute imports (`from rnnserve.v1 import …`); they are rewritten to live under
rnnserve.generated, so no sys.path tricks are needed. The KServe v2 protos keep the published
package `inference`, which tritonclient also registers in protobuf's global descriptor pool; two
different files defining `inference.ModelInferRequest` in one process would collide. So the
`inference` package goes into a private pool: only names on the wire (service path, field
numbers) matter, and a process may hold both.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent
OUT_DIR = ROOT / "service" / "rnnserve" / "generated"
PACKAGE = "rnnserve.generated"
PRIVATE_POOL_PACKAGES = {("inference",)}
POOL_MODULE = """from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
"""


def proto_packages() -> list[tuple[str, ...]]:
    """The proto directories, each a generated Python package (e.g. ('rnnserve', 'v1'))."""
    return sorted({p.parent.relative_to(PROTO_DIR).parts for p in PROTO_DIR.rglob("*.proto")})


def python_packages() -> list[str]:
    """Every package the generated code lives in, for setup.py (known before generating)."""
    names = {PACKAGE}
    for parts in proto_packages():
        for depth in range(1, len(parts) + 1):
            names.add(".".join((PACKAGE, *parts[:depth])))
    return sorted(names)


def ensure_package_dirs() -> None:
    """setuptools checks every package directory exists before build_py generates them."""
    for name in python_packages():
        directory = OUT_DIR.joinpath(*name.split(".")[2:])
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "__init__.py").touch()


def _include_dirs() -> list[str]:
    """protoc's own well-known types, and googleapis' google/rpc/status.proto."""
    import google.rpc.status_pb2
    from grpc_tools import protoc

    return [str(Path(protoc.__file__).parent / "_proto"),
            str(Path(google.rpc.status_pb2.__file__).parent.parent.parent)]


def generate() -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    includes = [f"-I{d}" for d in _include_dirs()]
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", *includes, f"--python_out={OUT_DIR}",
                        f"--pyi_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}", *protos])
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {', '.join(protos)}")
    for path in OUT_DIR.rglob("*.py*"):
        text = path.read_text()
        for parts in proto_packages():
            dotted = ".".join(parts)
            text = re.sub(rf"^from {re.escape(dotted)} import", f"from {PACKAGE}.{dotted} import",
                          text, flags=re.M)
        parts = path.parent.relative_to(OUT_DIR).parts
        if parts in PRIVATE_POOL_PACKAGES and path.name.endswith("_pb2.py"):
            dotted = ".".join(parts)
            text = text.replace("_descriptor_pool.Default()", "_private_pool.POOL").replace(
                "from google.protobuf import descriptor_pool as _descriptor_pool\n",
                f"from {PACKAGE}.{dotted} import pool as _private_pool\n")
        path.write_text(text)
    for directory in [OUT_DIR, *(p for p in OUT_DIR.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
        if directory.relative_to(OUT_DIR).parts in PRIVATE_POOL_PACKAGES:
            (directory / "pool.py").write_text(POOL_MODULE)


if __name__ == "__main__":
    generate()
    print(f"generated {PACKAGE} into {OUT_DIR.relative_to(ROOT)}", file=sys.stderr)
