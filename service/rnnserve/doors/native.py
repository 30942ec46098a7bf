"""The native rnnserve.v1 front door: protobuf in, engine call, protobuf out. No model logic."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from rnnserve.doors.identity import Identities
from rnnserve.doors.rpc_errors import internal_error, stream_replies, unary
from rnnserve.doors.status import fill_status, row_status, to_status
from rnnserve.doors.streams import OpenStreams
from rnnserve.doors.tensors import fill_tensor, to_array, to_arrays, to_tensor, to_tensors
from rnnserve.engine.engine import Engine, ModelView, SessionView
from rnnserve.engine.steps import StepMemo, StepOutcome
from rnnserve.errors import InvalidArgument, ServingError
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from rnnserve.ops.metrics import Call, Metrics


def model_message(view: ModelView) -> pb.Model:
    spec = view.spec
    return pb.Model(
        name=spec.name,
        version=spec.version,
        versions=view.versions,
        task=spec.task,
        description=spec.description,
        cell=spec.cell,
        layers=spec.layers,
        units=spec.units,
        features=spec.features,
        outputs=spec.outputs,
        output_kind=spec.output_kind,
        states=[
            pb.StateInfo(name=s.input, output=s.output, size=s.size, datatype=pb.DATA_TYPE_FP32)
            for s in spec.states
        ],
        ready=view.ready,
        datatype=pb.DATA_TYPE_FP32,
    )


def fill_step_response(response: pb.StepResponse, outcome: StepOutcome) -> pb.StepResponse:
    """Written into the message in place: a streamed step must not build and copy a second."""
    fill_tensor(response.y, outcome.y)
    response.steps.extend(outcome.steps)
    for e in outcome.errors:
        fill_status(response.errors.add(row=e.row).status, e.code, e.message, e.retry_after)
    return response


@dataclass
class _StreamState:
    client: str = ""
    """Who opened the stream; every message on it acts for that client."""
    current: str = ""
    """The session an `open` or `resume` last named; messages without an id go to it."""
    named: StepMemo = field(default_factory=StepMemo)
    """The sessions this stream's last step with session_ids (or same_sessions) resolved."""
    own: StepMemo = field(default_factory=StepMemo)
    """The same for steps of the current session, kept apart: `same_sessions` never means it."""


class InferenceServicer(rpc.InferenceServicer):
    def __init__(
        self, engine: Engine, metrics: Metrics, identities: Identities, streams: OpenStreams
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.identities = identities
        self.streams = streams

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, call: Call) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_message(m) for m in self.engine.models()])

    @unary
    async def GetModel(self, request: pb.GetModelRequest, call: Call) -> pb.GetModelResponse:
        call.model = self.engine.model_label(request.model)  # also when the lookup fails
        view = self.engine.describe(request.model, request.version)
        call.model, call.version = view.labels
        return pb.GetModelResponse(model=model_message(view))

    @unary
    async def Predict(self, request: pb.PredictRequest, call: Call) -> pb.PredictResponse:
        call.model = self.engine.model_label(request.model)
        result = await self.engine.predict(
            request.model,
            request.version,
            to_array(request.x, "x"),
            list(request.lengths),
            to_arrays(request.initial_states, "initial_states"),
            request.output_mode == pb.OUTPUT_MODE_LAST_STEP,
        )
        call.model, call.version = result.model.labels
        spec = result.model.spec
        return pb.PredictResponse(
            model=spec.name,
            version=spec.version,
            y=to_tensor(result.y),
            final_states=to_tensors(result.final_states),
        )

    @unary
    async def OpenSession(
        self, request: pb.OpenSessionRequest, call: Call
    ) -> pb.OpenSessionResponse:
        return pb.OpenSessionResponse(session=await self._open(request, call))

    @unary
    async def Step(self, request: pb.StepRequest, call: Call) -> pb.StepResponse:
        if request.same_sessions:
            raise InvalidArgument(
                "same_sessions belongs to a Stream's steps; a unary Step "
                "names its sessions in session_ids"
            )
        outcome = await self.engine.step(
            list(request.session_ids), to_array(request.x, "x"), call.client
        )
        if outcome.labels is not None:
            call.model, call.version = outcome.labels
        return fill_step_response(pb.StepResponse(), outcome)

    @unary
    async def ResetSession(
        self, request: pb.ResetSessionRequest, call: Call
    ) -> pb.ResetSessionResponse:
        return pb.ResetSessionResponse(
            session=self._session(
                await self.engine.reset_session(request.session_id, call.client), call
            )
        )

    @unary
    async def GetSessionState(
        self, request: pb.GetSessionStateRequest, call: Call
    ) -> pb.GetSessionStateResponse:
        return await self._state(request.session_id, call)

    @unary
    async def CloseSession(
        self, request: pb.CloseSessionRequest, call: Call
    ) -> pb.CloseSessionResponse:
        return pb.CloseSessionResponse(
            session=self._session(
                await self.engine.close_session(request.session_id, call.client), call
            )
        )

    async def _open(self, request: pb.OpenSessionRequest, call: Call) -> pb.Session:
        call.model = self.engine.model_label(request.model)
        return self._session(
            await self.engine.open_session(
                request.model,
                request.version,
                to_arrays(request.initial_states, "initial_states"),
                request.session_id,
                call.client,
            ),
            call,
        )

    async def _state(self, session_id: str, call: Call) -> pb.GetSessionStateResponse:
        view, states = await self.engine.session_state(session_id, call.client)
        return pb.GetSessionStateResponse(
            session=self._session(view, call), states=to_tensors(states)
        )

    def _session(self, view: SessionView, call: Call) -> pb.Session:
        """The session as the client sees it; also labels this call's metrics with its model."""
        call.model, call.version = view.labels
        session = pb.Session(
            session_id=view.session_id, model=view.model, version=view.version, steps=view.steps
        )
        session.idle_timeout.FromNanoseconds(int(self.engine.idle_timeout * 1e9))
        return session

    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        stream = _StreamState()

        async def answer(request: pb.StreamRequest, client: str) -> pb.StreamResponse:
            stream.client = client
            return await self._stream_message(request, stream)

        try:
            async for response in stream_replies(
                requests, context, self.engine, self.identities, self.streams, answer
            ):
                yield response
        finally:
            self.engine.forget(stream.named)
            self.engine.forget(stream.own)

    async def _stream_message(
        self, request: pb.StreamRequest, stream: _StreamState
    ) -> pb.StreamResponse:
        """One message, one response; a failure becomes an error response, never a dead stream."""
        response = pb.StreamResponse(request_id=request.request_id)
        kind = request.WhichOneof("kind")
        try:
            with self.metrics.track("Stream", stream.client) as call:
                if kind == "step":
                    await self._stream_step(request.step, stream, response, call)
                elif kind is None:
                    raise InvalidArgument(
                        "empty StreamRequest: set open, resume, step, reset, get_state or close"
                    )
                else:
                    await self._stream_session_call(
                        kind, getattr(request, kind), stream, response, call
                    )
        except ServingError as exc:
            response.error.CopyFrom(to_status(exc))
        except Exception:
            response.error.CopyFrom(to_status(internal_error("Stream")))
        return response

    async def _stream_step(
        self, request: pb.StepRequest, stream: _StreamState, response: pb.StreamResponse, call: Call
    ) -> None:
        """Named sessions report failed rows in the answer; the stream's own session (no ids)
        fails the message as a whole, like every other one-session operation."""
        own = not request.session_ids and not request.same_sessions
        if request.same_sessions:
            if request.session_ids:
                raise InvalidArgument(
                    "step.same_sessions repeats the previous step's sessions; "
                    "send it or session_ids, not both"
                )
            ids = self.engine.kept_sessions(stream.named)
        else:
            ids = [self._current(stream)] if own else list(request.session_ids)
        outcome = await self.engine.step(
            ids, to_array(request.x, "step.x"), stream.client, stream.own if own else stream.named
        )
        if own and outcome.errors:
            error = outcome.errors[0]
            response.error.CopyFrom(row_status(error.code, error.message, error.retry_after))
            return
        if outcome.labels is not None:
            call.model, call.version = outcome.labels
        fill_step_response(response.step, outcome)

    async def _stream_session_call(
        self, kind: str, request, stream: _StreamState, response: pb.StreamResponse, call: Call
    ) -> None:
        client = stream.client
        if kind == "open":
            session = await self._open(request, call)
            stream.current = session.session_id
            response.open.session.CopyFrom(session)
            return
        if kind == "resume" and not request.session_id:
            raise InvalidArgument("resume.session_id is required: the session to continue")
        session_id = request.session_id or self._current(stream)
        if kind == "resume":
            response.resume.session.CopyFrom(
                self._session(await self.engine.resume_session(session_id, client), call)
            )
            stream.current = session_id
        elif kind == "reset":
            response.reset.session.CopyFrom(
                self._session(await self.engine.reset_session(session_id, client), call)
            )
        elif kind == "get_state":
            response.get_state.CopyFrom(await self._state(session_id, call))
        else:  # close
            response.close.session.CopyFrom(
                self._session(await self.engine.close_session(session_id, client), call)
            )
            if stream.current == session_id:
                stream.current = ""

    @staticmethod
    def _current(stream: _StreamState) -> str:
        if not stream.current:
            raise InvalidArgument(
                "no session on this stream yet: send `open` or `resume` first, or name the session"
            )
        return stream.current
