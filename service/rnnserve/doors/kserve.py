"""The KServe v2 gRPC front door (inference.GRPCInferenceService), with Triton's sequence
extension: protobuf in, the data plane (kserve_dataplane), protobuf out.

Same engine as the native API: a v2 sequence is an rnnserve session, so both share the state
store, the batcher, the idle timeout and the metrics.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable

import grpc

from rnnserve.doors.identity import Identities
from rnnserve.doors.kserve_converters import (
    config_message,
    infer_request,
    infer_response,
    metadata_message,
)
from rnnserve.doors.kserve_dataplane import DataPlane, InferResponse
from rnnserve.doors.rpc_errors import internal_error, stream_replies, unary
from rnnserve.doors.streams import OpenStreams
from rnnserve.engine.engine import Engine
from rnnserve.errors import ServingError
from rnnserve.generated.inference import grpc_service_pb2 as v2
from rnnserve.generated.inference import grpc_service_pb2_grpc as v2_rpc
from rnnserve.ops.metrics import Call, Metrics

log = logging.getLogger(__name__)


class KServeServicer(v2_rpc.GRPCInferenceServiceServicer):
    def __init__(
        self, engine: Engine, metrics: Metrics, identities: Identities, streams: OpenStreams
    ) -> None:
        self.engine = engine
        self.plane = DataPlane(engine)
        self.metrics = metrics
        self.identities = identities
        self.streams = streams

    @unary
    async def ServerLive(self, request: v2.ServerLiveRequest, call: Call) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=self.plane.server_live())

    @unary
    async def ServerReady(
        self, request: v2.ServerReadyRequest, call: Call
    ) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.plane.server_ready())

    @unary
    async def ModelReady(self, request: v2.ModelReadyRequest, call: Call) -> v2.ModelReadyResponse:
        return v2.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    @unary
    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, call: Call
    ) -> v2.ServerMetadataResponse:
        server = self.plane.server_metadata()
        return v2.ServerMetadataResponse(
            name=server.name, version=server.version, extensions=server.extensions
        )

    @unary
    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, call: Call
    ) -> v2.ModelMetadataResponse:
        return metadata_message(self.plane.model_metadata(request.name, request.version, call))

    @unary
    async def ModelConfig(
        self, request: v2.ModelConfigRequest, call: Call
    ) -> v2.ModelConfigResponse:
        config = self.plane.model_config(request.name, request.version, call)
        return v2.ModelConfigResponse(config=config_message(config))

    @unary
    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, call: Call
    ) -> v2.RepositoryIndexResponse:
        index = v2.RepositoryIndexResponse()
        for model in self.plane.repository_index(request.ready):
            index.models.add(name=model.name, version=model.version, state=model.state)
        return index

    @unary
    async def ModelInfer(self, request: v2.ModelInferRequest, call: Call) -> v2.ModelInferResponse:
        return infer_response(await self._infer(request, call))

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
                answer = await self._infer(request, call)
            return v2.ModelStreamInferResponse(infer_response=infer_response(answer))
        except Exception as exc:
            error = exc if isinstance(exc, ServingError) else internal_error("ModelStreamInfer")
            return v2.ModelStreamInferResponse(
                error_message=f"{error.code}: {error}",
                infer_response=v2.ModelInferResponse(model_name=request.model_name, id=request.id),
            )

    def _infer(self, request: v2.ModelInferRequest, call: Call) -> Awaitable[InferResponse]:
        """The data plane's answer to await: the model is found before the tensors are read,
        and a plain function hands on the data plane's coroutine (no frame of its own)."""
        model = self.plane.model(request.model_name, request.model_version, call)
        return self.plane.infer(model, infer_request(request), call)
