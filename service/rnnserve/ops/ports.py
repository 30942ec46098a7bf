"""The server's ports: checked before use, and failures that name the flag to change.

Kept apart from the server so the supervisor of --workers, which holds the port for its
workers and serves /metrics, stays a small process (it loads no models, no ONNX Runtime).
"""

from __future__ import annotations

import socket
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry

from rnnserve.ops import metrics_http
from rnnserve.ops.config import ServerConfig


def can_listen(host: str, port: int) -> bool:
    """Whether a listener could bind host:port now. Asked first because gRPC's own failure
    adds a C++ log line to the one-line error; gRPC's own bind stays the real check."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT ok
            probe.bind(address)
    except OSError:
        return False
    return True


def start_metrics(config: ServerConfig, registry: CollectorRegistry) -> WSGIServer | None:
    """/metrics on --metrics-port (None when -1 disables it)."""
    if config.metrics_port < 0:
        return None
    try:
        http = metrics_http.serve(config.host, config.metrics_port, registry)
    except OSError as exc:
        raise PortUnavailable(
            f"--metrics-port {config.metrics_port}: cannot listen on "
            f"{config.host}:{config.metrics_port} ({exc.strerror or exc}); "
            "-1 disables metrics"
        ) from None
    return http


class PortUnavailable(OSError):
    """A port flag names a port this process cannot listen on; the message names the flag."""


def hold_port(host: str, port: int, flag: str) -> socket.socket:
    """Check a port the workers share (--grpc-port, --http-port) is free, then join it to
    their SO_REUSEPORT group with a socket that never listens: a second server's check fails
    from now on, and port 0 becomes a concrete port for every worker."""
    if port and not can_listen(host, port):
        raise PortUnavailable(f"{flag} {port}: {host}:{port} is in use (another server?)")
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    held = socket.socket(family, kind, proto)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    held.bind(address)
    return held
