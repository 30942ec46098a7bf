"""rnnserve: gRPC serving of recurrent ONNX models (whole sequences and stateful streams).

Users import `rnnserve.client` (`Client`, `AsyncClient`); `rnnserve serve` runs the server.

The packages, from the wire down (each may import only those below it; `lint-imports` checks):
doors and cluster, engine, state, models, ops, errors. Above them, the process: cli, server
(builds one serving process from its parts), supervisor (its workers), preflight; and client.
docs/architecture.md follows one streamed step through them.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _package_version

try:
    __version__ = _package_version("rnnserve")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
