"""/metrics over HTTP with a bounded number of threads.

prometheus-client's own server starts a thread per connection and gives it no timeout, so a
connection that never sends its request holds a thread for good (392 idle connections: 405
threads). Here each connection has IDLE_TIMEOUT to send its request, and at most
MAX_CONNECTIONS are served at once; more are closed at once. A scrape sends its request as it
connects, so neither limit touches Prometheus; what the app serves is prometheus-client's.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)
IDLE_TIMEOUT = 5.0
"""Seconds a connection may take to send its request (and each later read) before it closes."""
MAX_CONNECTIONS = 32
"""Connections served at once; one more is closed unanswered."""


class _Handler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT  # read by StreamRequestHandler.setup for the connection's socket

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not logged (one every few seconds per Prometheus)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: close it rather than queue a thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address) -> None:
        """A connection that timed out or broke off: nothing to report, nothing to keep."""
        log.debug("metrics connection from %s ended early", client_address, exc_info=True)


def serve(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve `registry` on host:port from a daemon thread; shutdown() and server_close() stop
    it, as with prometheus-client's own server."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (_Server,), {"address_family": family})
    http: WSGIServer = make_server(
        host, port, make_wsgi_app(registry), server_class, handler_class=_Handler
    )
    threading.Thread(target=http.serve_forever, name="metrics-http", daemon=True).start()
    return http
