"""Typed clients for rnnserve.v1: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("localhost:8500") as client:
        y = client.predict("binary_add", x).y
        with client.stream("echo") as session:      # the session closes on leaving the block
            for bit in bits:
                print(session.step([bit]))

    async with AsyncClient("localhost:8500") as client:
        async with client.stream("echo") as session:
            y = await session.step([1.0])

Both share every message they build and read (below); only the transport differs. Leaving a
`stream()` block closes its session; call `detach()` inside it to keep the session on the server
(to `resume` it later, from this or another process, by `session_id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import secrets
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.rpc import status_pb2

from rnnserve.doors.status import BY_VALUE, from_rpc_error, retry_after
from rnnserve.doors.tensors import answer_array, to_tensor
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc

SESSION_HEADER = "x-rnnserve-session"
ArrayLike = np.ndarray | Sequence
Model = pb.Model
Session = pb.Session


class RnnServeError(Exception):
    """A failed call or stream message: the gRPC status code, the server's message, and how
    long to wait before retrying when the server says so (None: retrying unchanged won't help)."""

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> RnnServeError:
        return cls(
            BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN), status.message, retry_after(status)
        )

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> RnnServeError:
        return cls.from_status(from_rpc_error(exc))


@dataclass(frozen=True)
class Prediction:
    y: np.ndarray
    final_states: dict[str, np.ndarray]
    model: str
    version: int


@dataclass(frozen=True)
class StepBatch:
    """Outputs [rows, k, outputs], step counts and per-row errors (row → RnnServeError)."""

    y: np.ndarray
    steps: list[int]
    errors: dict[int, RnnServeError]


def new_session_id() -> str:
    """A random 128-bit session id, as the server would pick."""
    return secrets.token_hex(16)


def _arrays(tensors: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    return {name: answer_array(t) for name, t in tensors.items()}


def _states(states: Mapping[str, ArrayLike] | None) -> dict[str, pb.Tensor]:
    return {k: to_tensor(v) for k, v in (states or {}).items()}


def _timesteps(x: ArrayLike) -> np.ndarray:
    """[k, features] from a vector (one step) or a matrix (k steps)."""
    a = np.asarray(x, "<f4")
    return a[None] if a.ndim == 1 else a


def _predict_request(
    model: str,
    x: ArrayLike | Sequence[ArrayLike],
    version: int,
    initial_states: Mapping[str, ArrayLike] | None,
    last_only: bool,
) -> pb.PredictRequest:
    """x: [batch, time, features], or a list of [time_i, features] sequences of any lengths."""
    lengths: list[int] = []
    if isinstance(x, np.ndarray):
        batch = x  # its shape is the server's to check (INVALID_ARGUMENT, with the reason)
    else:
        seqs = [np.asarray(s, "<f4") for s in x]
        shapes = {s.shape[1:] for s in seqs}
        if not seqs or any(s.ndim != 2 or not len(s) for s in seqs) or len(shapes) != 1:
            found = [list(s.shape) for s in seqs[:3]]
            raise ValueError(
                "predict's x: a non-empty list of [time, features] sequences with "
                f"one feature count (or a [batch, time, features] array); got "
                f"{len(seqs)} sequences of shapes {found}"
                f"{' …' if len(seqs) > 3 else ''}"
            )
        lengths = [len(s) for s in seqs]
        batch = np.zeros((len(seqs), max(lengths), seqs[0].shape[-1]), "<f4")
        for row, s in enumerate(seqs):
            batch[row, : len(s)] = s
        if len(set(lengths)) == 1:
            lengths = []
    mode = pb.OUTPUT_MODE_LAST_STEP if last_only else pb.OUTPUT_MODE_ALL_STEPS
    return pb.PredictRequest(
        model=model,
        version=version,
        x=to_tensor(batch),
        lengths=lengths,
        initial_states=_states(initial_states),
        output_mode=mode,
    )


def _prediction(response: pb.PredictResponse) -> Prediction:
    return Prediction(
        answer_array(response.y), _arrays(response.final_states), response.model, response.version
    )


def _open_request(
    model: str, version: int, initial_states: Mapping[str, ArrayLike] | None, session_id: str
) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(
        model=model, version=version, initial_states=_states(initial_states), session_id=session_id
    )


def _step_batch(response: pb.StepResponse) -> StepBatch:
    return StepBatch(
        answer_array(response.y),
        list(response.steps),
        {e.row: RnnServeError.from_status(e.status) for e in response.errors},
    )


def _single(batch: StepBatch) -> np.ndarray:
    if batch.errors:
        raise batch.errors[0]
    return batch.y[0]


def _one_session_step(session_id: str, x: ArrayLike) -> pb.StepRequest:
    return pb.StepRequest(
        session_ids=[session_id] if session_id else [], x=to_tensor(_timesteps(x)[None])
    )


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # A connection of its own: gRPC would otherwise share one TCP connection between channels
    # to the same address, and a server's workers (or a proxy's replicas) are chosen per
    # connection.
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.use_local_subchannel_pool", 1),
    ]


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def _routed(metadata: tuple, session_id: str) -> tuple:
    """Metadata plus the session id a proxy routes by."""
    return metadata + (((SESSION_HEADER, session_id),) if session_id else ())


def _credentials(tls_ca: Path | str | None) -> grpc.ChannelCredentials | None:
    return grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()) if tls_ca else None


class _Connections:
    """`count` connections to one address. A server's workers (and a proxy's replicas) are
    chosen per connection, so a client with several spreads its sessions over them; each
    session's calls always take the same connection, so the session stays where it is."""

    def __init__(
        self,
        transport: Any,
        address: str,
        tls_ca: Path | str | None,
        max_message_bytes: int,
        count: int,
    ) -> None:
        if count < 1:
            raise ValueError("connections must be at least 1")
        options = _channel_options(max_message_bytes)
        creds = _credentials(tls_ca)
        self.channels = [
            transport.secure_channel(address, creds, options)
            if creds
            else transport.insecure_channel(address, options)
            for _ in range(count)
        ]
        self.stubs = [rpc.InferenceStub(c) for c in self.channels]
        self._turn = itertools.cycle(range(count))

    def stub(self, session_id: str = "") -> rpc.InferenceStub:
        """The session's connection; calls without a session take turns."""
        if len(self.stubs) == 1:
            return self.stubs[0]
        if not session_id:
            return self.stubs[next(self._turn)]
        return self.stubs[zlib.crc32(session_id.encode()) % len(self.stubs)]


class Client:
    """A blocking client. `tls_ca`: PEM file of the CA that signed the server's certificate
    (TLS on); `token`: the bearer token when the server wants one; `connections`: how many
    connections to spread sessions over (a server with --workers N serves each connection
    in one worker; a message naming several sessions should keep to one connection)."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_ca: Path | str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        connections: int = 1,
    ) -> None:
        self.connections = _Connections(grpc, address, tls_ca, max_message_bytes, connections)
        self.channel = self.connections.channels[0]
        self.timeout = timeout
        self.metadata = _metadata(token)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for channel in self.connections.channels:
            channel.close()

    def _call(self, method: str, request: Any, session_id: str = "") -> Any:
        try:
            return getattr(self.connections.stub(session_id), method)(
                request, timeout=self.timeout, metadata=_routed(self.metadata, session_id)
            )
        except grpc.RpcError as exc:
            raise RnnServeError.from_rpc_error(exc) from None

    def list_models(self) -> list[Model]:
        return list(self._call("ListModels", pb.ListModelsRequest()).models)

    def get_model(self, model: str, version: int = 0) -> Model:
        return self._call("GetModel", pb.GetModelRequest(model=model, version=version)).model

    def predict(
        self,
        model: str,
        x: ArrayLike | Sequence[ArrayLike],
        *,
        version: int = 0,
        initial_states: Mapping[str, ArrayLike] | None = None,
        last_only: bool = False,
    ) -> Prediction:
        """x: [batch, time, features], or a list of [time_i, features] sequences of any lengths."""
        return _prediction(
            self._call("Predict", _predict_request(model, x, version, initial_states, last_only))
        )

    def open_session(
        self, model: str, version: int = 0, initial_states: Mapping[str, ArrayLike] | None = None
    ) -> Session:
        """The client picks the id, so a proxy routes this call like every later one."""
        session_id = new_session_id()
        return self._call(
            "OpenSession", _open_request(model, version, initial_states, session_id), session_id
        ).session

    def step(self, session_id: str, x: ArrayLike) -> np.ndarray:
        """One session, k timesteps ([k, features] or one [features] step) → [k, outputs]."""
        return _single(
            _step_batch(self._call("Step", _one_session_step(session_id, x), session_id))
        )

    def step_many(self, session_ids: Sequence[str], x: ArrayLike) -> StepBatch:
        """x [rows, k, features], a row per session; failed rows are reported, not raised."""
        request = pb.StepRequest(session_ids=session_ids, x=to_tensor(x))
        only = session_ids[0] if len(session_ids) == 1 else ""
        return _step_batch(self._call("Step", request, only))

    def reset(self, session_id: str) -> Session:
        return self._call(
            "ResetSession", pb.ResetSessionRequest(session_id=session_id), session_id
        ).session

    def snapshot(self, session_id: str) -> dict[str, np.ndarray]:
        return _arrays(
            self._call(
                "GetSessionState", pb.GetSessionStateRequest(session_id=session_id), session_id
            ).states
        )

    def close_session(self, session_id: str) -> Session:
        return self._call(
            "CloseSession", pb.CloseSessionRequest(session_id=session_id), session_id
        ).session

    def stream(
        self,
        model: str = "",
        version: int = 0,
        initial_states: Mapping[str, ArrayLike] | None = None,
        resume: str = "",
    ) -> StreamSession:
        """Open a stream and, given a model (or a session id to resume), its session."""
        session_id = resume or (new_session_id() if model else "")
        stream = StreamSession(
            self.connections.stub(session_id), _routed(self.metadata, session_id)
        )
        if resume:
            stream.resume(resume)
        elif model:
            stream.open(model, version, initial_states, session_id)
        return stream


class _StreamBase:
    """What both stream classes share: request ids, answers, errors and the exit rule."""

    def __init__(self) -> None:
        self._next_id = 0
        self.session: Session | None = None
        self.detached = False
        self._kept: list[str] | None = None
        """The sessions the server keeps for this stream: those of the last step that named
        sessions and had no failed row. Naming them again sends `same_sessions` instead."""

    def _request(self, **kind: Any) -> pb.StreamRequest:
        self._next_id += 1
        return pb.StreamRequest(request_id=self._next_id, **kind)

    def _many(self, ids: list[str], x: pb.Tensor, same: bool) -> pb.StreamRequest:
        return self._request(
            step=pb.StepRequest(same_sessions=True, x=x)
            if same
            else pb.StepRequest(session_ids=ids, x=x)
        )

    def _keep(self, ids: list[str], answer: pb.StepResponse) -> StepBatch:
        batch = _step_batch(answer)
        self._kept = None if batch.errors else ids
        return batch

    @staticmethod
    def _answer(response: pb.StreamResponse, kind: str) -> Any:
        if response.WhichOneof("kind") == "error":
            raise RnnServeError.from_status(response.error)
        return getattr(response, kind)

    def detach(self) -> str:
        """Leave the session open on the server when this stream ends; returns its id, which
        `resume` takes (until the server's idle timeout evicts it)."""
        self.detached = True
        return self.session.session_id if self.session is not None else ""

    def _closing_on_exit(self) -> bool:
        return self.session is not None and not self.detached


class StreamSession(_StreamBase):
    """One bidirectional Stream; each call sends a message and waits for its response."""

    def __init__(self, stub: rpc.InferenceStub, metadata: tuple) -> None:
        super().__init__()
        self._requests: queue.Queue = queue.Queue()
        self._responses: grpc.Future = stub.Stream(  # an iterator of StreamResponse too
            iter(self._requests.get, _END), metadata=metadata
        )

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the session (unless detached), then end the stream. If the stream is gone
        already, the server's idle timeout ends the session."""
        if self._closing_on_exit():
            with contextlib.suppress(RnnServeError):
                self.close()
        self.end()

    def send(self, request: pb.StreamRequest, kind: str) -> Any:
        self._requests.put(request)
        try:
            return self._answer(next(self._responses), kind)
        except grpc.RpcError as exc:
            raise RnnServeError.from_rpc_error(exc) from None
        except StopIteration:
            raise RnnServeError(grpc.StatusCode.UNAVAILABLE, "the stream ended") from None

    def open(
        self,
        model: str,
        version: int = 0,
        initial_states: Mapping[str, ArrayLike] | None = None,
        session_id: str = "",
    ) -> Session:
        self.session = self.send(
            self._request(open=_open_request(model, version, initial_states, session_id)), "open"
        ).session
        return self.session

    def resume(self, session_id: str) -> Session:
        self.session = self.send(
            self._request(resume=pb.ResumeSessionRequest(session_id=session_id)), "resume"
        ).session
        return self.session

    def step(self, x: ArrayLike) -> np.ndarray:
        """k timesteps of the stream's session ([k, features] or one [features]) → [k, outputs]."""
        return _single(_step_batch(self.send(self._request(step=_one_session_step("", x)), "step")))

    def step_many(self, session_ids: Sequence[str], x: ArrayLike) -> StepBatch:
        """Steps for many sessions in one message: x [rows, k, features], a row per session.
        The same sessions as the previous call go without their ids (`same_sessions`); if the
        server no longer keeps them, the message is sent again with them."""
        ids, tensor = list(session_ids), to_tensor(x)
        if ids == self._kept:
            try:
                return self._keep(ids, self.send(self._many(ids, tensor, same=True), "step"))
            except RnnServeError as exc:
                if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
        return self._keep(ids, self.send(self._many(ids, tensor, same=False), "step"))

    def reset(self, session_id: str = "") -> Session:
        return self.send(
            self._request(reset=pb.ResetSessionRequest(session_id=session_id)), "reset"
        ).session

    def snapshot(self, session_id: str = "") -> dict[str, np.ndarray]:
        return _arrays(
            self.send(
                self._request(get_state=pb.GetSessionStateRequest(session_id=session_id)),
                "get_state",
            ).states
        )

    def close(self, session_id: str = "") -> Session:
        closed = self.send(
            self._request(close=pb.CloseSessionRequest(session_id=session_id)), "close"
        ).session
        if self.session is not None and closed.session_id == self.session.session_id:
            self.session = None
        return closed

    def end(self) -> None:
        """Half-close the stream (its sessions stay on the server until closed or idle)."""
        self._requests.put(_END)
        with contextlib.suppress(grpc.RpcError):
            for _ in self._responses:
                pass

    def cancel(self) -> None:
        """Drop the stream abruptly, as a crashed client would."""
        self._responses.cancel()


_END = object()


class AsyncClient:
    """The asyncio client: the same calls and arguments as `Client`, awaited."""

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_ca: Path | str | None = None,
        timeout: float | None = 30.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        connections: int = 1,
    ) -> None:
        self.connections = _Connections(grpc.aio, address, tls_ca, max_message_bytes, connections)
        self.timeout = timeout
        self.metadata = _metadata(token)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self.connections.channels:
            await channel.close()

    async def _call(self, method: str, request: Any, session_id: str = "") -> Any:
        try:
            return await getattr(self.connections.stub(session_id), method)(
                request, timeout=self.timeout, metadata=_routed(self.metadata, session_id)
            )
        except grpc.RpcError as exc:
            raise RnnServeError.from_rpc_error(exc) from None

    async def list_models(self) -> list[Model]:
        return list((await self._call("ListModels", pb.ListModelsRequest())).models)

    async def get_model(self, model: str, version: int = 0) -> Model:
        return (
            await self._call("GetModel", pb.GetModelRequest(model=model, version=version))
        ).model

    async def predict(
        self,
        model: str,
        x: ArrayLike | Sequence[ArrayLike],
        *,
        version: int = 0,
        initial_states: Mapping[str, ArrayLike] | None = None,
        last_only: bool = False,
    ) -> Prediction:
        return _prediction(
            await self._call(
                "Predict", _predict_request(model, x, version, initial_states, last_only)
            )
        )

    async def open_session(
        self, model: str, version: int = 0, initial_states: Mapping[str, ArrayLike] | None = None
    ) -> Session:
        session_id = new_session_id()
        return (
            await self._call(
                "OpenSession", _open_request(model, version, initial_states, session_id), session_id
            )
        ).session

    async def step(self, session_id: str, x: ArrayLike) -> np.ndarray:
        return _single(
            _step_batch(await self._call("Step", _one_session_step(session_id, x), session_id))
        )

    async def step_many(self, session_ids: Sequence[str], x: ArrayLike) -> StepBatch:
        request = pb.StepRequest(session_ids=session_ids, x=to_tensor(x))
        only = session_ids[0] if len(session_ids) == 1 else ""
        return _step_batch(await self._call("Step", request, only))

    async def reset(self, session_id: str) -> Session:
        return (
            await self._call(
                "ResetSession", pb.ResetSessionRequest(session_id=session_id), session_id
            )
        ).session

    async def snapshot(self, session_id: str) -> dict[str, np.ndarray]:
        return _arrays(
            (
                await self._call(
                    "GetSessionState", pb.GetSessionStateRequest(session_id=session_id), session_id
                )
            ).states
        )

    async def close_session(self, session_id: str) -> Session:
        return (
            await self._call(
                "CloseSession", pb.CloseSessionRequest(session_id=session_id), session_id
            )
        ).session

    def stream(
        self,
        model: str = "",
        version: int = 0,
        initial_states: Mapping[str, ArrayLike] | None = None,
        resume: str = "",
    ) -> AsyncStreamSession:
        """`async with client.stream(model) as session:` opens the stream and its session."""
        session_id = resume or (new_session_id() if model else "")
        return AsyncStreamSession(
            self.connections.stub(session_id),
            _routed(self.metadata, session_id),
            model,
            version,
            initial_states,
            resume,
            session_id,
        )


class AsyncStreamSession(_StreamBase):
    """One bidirectional Stream on asyncio; the session opens (or resumes) on entering."""

    def __init__(
        self,
        stub: rpc.InferenceStub,
        metadata: tuple,
        model: str,
        version: int,
        initial_states: Mapping[str, ArrayLike] | None,
        resume: str,
        session_id: str,
    ) -> None:
        super().__init__()
        self._call = stub.Stream(metadata=metadata)
        self._lock = asyncio.Lock()
        self._opening = (model, version, initial_states, resume, session_id)

    async def __aenter__(self) -> AsyncStreamSession:
        model, version, initial_states, resume, session_id = self._opening
        if resume:
            await self.resume(resume)
        elif model:
            await self.open(model, version, initial_states, session_id)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._closing_on_exit():
            with contextlib.suppress(RnnServeError):
                await self.close()
        await self.end()

    async def send(self, request: pb.StreamRequest, kind: str) -> Any:
        """One message, one answer; concurrent callers take turns so answers match."""
        async with self._lock:
            return await self._exchange(request, kind)

    async def _exchange(self, request: pb.StreamRequest, kind: str) -> Any:
        try:
            await self._call.write(request)
            response = await self._call.read()
        except grpc.RpcError as exc:
            raise RnnServeError.from_rpc_error(exc) from None
        if response is grpc.aio.EOF:
            raise RnnServeError(grpc.StatusCode.UNAVAILABLE, "the stream ended")
        return self._answer(response, kind)

    async def open(
        self,
        model: str,
        version: int = 0,
        initial_states: Mapping[str, ArrayLike] | None = None,
        session_id: str = "",
    ) -> Session:
        self.session = (
            await self.send(
                self._request(open=_open_request(model, version, initial_states, session_id)),
                "open",
            )
        ).session
        return self.session

    async def resume(self, session_id: str) -> Session:
        self.session = (
            await self.send(
                self._request(resume=pb.ResumeSessionRequest(session_id=session_id)), "resume"
            )
        ).session
        return self.session

    async def step(self, x: ArrayLike) -> np.ndarray:
        return _single(
            _step_batch(await self.send(self._request(step=_one_session_step("", x)), "step"))
        )

    async def step_many(self, session_ids: Sequence[str], x: ArrayLike) -> StepBatch:
        ids, tensor = list(session_ids), to_tensor(x)
        async with self._lock:  # whether the ids go along depends on the message before
            if ids == self._kept:
                try:
                    return self._keep(
                        ids, await self._exchange(self._many(ids, tensor, True), "step")
                    )
                except RnnServeError as exc:
                    if exc.code != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
            return self._keep(ids, await self._exchange(self._many(ids, tensor, False), "step"))

    async def reset(self, session_id: str = "") -> Session:
        return (
            await self.send(
                self._request(reset=pb.ResetSessionRequest(session_id=session_id)), "reset"
            )
        ).session

    async def snapshot(self, session_id: str = "") -> dict[str, np.ndarray]:
        return _arrays(
            (
                await self.send(
                    self._request(get_state=pb.GetSessionStateRequest(session_id=session_id)),
                    "get_state",
                )
            ).states
        )

    async def close(self, session_id: str = "") -> Session:
        closed = (
            await self.send(
                self._request(close=pb.CloseSessionRequest(session_id=session_id)), "close"
            )
        ).session
        if self.session is not None and closed.session_id == self.session.session_id:
            self.session = None
        return closed

    async def end(self) -> None:
        """Half-close the stream and wait for the server to finish it."""
        with contextlib.suppress(grpc.RpcError):
            await self._call.done_writing()
            while await self._call.read() is not grpc.aio.EOF:
                pass
