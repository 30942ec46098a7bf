"""The native rnnserve.v1 front door: protobuf in, engine call, protobuf out. No model logic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from rnnserve.converters import (
    fill_tensor,
    model_info,
    session_info,
    to_array,
    to_arrays,
    to_tensor,
    to_tensors,
)
from rnnserve.engine import Engine, StepOutcome
from rnnserve.errors import InvalidArgument, ServingError
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from rnnserve.identity import Identities
from rnnserve.metrics import Call, Metrics
from rnnserve.rpc_errors import internal_error, status_code, stream_replies, unary
from rnnserve.sessions import Session
from rnnserve.streams import OpenStreams


def _label(call: Call, session: Session) -> None:
    call.model, call.version = session.model.labels


def _label_first(call: Call, outcome: StepOutcome) -> None:
    """Label a multi-session call by its first live session (rows may span models)."""
    for session in outcome.sessions:
        if session is not None:
            _label(call, session)
            return


def fill_step_results(results: pb.StepResults, outcome: StepOutcome) -> pb.StepResults:
    """Written into the message in place: a streamed step must not build and copy a second."""
    fill_tensor(results.y, outcome.y)
    results.steps.extend(outcome.steps)
    for e in outcome.errors:
        results.errors.add(row=e.row, code=grpc.StatusCode[e.code].value[0], message=e.message)
    return results


@dataclass
class _StreamState:
    client: str = ""
    """Who opened the stream; every message on it acts for that client."""
    current: str = ""
    """The session an `open` last opened or resumed; Steps without ids go to it."""


class InferenceServicer(rpc.InferenceServicer):
    def __init__(self, engine: Engine, metrics: Metrics, identities: Identities,
                 streams: OpenStreams) -> None:
        self.engine = engine
        self.metrics = metrics
        self.identities = identities
        self.streams = streams

    @property
    def idle_timeout(self) -> float:
        return self.engine.sessions.idle_timeout

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        registry = self.engine.registry
        return pb.ListModelsResponse(models=[model_info(m, registry.versions(m.spec.name))
                                             for m in registry.serving()])

    @unary
    async def GetModel(self, request: pb.GetModelRequest, call: Call) -> pb.ModelInfo:
        model = self.engine.model(request.model, request.version)
        call.model, call.version = model.labels
        return model_info(model, self.engine.registry.versions(request.model))

    @unary
    async def Predict(self, request: pb.PredictRequest, call: Call) -> pb.PredictResponse:
        result = await self.engine.predict(
            request.model, request.version, to_array(request.x, "x"), list(request.lengths),
            to_arrays(request.initial_states, "initial_states"),
            request.output_mode == pb.OUTPUT_MODE_LAST_STEP)
        call.model, call.version = result.model.labels
        return pb.PredictResponse(model=result.model.spec.name,
                                  version=result.model.spec.version, y=to_tensor(result.y),
                                  final_states=to_tensors(result.final_states))

    @unary
    async def OpenSession(self, request: pb.OpenSessionRequest, call: Call) -> pb.SessionInfo:
        if request.resume_session_id:
            raise InvalidArgument("resume_session_id belongs in a Stream's open message; unary "
                                  "calls name the session directly")
        return self._opened(request, call)

    @unary
    async def Step(self, request: pb.Steps, call: Call) -> pb.StepResults:
        outcome = await self.engine.step(list(request.session_ids), to_array(request.x, "x"),
                                         call.client)
        _label_first(call, outcome)
        return fill_step_results(pb.StepResults(), outcome)

    @unary
    async def ResetSession(self, request: pb.SessionRef, call: Call) -> pb.SessionInfo:
        return self._info(await self.engine.reset(request.session_id, call.client), call)

    @unary
    async def GetSessionState(self, request: pb.SessionRef, call: Call) -> pb.SessionState:
        return self._state(*await self.engine.snapshot(request.session_id, call.client), call)

    @unary
    async def CloseSession(self, request: pb.SessionRef, call: Call) -> pb.SessionInfo:
        return self._info(await self.engine.close(request.session_id, call.client), call)

    def _opened(self, request: pb.OpenSessionRequest, call: Call) -> pb.SessionInfo:
        return self._info(self.engine.open_session(
            request.model, request.version, to_arrays(request.initial_states, "initial_states"),
            request.session_id, call.client), call)

    def _info(self, session: Session, call: Call) -> pb.SessionInfo:
        """The session as the client sees it; also labels this call's metrics with its model."""
        _label(call, session)
        return session_info(session, self.idle_timeout)

    def _state(self, session: Session, states: dict, call: Call) -> pb.SessionState:
        _label(call, session)
        return pb.SessionState(session=session_info(session, self.idle_timeout),
                               states=to_tensors(states))

    async def Stream(self, requests: AsyncIterator[pb.StreamRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        stream = _StreamState()

        async def answer(request: pb.StreamRequest, client: str) -> pb.StreamResponse:
            stream.client = client
            return await self._stream_message(request, stream)

        async for response in stream_replies(requests, context, self.engine, self.identities,
                                             self.streams, answer):
            yield response

    async def _stream_message(self, request: pb.StreamRequest,
                              stream: _StreamState) -> pb.StreamResponse:
        """One message, one response; a failure becomes an error response, never a dead stream."""
        response = pb.StreamResponse(request_id=request.request_id)
        kind = request.WhichOneof("kind")
        try:
            with self.metrics.track("Stream", stream.client) as call:
                if kind == "steps":
                    ids = list(request.steps.session_ids) or [self._current(stream)]
                    outcome = await self.engine.step(ids, to_array(request.steps.x, "steps.x"),
                                                     stream.client)
                    _label_first(call, outcome)
                    fill_step_results(response.results, outcome)
                elif kind == "open":
                    response.opened.CopyFrom(await self._stream_open(request.open, stream, call))
                elif kind == "control":
                    await self._control(request.control, stream, response, call)
                else:
                    raise InvalidArgument("empty StreamRequest: set open, steps or control")
        except ServingError as exc:
            response.error.CopyFrom(pb.Status(code=status_code(exc).value[0], message=str(exc)))
        except Exception:
            error = internal_error("Stream")
            response.error.CopyFrom(pb.Status(code=grpc.StatusCode.INTERNAL.value[0],
                                              message=str(error)))
        return response

    @staticmethod
    def _current(stream: _StreamState) -> str:
        if not stream.current:
            raise InvalidArgument("no session on this stream yet: send `open` first, or name the "
                                  "sessions in steps.session_ids")
        return stream.current

    async def _stream_open(self, request: pb.OpenSessionRequest, stream: _StreamState,
                           call: Call) -> pb.SessionInfo:
        if request.resume_session_id:
            if request.model or request.version or request.initial_states or request.session_id:
                raise InvalidArgument("resume takes only resume_session_id: the session keeps its "
                                      "model, version and state")
            info = self._info(await self.engine.find(request.resume_session_id, call.client),
                              call)
        else:
            info = self._opened(request, call)
        stream.current = info.session_id
        return info

    async def _control(self, control: pb.Control, stream: _StreamState,
                       response: pb.StreamResponse, call: Call) -> None:
        session_id = control.session_id or self._current(stream)
        if control.action == pb.CONTROL_ACTION_RESET:
            session = await self.engine.reset(session_id, call.client)
        elif control.action == pb.CONTROL_ACTION_SNAPSHOT:
            response.state.CopyFrom(self._state(
                *await self.engine.snapshot(session_id, call.client), call))
            return
        elif control.action == pb.CONTROL_ACTION_CLOSE:
            session = await self.engine.close(session_id, call.client)
            if stream.current == session_id:
                stream.current = ""
        else:
            raise InvalidArgument("control.action must be RESET, SNAPSHOT or CLOSE")
        response.session.CopyFrom(self._info(session, call))
