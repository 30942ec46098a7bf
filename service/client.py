"""A small typed client for rnnserve.v1 (the CLI and the tests use it).

    with Client("localhost:8500") as client:
        y = client.predict("binary_add", x).y
        with client.stream("echo") as session:
            for bit in bits:
                print(session.step([[bit]]))
"""

from __future__ import annotations

import contextlib
import queue
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc

SESSION_HEADER = "x-rnnserve-session"
ArrayLike = np.ndarray | Sequence


class RnnServeError(Exception):
    """A failed call or stream message: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_status(cls, code: int, message: str) -> RnnServeError:
        by_value = {c.value[0]: c for c in grpc.StatusCode}
        return cls(by_value.get(code, grpc.StatusCode.UNKNOWN), message)


def to_tensor(array: ArrayLike) -> pb.Tensor:
    a = np.ascontiguousarray(array, "<f4")
    return pb.Tensor(shape=a.shape, data=a.tobytes())


def to_array(tensor: pb.Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, "<f4").reshape(tuple(tensor.shape))


def to_arrays(tensors: Mapping[str, pb.Tensor]) -> dict[str, np.ndarray]:
    return {name: to_array(t) for name, t in tensors.items()}


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


def _step_batch(results: pb.StepResults) -> StepBatch:
    return StepBatch(to_array(results.y), list(results.steps),
                     {e.row: RnnServeError.from_status(e.code, e.message) for e in results.errors})


def _single(batch: StepBatch) -> np.ndarray:
    if batch.errors:
        raise batch.errors[0]
    return batch.y[0]


def new_session_id() -> str:
    """A random 128-bit session id, as the server would pick."""
    return secrets.token_hex(16)


def _states(states: dict[str, ArrayLike] | None) -> dict[str, pb.Tensor]:
    return {k: to_tensor(v) for k, v in (states or {}).items()}


def _timesteps(x: ArrayLike) -> np.ndarray:
    """[k, features] from a vector (one step) or a matrix (k steps)."""
    a = np.asarray(x, "<f4")
    return a[None] if a.ndim == 1 else a


class Client:
    def __init__(self, address: str, token: str | None = None,
                 root_certificates: Path | None = None, timeout: float | None = 30.0,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates.read_bytes())
            self.channel = grpc.secure_channel(address, creds, options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = rpc.InferenceStub(self.channel)
        self.timeout = timeout
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request, session_id: str = ""):
        metadata = self.metadata + (((SESSION_HEADER, session_id),) if session_id else ())
        try:
            return getattr(self.stub, method)(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise RnnServeError(exc.code(), exc.details()) from None

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call("ListModels", pb.ListModelsRequest()).models)

    def get_model(self, model: str, version: int = 0) -> pb.ModelInfo:
        return self._call("GetModel", pb.GetModelRequest(model=model, version=version))

    def predict(self, model: str, x: ArrayLike | Sequence[ArrayLike], *, version: int = 0,
                initial_states: dict[str, ArrayLike] | None = None,
                last_only: bool = False) -> Prediction:
        """x: [batch, time, features], or a list of [time_i, features] sequences of any lengths."""
        lengths: list[int] = []
        if isinstance(x, np.ndarray):
            batch = x
        else:
            seqs = [np.asarray(s, "<f4") for s in x]
            lengths = [len(s) for s in seqs]
            batch = np.zeros((len(seqs), max(lengths), seqs[0].shape[-1]), "<f4")
            for row, s in enumerate(seqs):
                batch[row, :len(s)] = s
            if len(set(lengths)) == 1:
                lengths = []
        mode = pb.OUTPUT_MODE_LAST_STEP if last_only else pb.OUTPUT_MODE_ALL_STEPS
        response = self._call("Predict", pb.PredictRequest(
            model=model, version=version, x=to_tensor(batch), lengths=lengths,
            initial_states=_states(initial_states), output_mode=mode))
        return Prediction(to_array(response.y), to_arrays(response.final_states),
                          response.model, response.version)

    def open_session(self, model: str, version: int = 0,
                     initial_states: dict[str, ArrayLike] | None = None) -> pb.SessionInfo:
        """The client picks the id, so a proxy routes this call like every later one."""
        session_id = new_session_id()
        return self._call("OpenSession", pb.OpenSessionRequest(
            model=model, version=version, initial_states=_states(initial_states),
            session_id=session_id), session_id)

    def step(self, session_id: str, x: ArrayLike) -> np.ndarray:
        """One session, k timesteps ([k, features] or one [features] step) → [k, outputs]."""
        return _single(self.step_many([session_id], _timesteps(x)[None]))

    def step_many(self, session_ids: Sequence[str], x: ArrayLike) -> StepBatch:
        """x [rows, k, features], a row per session; failed rows are reported, not raised."""
        request = pb.Steps(session_ids=session_ids, x=to_tensor(x))
        only = session_ids[0] if len(session_ids) == 1 else ""
        return _step_batch(self._call("Step", request, only))

    def reset(self, session_id: str) -> pb.SessionInfo:
        return self._call("ResetSession", pb.SessionRef(session_id=session_id), session_id)

    def snapshot(self, session_id: str) -> dict[str, np.ndarray]:
        state = self._call("GetSessionState", pb.SessionRef(session_id=session_id), session_id)
        return to_arrays(state.states)

    def close_session(self, session_id: str) -> pb.SessionInfo:
        return self._call("CloseSession", pb.SessionRef(session_id=session_id), session_id)

    def stream(self, model: str = "", version: int = 0,
               initial_states: dict[str, ArrayLike] | None = None,
               resume: str = "") -> StreamSession:
        """Open a stream and, given a model (or a session id to resume), its session."""
        session_id = resume or (new_session_id() if model else "")
        stream = StreamSession(self.stub, self.metadata + (
            ((SESSION_HEADER, session_id),) if session_id else ()))
        if resume:
            stream.resume(resume)
        elif model:
            stream.open(model, version, initial_states, session_id)
        return stream


_END = object()


class StreamSession:
    """One bidirectional Stream; each call sends a message and waits for its response."""

    def __init__(self, stub: rpc.InferenceStub, metadata: tuple) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._responses: Iterator[pb.StreamResponse] = stub.Stream(
            iter(self._requests.get, _END), metadata=metadata)
        self._next_id = 0
        self.session: pb.SessionInfo | None = None

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()

    def send(self, request: pb.StreamRequest) -> pb.StreamResponse:
        self._next_id += 1
        request.request_id = self._next_id
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as exc:
            raise RnnServeError(exc.code(), exc.details()) from None
        if response.WhichOneof("kind") == "error":
            raise RnnServeError.from_status(response.error.code, response.error.message)
        return response

    def open(self, model: str, version: int = 0,
             initial_states: dict[str, ArrayLike] | None = None,
             session_id: str = "") -> pb.SessionInfo:
        request = pb.StreamRequest(open=pb.OpenSessionRequest(
            model=model, version=version, initial_states=_states(initial_states),
            session_id=session_id))
        self.session = self.send(request).opened
        return self.session

    def resume(self, session_id: str) -> pb.SessionInfo:
        request = pb.StreamRequest(open=pb.OpenSessionRequest(resume_session_id=session_id))
        self.session = self.send(request).opened
        return self.session

    def step(self, x: ArrayLike) -> np.ndarray:
        """k timesteps of the stream's session ([k, features] or one [features]) → [k, outputs]."""
        a = _timesteps(x)
        return _single(_step_batch(self.send(pb.StreamRequest(
            steps=pb.Steps(x=to_tensor(a[None])))).results))

    def step_many(self, session_ids: Sequence[str], x: ArrayLike) -> StepBatch:
        """Steps for many sessions in one message: x [rows, k, features], a row per session."""
        return _step_batch(self.send(pb.StreamRequest(
            steps=pb.Steps(session_ids=session_ids, x=to_tensor(x)))).results)

    def _control(self, action: int, session_id: str) -> pb.StreamResponse:
        return self.send(pb.StreamRequest(control=pb.Control(action=action,
                                                             session_id=session_id)))

    def reset(self, session_id: str = "") -> pb.SessionInfo:
        return self._control(pb.CONTROL_ACTION_RESET, session_id).session

    def snapshot(self, session_id: str = "") -> dict[str, np.ndarray]:
        return to_arrays(self._control(pb.CONTROL_ACTION_SNAPSHOT, session_id).state.states)

    def close(self, session_id: str = "") -> pb.SessionInfo:
        return self._control(pb.CONTROL_ACTION_CLOSE, session_id).session

    def end(self) -> None:
        """Half-close the stream; sessions stay alive on the server until closed or idle."""
        self._requests.put(_END)
        with contextlib.suppress(grpc.RpcError):
            for _ in self._responses:
                pass

    def cancel(self) -> None:
        """Drop the stream abruptly, as a crashed client would."""
        self._responses.cancel()
