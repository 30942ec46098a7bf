"""`python -m service.protogen`: compile proto/ into service/generated/ (what `make proto` runs).

The generated code is not committed: it must match the installed protobuf runtime, and proto/
stays the one source of truth. protoc writes absolute imports (`from rnnserve.v1 import …`);
they are rewritten to live under service.generated so no sys.path tricks are needed.

The KServe v2 protos keep the published package `inference`, which tritonclient also registers
in protobuf's global descriptor pool; two different files defining `inference.ModelInferRequest`
in one process would collide. So the `inference` package goes into a private pool: only names
on the wire (service path, field numbers) matter, and a process may hold both.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "service" / "generated"
PRIVATE_POOL_PACKAGES = {("inference",)}
POOL_MODULE = """from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
"""


def main() -> int:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    shutil.rmtree(OUT_DIR, ignore_errors=True)
    OUT_DIR.mkdir(parents=True)
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={OUT_DIR}",
                        f"--pyi_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}", *protos])
    if code != 0:
        return code
    packages = {p.parent.relative_to(PROTO_DIR).parts for p in PROTO_DIR.rglob("*.proto")}
    for path in OUT_DIR.rglob("*.py*"):
        text = path.read_text()
        for parts in packages:
            if parts:
                dotted = ".".join(parts)
                text = re.sub(rf"^from {re.escape(dotted)} import",
                              f"from service.generated.{dotted} import", text, flags=re.M)
        parts = path.parent.relative_to(OUT_DIR).parts
        if parts in PRIVATE_POOL_PACKAGES and path.name.endswith("_pb2.py"):
            dotted = ".".join(parts)
            text = text.replace("_descriptor_pool.Default()", "_private_pool.POOL").replace(
                "from google.protobuf import descriptor_pool as _descriptor_pool\n",
                f"from service.generated.{dotted} import pool as _private_pool\n")
        path.write_text(text)
    for directory in [OUT_DIR, *(p for p in OUT_DIR.rglob("*") if p.is_dir())]:
        (directory / "__init__.py").touch()
        if directory.relative_to(OUT_DIR).parts in PRIVATE_POOL_PACKAGES:
            (directory / "pool.py").write_text(POOL_MODULE)
    print(f"generated {len(protos)} proto file(s) into {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
