"""Inbound bytes are bounded: a half-sent message is received only by an admitted call holding
a read slot, and only for --read-timeout; health checks get their messages read whatever the
number of connections sending half messages. Measured on the server process's RSS, with a raw
HTTP/2 client sending what no grpc client can."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.cluster import ServerProcess
from rnnserve.client import Client
from rnnserve.doors.read_slots import EvictingSlots, ReadSlots
from tests.half_messages import HalfMessages

MIB = 2**20
PREDICT = "/rnnserve.v1.Inference/Predict"
ANNOUNCED = 16 * 10**6


def pumping(attack: HalfMessages, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=attack.pump, args=(seconds,), daemon=True)
    thread.start()
    return thread


def test_unauthenticated_half_messages_are_never_received(tmp_path: Path) -> None:
    """Before: one connection of 100 such streams took the server from 102 to 1,713 MiB."""
    server = ServerProcess(tmp_path / "log", "--auth-token", "secret")
    try:
        before = server.status("VmRSS")
        attack = HalfMessages(server.address, PREDICT, connections=2, streams=100, size=ANNOUNCED)
        attack.pump(4)
        grown = (server.status("VmRSS") - before) / MIB
        print(
            f"RSS +{grown:.0f} MiB; {attack.ended} streams refused, "
            f"{attack.sent / MIB:.1f} MiB sent"
        )
        attack.close()
        assert attack.ended >= 200, "every stream is refused, none waits"
        assert grown < 48
        with Client(server.address, token="secret") as client:
            assert client.predict("echo", np.ones((1, 3, 1), np.float32)).y.shape[:2] == (1, 3)
    finally:
        server.stop()


def test_a_client_sending_half_messages_holds_only_its_share_for_the_read_timeout(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("mallory mallory-token-0123456789\nalice alice-token-0123456789\n")
    # 4 read slots of 16 MiB, two of them one client's at most
    server = ServerProcess(
        tmp_path / "log",
        "--auth-tokens-file",
        str(tokens),
        "--read-budget",
        "64M",
        "--read-timeout",
        "1",
    )
    try:
        before = server.status("VmRSS")
        attack = HalfMessages(
            server.address,
            PREDICT,
            connections=1,
            streams=50,
            size=ANNOUNCED,
            metadata=(("authorization", "Bearer mallory-token-0123456789"),),
        )
        thread = pumping(attack, 5)
        time.sleep(1)
        with Client(server.address, token="alice-token-0123456789") as alice:
            for _ in range(20):  # alice's calls have slots of their own
                started = time.monotonic()
                alice.predict("echo", np.ones((1, 3, 1), np.float32))
                assert time.monotonic() - started < 0.5
        thread.join()
        grown = (server.status("VmRSS") - before) / MIB
        print(
            f"RSS +{grown:.0f} MiB; {attack.ended} of mallory's streams ended, "
            f"{attack.sent / MIB:.0f} MiB sent"
        )
        attack.close()
        # two slots' worth received at a time, each given up after a second; what the
        # allocator keeps of the churn stays within the read budget (50 x 16 MB before)
        assert attack.ended >= 4
        assert grown < 64 + 24
        with Client(server.address, token="alice-token-0123456789") as alice:
            alice.predict("echo", np.ones((1, 3, 1), np.float32))  # after mallory left
        assert (server.status("VmRSS") - before) / MIB < 64 + 24  # 2.7 GB stayed, before
    finally:
        server.stop()


def test_health_checks_are_read_at_once_during_a_half_message_attack_on_health(
    tmp_path: Path,
) -> None:
    server = ServerProcess(tmp_path / "log")
    try:
        before = server.status("VmRSS")
        attack = HalfMessages(
            server.address,
            "/grpc.health.v1.Health/Check",
            connections=8,
            streams=50,
            size=ANNOUNCED,
        )
        thread = pumping(attack, 6)
        time.sleep(1)

        async def probes() -> list[float]:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                took = []
                for _ in range(20):
                    started = time.monotonic()
                    answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                    took.append(time.monotonic() - started)
                    await asyncio.sleep(0.1)
                return took

        took = asyncio.run(probes())
        thread.join()
        grown = (server.status("VmRSS") - before) / MIB
        attack.close()
        print(
            f"probes worst {max(took) * 1000:.0f} ms; RSS +{grown:.0f} MiB; "
            f"{attack.ended} attacking streams ended"
        )
        assert max(took) < 1
        assert grown < 8 * 16 + 400 * 64 / 1024 + 48  # its 8 slots and the windows
    finally:
        server.stop()


def test_read_slots_share_and_order() -> None:
    async def scenario() -> None:
        slots = ReadSlots(3, per_client=2)
        assert slots.take_now("a") and slots.take_now("a")
        assert not slots.take_now("a"), "a client holds at most its share"
        third = asyncio.ensure_future(slots.take("a"))
        await asyncio.sleep(0)
        assert not third.done()
        await slots.take("b")  # another client passes a waiter over its share
        waiting_b = asyncio.ensure_future(slots.take("b"))
        waiting_c = asyncio.ensure_future(slots.take("c"))
        await asyncio.sleep(0)
        waiting_b.cancel()  # a caller that gives up leaves nothing behind
        await asyncio.sleep(0)
        slots.give_back("a")
        await asyncio.sleep(0)
        assert third.done() and not waiting_c.done(), "first come, first served"
        slots.give_back("b")
        await asyncio.sleep(0)
        assert waiting_c.done()
        for client in ("a", "a", "c"):
            slots.give_back(client)
        assert slots.free == 3 and not slots.held

    asyncio.run(scenario())


def test_evicting_slots_give_a_newcomer_the_place_of_the_oldest_read() -> None:
    async def scenario() -> None:
        slots = EvictingSlots(2)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(10) as oldest:
                slots.take(oldest)
                async with asyncio.timeout(10) as old, asyncio.timeout(10) as newcomer:
                    slots.take(old)
                    due = old.when()
                    slots.take(newcomer)
                    assert old.when() == due, "only the oldest read gives way"
                    slots.give_back(newcomer)
                    slots.give_back(old)
                await asyncio.sleep(1)  # the evicted read times out at once

    asyncio.run(scenario())
