"""rnnserve: gRPC serving of recurrent ONNX models (whole sequences and stateful streams).

Users import `rnnserve.client` (`Client`, `AsyncClient`); `rnnserve serve` runs the server.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version

try:
    __version__ = _package_version("rnnserve")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
