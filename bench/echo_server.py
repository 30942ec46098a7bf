"""The transport's floor: the same Stream RPC and messages as rnnserve, answered without a model.

Run as `python -m bench.echo_server PORT`; bench/streaming.py starts it beside rnnserve.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np

from service.generated.rnnserve.v1 import rnnserve_pb2 as pb
from service.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc


class EchoServicer(rpc.InferenceServicer):
    """Answers every message with a fixed response of the size rnnserve would send."""

    async def Stream(self, requests, context):
        opened = pb.StreamResponse(opened=pb.SessionInfo(session_id="0" * 32, model="echo"))
        async for request in requests:
            if request.WhichOneof("kind") == "open":
                yield opened
                continue
            rows, k = request.steps.x.shape[0], request.steps.x.shape[1]
            y = np.zeros((rows, k, 2), "<f4")
            yield pb.StreamResponse(request_id=request.request_id, results=pb.StepResults(
                y=pb.Tensor(shape=y.shape, data=y.tobytes()), steps=[k] * rows))


async def main(port: int) -> None:
    server = grpc.aio.server()
    rpc.add_InferenceServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
