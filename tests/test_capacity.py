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
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bench.cluster import ServerProcess
from rnnserve.client import Client, RnnServeError
from rnnserve.doors.tensors import to_array, to_tensor
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2, rnnserve_pb2_grpc
from tests.conftest import running


@pytest.mark.parametrize("workers", ["1", "2"])
def test_two_thousand_unary_calls_on_one_channel_are_all_answered(
    tmp_path: Path, workers: str
) -> None:
    """tritonclient's asyncio client, the usual asyncio.gather, one channel: with 100 streams
    per connection 28 of 300 were refused (REFUSED_STREAM), and grpc core's default of 1,000
    pending calls cancelled 161 of 2,000."""
    aio = pytest.importorskip("tritonclient.grpc.aio")
    server = ServerProcess(tmp_path / "log", "--workers", workers)

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


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_thousand_streams_over_64_channels_are_all_served(tmp_path: Path, workers: str) -> None:
    """1,024 streams open at once over 64 connections (grpc's own asyncio client), each opening
    a session and stepping it: every message is answered, and exactly."""
    server = ServerProcess(tmp_path / "log", "--workers", workers)
    steps = np.array([1.0, 0.0, 1.0], np.float32)
    with Client(server.address) as client:
        expected = client.predict("echo", steps[None, :, None]).y[0]

    async def scenario() -> Counter:
        channels = [
            grpc.aio.insecure_channel(server.address, [("grpc.use_local_subchannel_pool", 1)])
            for _ in range(64)
        ]
        started = asyncio.Barrier(1024)

        async def one(i: int) -> str:
            call = rnnserve_pb2_grpc.InferenceStub(channels[i % 64]).Stream()
            try:
                await call.write(
                    rnnserve_pb2.StreamRequest(open=rnnserve_pb2.OpenSessionRequest(model="echo"))
                )
                if (await call.read()).WhichOneof("kind") != "open":
                    return "open failed"
                await started.wait()  # every stream open at once from here
                ys = []
                for x in steps:
                    await call.write(
                        rnnserve_pb2.StreamRequest(
                            step=rnnserve_pb2.StepRequest(x=to_tensor(np.array([[x]], np.float32)))
                        )
                    )
                    answer = await call.read()
                    if answer.WhichOneof("kind") != "step":
                        return f"step failed: {answer.error.message}"
                    ys.append(to_array(answer.step.y, "y"))
                await call.done_writing()
                got = np.concatenate(ys, axis=1)[0]
                return "ok" if np.max(np.abs(got - expected)) <= 1e-6 else "inexact"
            except grpc.aio.AioRpcError as exc:
                return exc.code().name
            finally:
                call.cancel()

        try:
            return Counter(await asyncio.gather(*(one(i) for i in range(1024))))
        finally:
            for channel in channels:
                await channel.close()

    try:
        assert asyncio.run(scenario()) == Counter(ok=1024)
    finally:
        server.stop()


def test_health_and_reflection_answer_while_idle_streams_hold_every_call_slot() -> None:
    with running(max_concurrent_rpcs=20) as srv:

        async def scenario() -> None:
            forever = asyncio.Event()

            async def nothing():
                await forever.wait()
                yield  # pragma: no cover - never reached

            channels = [grpc.aio.insecure_channel(srv.address) for _ in range(3)]
            held = [
                rnnserve_pb2_grpc.InferenceStub(channels[i % 3]).Stream(nothing())
                for i in range(30)
            ]  # header-only streams: 10 more than the slots
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
                reflection = reflection_pb2_grpc.ServerReflectionStub(channels[1])
                for _ in range(20):
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                    listing = reflection.ServerReflectionInfo(timeout=1)
                    await listing.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                    services = (await listing.read()).list_services_response.service
                    assert "rnnserve.v1.Inference" in {s.name for s in services}
                    listing.cancel()
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
