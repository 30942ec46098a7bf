"""Whole-sequence throughput: Predict through rnnserve vs bare ONNX Runtime in this process.

Two loads on binary_add: all 16,384 pairs in one call, and many concurrent small calls.
"""

from __future__ import annotations

import asyncio
import sys
import time

import grpc
import numpy as np

from bench.streaming import ROOT, ServerProcess, machine, save
from rnnserve.doors.tensors import to_tensor
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from rnnserve.models.contract import read_spec
from rnnserve.models.runner import OrtRunner

MODEL_DIR = ROOT / "exported" / "binary_add" / "1"
SMALL_BATCH, CONCURRENT, SECONDS = 8, 32, 3.0
LARGE_MESSAGES = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def all_pairs() -> np.ndarray:
    a, b = (g.reshape(-1) for g in np.meshgrid(np.arange(128), np.arange(128)))
    bits = lambda v: (v[:, None] >> np.arange(8)) & 1  # noqa: E731
    return np.stack([bits(a), bits(b)], axis=-1).astype(np.float32)


def median_seconds(fn, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def in_process(x: np.ndarray) -> float:
    runner = OrtRunner(read_spec(MODEL_DIR), MODEL_DIR, "cpu", 1)
    states = [np.zeros((len(x), s.size), np.float32) for s in runner.spec.states]
    return median_seconds(lambda: runner.run(x, states))


def request(x: np.ndarray) -> pb.PredictRequest:
    return pb.PredictRequest(model="binary_add", x=to_tensor(x))


async def many_small(port: int, x: np.ndarray) -> float:
    """Sequences/s from CONCURRENT callers, each sending SMALL_BATCH sequences per call."""
    done = 0
    message = request(x[:SMALL_BATCH])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.InferenceStub(channel)
        end = time.perf_counter() + SECONDS

        async def caller() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stub.Predict(message)
                done += SMALL_BATCH

        await asyncio.gather(*(caller() for _ in range(CONCURRENT)))
    return done / SECONDS


def main() -> int:
    x = all_pairs()
    ceiling_all = in_process(x)
    ceiling_small = SMALL_BATCH / in_process(x[:SMALL_BATCH])
    server = ServerProcess("--models", "binary_add")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}", LARGE_MESSAGES) as channel:
            stub = rpc.InferenceStub(channel)
            message = request(x)
            stub.Predict(message)
            served_all = median_seconds(lambda: stub.Predict(message))
        served_small = asyncio.run(many_small(server.port, x))
    finally:
        server.stop()
    rows = [
        {
            "load": "16,384 sequences in one Predict",
            "rnnserve": len(x) / served_all,
            "in_process": len(x) / ceiling_all,
        },
        {
            "load": f"{CONCURRENT} concurrent Predicts of {SMALL_BATCH}",
            "rnnserve": served_small,
            "in_process": ceiling_small,
        },
    ]
    print(f"\nbinary_add whole-sequence throughput on {machine()}\n")
    print("| load | rnnserve sequences/s | in-process ORT sequences/s | ratio |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['load']} | {r['rnnserve']:,.0f} | {r['in_process']:,.0f} | "
            f"{r['rnnserve'] / r['in_process']:.2f} |"
        )
    save("predict", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
