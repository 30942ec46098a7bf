"""The KServe v2 front door (inference.GRPCInferenceService), with Triton's sequence extension.

Same engine as the native API: a v2 sequence is an rnnserve session, so both share the state
store, the batcher, the idle timeout and the metrics.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator

import grpc
import numpy as np

from rnnserve import __version__
from rnnserve.doors.identity import Identities
from rnnserve.doors.kserve_converters import config, metadata, parameter, request_inputs, response
from rnnserve.doors.rpc_errors import internal_error, stream_replies, unary
from rnnserve.doors.streams import OpenStreams
from rnnserve.engine.engine import Engine, ModelView
from rnnserve.errors import InvalidArgument, ServingError
from rnnserve.generated.inference import grpc_service_pb2 as v2
from rnnserve.generated.inference import grpc_service_pb2_grpc as v2_rpc
from rnnserve.models.contract import INPUT_NAME, MAX_VERSION_DIGITS, OUTPUT_NAME
from rnnserve.ops.metrics import Call, Metrics

log = logging.getLogger(__name__)
EXTENSIONS = ["sequence", "model_configuration", "model_repository"]
MAX_SEQUENCE_ID = 256
"""Characters in a string sequence_id: it is hashed into a session id, never stored."""


def _version(text: str) -> int:
    if not text:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_VERSION_DIGITS):
        raise InvalidArgument(
            f"model_version {text[:32]!r} is not a version number (digits "
            "0-9; empty for the latest)"
        )
    return int(text)


def sequence_session_id(client: str, model: str, sequence_id: int | str) -> str:
    """The session behind a v2 sequence: derived, not stored, so every replica (also one that
    adopts it after a handoff) finds the same session for the same (client, model, sequence
    id). The client is part of it, so another client's sequence 1 is another session."""
    kind = "str" if isinstance(sequence_id, str) else "int"
    key = f"{client}\0{model}\0{kind}\0{sequence_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class KServeServicer(v2_rpc.GRPCInferenceServiceServicer):
    def __init__(
        self, engine: Engine, metrics: Metrics, identities: Identities, streams: OpenStreams
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.identities = identities
        self.streams = streams

    @unary
    async def ServerLive(self, request: v2.ServerLiveRequest, call: Call) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(
        self, request: v2.ServerReadyRequest, call: Call
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.engine.ready)

    @unary
    async def ModelReady(self, request: v2.ModelReadyRequest, call: Call) -> v2.ModelReadyResponse:
        return v2.ModelReadyResponse(
            ready=self.engine.model_ready(request.name, _version(request.version))
        )

    @unary
    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, call: Call
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(
            name="rnnserve", version=__version__, extensions=EXTENSIONS
        )

    @unary
    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, call: Call
    ) -> v2.ModelMetadataResponse:
        model = self._model(request.name, request.version, call)
        return metadata(model.spec, model.versions)

    @unary
    async def ModelConfig(
        self, request: v2.ModelConfigRequest, call: Call
    ) -> v2.ModelConfigResponse:
        model = self._model(request.name, request.version, call)
        return v2.ModelConfigResponse(config=config(model.spec, self.engine.idle_timeout))

    @unary
    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, call: Call
    ) -> v2.RepositoryIndexResponse:
        index = v2.RepositoryIndexResponse()
        for model in self.engine.models():
            if model.ready or not request.ready:
                index.models.add(
                    name=model.spec.name, version=str(model.spec.version), state=model.state
                )
        return index

    @unary
    async def ModelInfer(self, request: v2.ModelInferRequest, call: Call) -> v2.ModelInferResponse:
        return await self._infer(request, call)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[v2.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """One response per request, in order; a failed request answers error_message only."""
        async for reply in stream_replies(
            requests, context, self.engine, self.identities, self.streams, self._stream_reply
        ):
            yield reply

    async def _stream_reply(
        self, request: v2.ModelInferRequest, client: str
    ) -> v2.ModelStreamInferResponse:
        try:
            with self.metrics.track("ModelStreamInfer", client) as call:
                reply = await self._infer(request, call)
            return v2.ModelStreamInferResponse(infer_response=reply)
        except Exception as exc:
            error = exc if isinstance(exc, ServingError) else internal_error("ModelStreamInfer")
            return v2.ModelStreamInferResponse(
                error_message=f"{error.code}: {error}",
                infer_response=v2.ModelInferResponse(model_name=request.model_name, id=request.id),
            )

    def _model(self, name: str, version: str, call: Call) -> ModelView:
        call.model = self.engine.model_label(name)
        model = self.engine.describe(name, _version(version))
        call.model, call.version = model.labels
        return model

    async def _infer(self, request: v2.ModelInferRequest, call: Call) -> v2.ModelInferResponse:
        model = self._model(request.model_name, request.model_version, call)
        inputs = request_inputs(request)
        if INPUT_NAME not in inputs:
            raise InvalidArgument(
                f"input {INPUT_NAME!r} (FP32 [batch, time, {model.spec.features}]) is required"
            )
        x = inputs.pop(INPUT_NAME)
        sequence_id = parameter(request, "sequence_id")
        if not sequence_id:  # Triton: 0 or "" means no sequence
            result = await self.engine.predict(
                model.spec.name, model.spec.version, x, [], inputs, last_only=False
            )
            outputs = {
                OUTPUT_NAME: result.y,
                **{s.output: result.final_states[s.input] for s in model.spec.states},
            }
            return response(model.spec, request, outputs)
        return await self._sequence_step(model, request, sequence_id, x, inputs, call.client)

    async def _sequence_step(
        self,
        model: ModelView,
        request: v2.ModelInferRequest,
        sequence_id: int | str | float,
        x: np.ndarray,
        states: dict[str, np.ndarray],
        client: str,
    ) -> v2.ModelInferResponse:
        spec = model.spec
        if isinstance(sequence_id, (float, bool)) or (
            isinstance(sequence_id, str) and len(sequence_id) > MAX_SEQUENCE_ID
        ):
            raise InvalidArgument(
                "sequence_id must be an integer or a string of at most "
                f"{MAX_SEQUENCE_ID} characters"
            )
        wanted = {o.name for o in request.outputs}
        step = await self.engine.sequence_step(
            spec.name,
            spec.version,
            sequence_session_id(client, spec.name, sequence_id),
            x,
            states,
            start=bool(parameter(request, "sequence_start")),
            end=bool(parameter(request, "sequence_end")),
            with_states=not wanted or bool(wanted - {OUTPUT_NAME}),
            owner=client,
        )
        outputs = {OUTPUT_NAME: step.y}
        if step.states is not None:
            outputs.update({s.output: step.states[s.input][None] for s in spec.states})
        return response(spec, request, outputs)
