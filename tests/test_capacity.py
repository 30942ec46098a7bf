"""What a normal client sends, on the defaults, is answered; past the documented capacity a
call gets RESOURCE_EXHAUSTED with a RetryInfo, never a transport refusal; health and reflection
answer whatever holds the call slots."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import ServerProcess
from rnnserve.client import RnnServeError
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc
from tests.conftest import running


def test_two_thousand_unary_calls_on_one_channel_are_all_answered(tmp_path: Path) -> None:
    """tritonclient's asyncio client, the usual asyncio.gather, one channel, two workers: with
    100 streams per connection 28 of 300 were refused (REFUSED_STREAM), and grpc core's default
    of 1,000 pending calls cancelled 161 of 2,000."""
    aio = pytest.importorskip("tritonclient.grpc.aio")
    server = ServerProcess(tmp_path / "log", "--workers", "2")

    async def burst(calls: int) -> Counter:
        client = aio.InferenceServerClient(url=server.address)
        x = np.ones((1, 1, 1), np.float32)

        async def one() -> str:
            tensor = aio.InferInput("x", [1, 1, 1], "FP32")
            tensor.set_data_from_numpy(x)
            try:
                await client.infer("echo", [tensor])
                return "ok"
            except Exception as exc:  # the status is what the test reports
                return type(exc).__name__ + ": " + str(exc)[:100]

        try:
            return Counter(await asyncio.gather(*(one() for _ in range(calls))))
        finally:
            await client.close()

    try:
        assert asyncio.run(burst(300)) == Counter(ok=300)  # a cold channel
        assert asyncio.run(burst(2000)) == Counter(ok=2000)
    finally:
        server.stop()


def test_health_answers_while_idle_streams_hold_every_call_slot() -> None:
    with running(max_concurrent_rpcs=20) as srv:
        async def scenario() -> None:
            forever = asyncio.Event()

            async def nothing():
                await forever.wait()
                yield  # pragma: no cover - never reached

            channels = [grpc.aio.insecure_channel(srv.address) for _ in range(3)]
            held = [rnnserve_pb2_grpc.InferenceStub(channels[i % 3]).Stream(nothing())
                    for i in range(30)]  # header-only streams: 10 more than the slots
            try:
                health = health_pb2_grpc.HealthStub(channels[0])
                deadline = asyncio.get_running_loop().time() + 30
                while True:  # until the streams hold every slot
                    try:
                        await srv_predict(srv.address)
                    except RnnServeError as exc:
                        assert exc.code.name == "RESOURCE_EXHAUSTED" and exc.retry_after == 1.0
                        assert "--max-concurrent-rpcs" in str(exc)
                        break
                    assert asyncio.get_running_loop().time() < deadline
                    await asyncio.sleep(0.05)
                for _ in range(20):
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
            finally:
                for call in held:
                    call.cancel()
                for channel in channels:
                    await channel.close()
            for _ in range(100):  # the slots come back once the streams are gone
                try:
                    await srv_predict(srv.address)
                    return
                except RnnServeError:
                    await asyncio.sleep(0.05)
            raise AssertionError("the slots never came back")

        asyncio.run(scenario())


async def srv_predict(address: str) -> None:
    from rnnserve.client import AsyncClient

    async with AsyncClient(address) as client:
        await client.predict("echo", np.ones((1, 2, 1), np.float32))
