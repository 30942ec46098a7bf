"""Package layout and the build step pyproject.toml cannot express.

service/ is the source root of a src-layout: it holds the package `rnnserve`, so every module's
path is its import name (service/rnnserve/engine/engine.py is rnnserve.engine.engine); training/
is the repository's own pipeline (TensorFlow) and is not installed. The gRPC code is generated from proto/ while the package is
built, so a wheel or `pip install .` from a clean checkout carries it.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
protos = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(protos)


class BuildWithGeneratedCode(build_py):
    """Generate rnnserve.generated before the package is collected (also for `pip install -e`)."""

    def run(self) -> None:
        protos.generate()
        super().run()


protos.ensure_package_dirs()
packages = [p for p in find_packages("service") if not p.startswith("rnnserve.generated")]
setup(
    package_dir={"": "service"},
    packages=sorted({*packages, *protos.python_packages()}),
    package_data={"rnnserve": ["py.typed"], "rnnserve.models": ["model.schema.json"],
                  "rnnserve.generated": ["**/*.pyi"]},
    cmdclass={"build_py": BuildWithGeneratedCode},
)
