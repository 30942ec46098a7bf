"""The floors rnnserve is measured against: the same Stream RPC and messages, answered by a bare
servicer. Without --model it only echoes (the transport's floor); with --model bound it also runs
the echo model once per message, on all of its rows, through bound ONNX Runtime buffers holding
the stream's state (the least any server that runs the model per message must pay: no sessions,
checks, batching or metrics); --model run does the same through plain `session.run`, to show
what binding is worth in a live server.

The same floors answer KServe v2 `ModelInfer` (unary) with a response of the size rnnserve
sends, for bench/v2_unary.py: one bound run per call on one state, no sequence bookkeeping.

Run as `python -m bench.echo_server PORT [--model bound|run]`; bench/streaming.py starts it.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import numpy as np

from rnnserve.doors.tensors import to_tensor
from rnnserve.generated.inference import grpc_service_pb2 as v2
from rnnserve.generated.inference import grpc_service_pb2_grpc as v2_rpc
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from rnnserve.models.contract import read_spec
from rnnserve.models.runner import OrtRunner

ECHO = Path(__file__).resolve().parent.parent / "exported" / "echo" / "1"


class EchoServicer(rpc.InferenceServicer):
    """Answers every message with a response of the size rnnserve would send."""

    def __init__(self, runner: OrtRunner | None, bound: bool) -> None:
        self.runner = runner
        self.bound = bound

    async def Stream(self, requests, context):
        opened = pb.StreamResponse(
            open=pb.OpenSessionResponse(session=pb.Session(session_id="0" * 32, model="echo"))
        )
        bound = None
        async for request in requests:
            if request.WhichOneof("kind") == "open":
                yield opened
                continue
            rows, k = request.step.x.shape[0], request.step.x.shape[1]
            if self.runner is not None and (bound is None or bound.x.shape[:2] != (rows, k)):
                bound = self.runner.bind(rows, k)  # the stream's own buffers hold its state
            if bound is None:
                y = np.zeros((rows, k, 2), "<f4")
            elif not self.bound:
                x = np.frombuffer(request.step.x.data, "<f4").reshape(bound.x.shape)
                y, bound.states = self.runner.run(x, bound.states)
            else:
                bound.x[...] = np.frombuffer(request.step.x.data, "<f4").reshape(bound.x.shape)
                self.runner.run_bound(bound)
                for state, final in zip(bound.states, bound.finals):
                    state[...] = final
                y = bound.y
            yield pb.StreamResponse(
                request_id=request.request_id,
                step=pb.StepResponse(y=to_tensor(y), steps=[k] * rows),
            )


class EchoV2Servicer(v2_rpc.GRPCInferenceServiceServicer):
    """ModelInfer answered as rnnserve answers a request that names no outputs (Triton: all of
    them): y [1, 1, 2] and each state [1, size], FP32; after one model run when a runner is
    given."""

    def __init__(self, runner: OrtRunner | None) -> None:
        self.bound = runner.bind(1, 1) if runner is not None else None
        self.runner = runner
        self.states = read_spec(ECHO).states

    async def ModelInfer(self, request, context):
        if self.bound is None:
            outputs = [
                ("y", np.zeros((1, 1, 2), "<f4")),
                *((s.output, np.zeros((1, s.size), "<f4")) for s in self.states),
            ]
        else:
            self.bound.x[...] = np.frombuffer(request.raw_input_contents[0], "<f4").reshape(
                self.bound.x.shape
            )
            self.runner.run_bound(self.bound)
            for state, final in zip(self.bound.states, self.bound.finals):
                state[...] = final
            outputs = [
                ("y", self.bound.y),
                *((s.output, f) for s, f in zip(self.states, self.bound.finals)),
            ]
        response = v2.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id
        )
        for name, array in outputs:
            response.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
            response.raw_output_contents.append(array.tobytes())
        return response


async def main(port: int, model: str) -> None:
    runner = None
    if model:
        runner = OrtRunner(read_spec(ECHO), ECHO, "cpu", 1)
    server = grpc.aio.server()
    rpc.add_InferenceServicer_to_server(EchoServicer(runner, model == "bound"), server)
    v2_rpc.add_GRPCInferenceServiceServicer_to_server(EchoV2Servicer(runner), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--model",
        choices=("bound", "run"),
        default="",
        help="also run the echo model per message, through bound buffers or session.run",
    )
    args = parser.parse_args()
    asyncio.run(main(args.port, args.model))
