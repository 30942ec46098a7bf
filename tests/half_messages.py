"""A hostile gRPC client on raw HTTP/2 (the h2 library): streams that announce a large message
and send all of it but the last byte, as fast as the server's flow-control windows allow.
A grpc client cannot do this: it only ever sends whole messages."""

from __future__ import annotations

import socket
import struct
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


class HalfMessages:
    """`connections` x `streams` calls to `method`, each announcing `size` bytes; a stream the
    server ends is replaced by a new one, so the pressure lasts as long as `pump` runs."""

    def __init__(
        self,
        address: str,
        method: str,
        connections: int,
        streams: int,
        size: int,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.address = address
        self.method = method
        self.streams = streams
        self.size = size
        self.metadata = list(metadata)
        self.sent = 0
        self.ended = 0
        self.reconnects = 0
        self._conns = [self._connect() for _ in range(connections)]

    def _connect(self) -> tuple[socket.socket, h2.connection.H2Connection, dict[int, int]]:
        host, port = self.address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        sock.sendall(conn.data_to_send())
        sock.setblocking(False)
        return sock, conn, {}

    def pump(self, seconds: float) -> None:
        """Keep every stream sending; a connection the server closes is opened again."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for index, (sock, conn, open_) in enumerate(self._conns):
                try:
                    self._receive(sock, conn, open_)
                    self._open(conn, open_)
                    self._send(conn, open_)
                    out = conn.data_to_send()
                    if out:
                        sock.setblocking(True)
                        sock.sendall(out)
                        sock.setblocking(False)
                except (OSError, h2.exceptions.ProtocolError):
                    self.ended += len(open_)
                    sock.close()
                    self._conns[index] = self._connect()
                    self.reconnects += 1
            time.sleep(0.01)

    def close(self) -> None:
        for sock, _, _ in self._conns:
            sock.close()

    def _receive(
        self, sock: socket.socket, conn: h2.connection.H2Connection, open_: dict[int, int]
    ) -> None:
        while True:
            try:
                data = sock.recv(1 << 20)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionResetError("the server closed the connection")
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    if open_.pop(event.stream_id, None) is not None:
                        self.ended += 1

    def _open(self, conn: h2.connection.H2Connection, open_: dict[int, int]) -> None:
        while (
            len(open_) < self.streams
            and conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams
        ):
            stream = conn.get_next_available_stream_id()
            host = self.address
            conn.send_headers(
                stream,
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", self.method),
                    (":authority", host),
                    ("content-type", "application/grpc"),
                    ("te", "trailers"),
                    *self.metadata,
                ],
            )
            open_[stream] = 0

    def _send(self, conn: h2.connection.H2Connection, open_: dict[int, int]) -> None:
        """Each stream's bytes: the 5-byte gRPC prefix announcing `size`, then all but one
        byte of the message."""
        prefix = b"\0" + struct.pack(">I", self.size)
        total = len(prefix) + self.size - 1
        for stream, done in list(open_.items()):
            try:
                while (left := total - done) > 0:
                    chunk = min(
                        conn.local_flow_control_window(stream), left, conn.max_outbound_frame_size
                    )
                    if chunk <= 0:
                        break
                    head = prefix[done : done + chunk]
                    conn.send_data(stream, head + b"\x07" * (chunk - len(head)))
                    done += chunk
                    self.sent += chunk
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                open_.pop(stream, None)
                self.ended += 1
                continue
            open_[stream] = done
