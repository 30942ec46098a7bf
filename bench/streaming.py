"""`make bench`: streamed echo steps with batching on vs --max-batch-size 1, beside the
in-process ONNX Runtime ceiling, all measured in one run on this machine.

Server CPU per step comes from the server process's own /proc counters, so a saturated
client cannot hide the server's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from bench.cluster import cpu_seconds, free_port, wait_until_serving
from rnnserve.client import SESSION_HEADER, new_session_id
from rnnserve.doors.tensors import to_tensor
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from rnnserve.models.contract import read_spec
from rnnserve.models.runner import OrtRunner

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STREAMS_PER_CONNECTION = 64


class ServerProcess:
    """A server in its own process: rnnserve (`flags` for `serve`) or, with echo=True, a floor
    (bench/echo_server.py; `flags` are its own)."""

    def __init__(self, *flags: str, echo: bool = False) -> None:
        self.port = free_port()
        command = (
            ["-m", "bench.echo_server", str(self.port), *flags]
            if echo
            else [
                "-m",
                "rnnserve",
                "serve",
                "--grpc-port",
                str(self.port),
                "--metrics-port",
                "-1",
                "--workers",
                "1",
                "--models",
                "echo",
                "--log-level",
                "warning",
                *flags,
            ]
        )
        self.proc = subprocess.Popen([sys.executable, *command], cwd=ROOT)
        self.echo = echo
        if echo:
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=60)
        else:
            wait_until_serving(f"127.0.0.1:{self.port}", self.proc)

    def session_ids(self, count: int, model: str = "echo") -> list[str]:
        if self.echo:
            return [f"{i:032x}" for i in range(count)]
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = rpc.InferenceStub(channel)
            return [
                stub.OpenSession(pb.OpenSessionRequest(model=model)).session.session_id
                for _ in range(count)
            ]

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def close_sessions(self, ids: list[str]) -> None:
        if self.echo:
            return
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = rpc.InferenceStub(channel)
            for session_id in ids:
                stub.CloseSession(pb.CloseSessionRequest(session_id=session_id))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@dataclass(frozen=True)
class Load:
    streams: int
    k: int = 1
    """Timesteps per session per message."""
    sessions_per_message: int = 0
    """0: each stream drives its own session; n: each message carries steps for n sessions."""
    ids_every_message: bool = False
    """Multiplexed: name the sessions in every message, not only the first (later ones send
    `same_sessions`, as the Python client does)."""
    model: str = "echo"
    features: int = 1


async def drive(
    server: ServerProcess, load: Load, seconds: float, connections: int = 1
) -> dict[str, float]:
    """Ping-pong on `load.streams` streams, spread over `connections` connections (a server's
    workers are picked per connection); steps, round trips and server CPU while clocked."""
    latencies: list[float] = []
    steps = 0
    rows = load.sessions_per_message or 1
    x = np.ones((rows, load.k, load.features), "<f4")
    tensor = to_tensor(x)
    id_sets = (
        [server.session_ids(rows, load.model) for _ in range(load.streams)]
        if load.sessions_per_message
        else [[] for _ in range(load.streams)]
    )
    start, stop, stopped, clocked = (asyncio.Event() for _ in range(4))
    running = len(id_sets)
    # At most STREAMS_PER_CONNECTION streams share a connection, as clients spread them.
    connections = max(connections, -(-load.streams // STREAMS_PER_CONNECTION))
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{server.port}", [("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(connections)
    ]
    stubs = [rpc.InferenceStub(channel) for channel in channels]
    try:

        async def one(index: int, ids: list[str]) -> None:
            nonlocal steps, running
            session_id = new_session_id()  # and the routing header: a proxy spreads the streams
            call = stubs[index % connections].Stream(metadata=((SESSION_HEADER, session_id),))
            if not ids:
                await call.write(
                    pb.StreamRequest(
                        open=pb.OpenSessionRequest(model=load.model, session_id=session_id)
                    )
                )
                opened = await call.read()
                assert opened.WhichOneof("kind") == "open", opened
            request = pb.StreamRequest(step=pb.StepRequest(session_ids=ids, x=tensor))
            if ids:  # the first message names them
                await call.write(request)
                assert not (await call.read()).step.errors
                if not load.ids_every_message:
                    request = pb.StreamRequest(step=pb.StepRequest(same_sessions=True, x=tensor))
            await start.wait()
            while not stop.is_set():
                t0 = time.perf_counter()
                await call.write(request)
                response = await call.read()
                latencies.append(time.perf_counter() - t0)
                assert response.WhichOneof("kind") == "step", response
                assert not response.step.errors, response.step.errors
                steps += rows * load.k
            running -= 1
            if not running:
                stopped.set()
            await clocked.wait()
            if not ids and not server.echo:  # rounds must not pile up sessions
                await call.write(pb.StreamRequest(close=pb.CloseSessionRequest()))
                await call.read()
            await call.done_writing()

        tasks = [asyncio.create_task(one(i, ids)) for i, ids in enumerate(id_sets)]
        await asyncio.sleep(0.5)  # every stream open before the clock starts
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        start.set()
        await asyncio.sleep(seconds)
        stop.set()
        await stopped.wait()
        cpu, wall = server.cpu_seconds() - cpu0, time.perf_counter() - t0
        clocked.set()
        await asyncio.gather(*tasks)
    finally:
        for channel in channels:
            await channel.close()
    if load.sessions_per_message:
        for ids in id_sets:
            server.close_sessions(ids)
    ms = np.asarray(latencies) * 1e3
    return {
        "steps_per_s": steps / wall,
        "messages_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "server_cpu_us_per_step": cpu / steps * 1e6,
    }


def measure(
    server: ServerProcess, load: Load, seconds: float, connections: int = 1
) -> dict[str, float]:
    asyncio.run(drive(server, load, 0.2, connections))  # warm-up: connections, runs, buffers
    return asyncio.run(drive(server, load, seconds, connections))


def ort_ceiling(batch: int, seconds: float) -> float:
    """Steps/s of bare OrtRunner.run on batch rows, one timestep, in this process."""
    directory = ROOT / "exported" / "echo" / "1"
    runner = OrtRunner(read_spec(directory), directory, "cpu", 1)
    x = np.ones((batch, 1, 1), np.float32)
    states = [np.zeros((batch, s.size), np.float32) for s in runner.spec.states]
    runs, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        runner.run(x, states)
        runs += 1
    return runs * batch / seconds


def save(name: str, **results: object) -> None:
    """bench/results/<name>.json, with the machine the figures were measured on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine(), **results}, indent=2))


def machine() -> str:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


PLAN = {
    # server label: (flags, echo, loads)
    "bare echo": ((), True, "base+multiplexed"),
    "echo + one ORT run": (("--model", "bound"), True, "base+multiplexed"),  # one run each
    "echo + one ORT session.run": (("--model", "run"), True, "base"),
    "rnnserve": ((), False, "all"),
    "rnnserve, batch size 1": (("--max-batch-size", "1"), False, "base+multiplexed"),
}
FLOOR, MODEL_FLOOR = "bare echo", "echo + one ORT run"


def loads(which: str, counts: list[int]) -> list[Load]:
    base = [Load(n) for n in counts]
    multiplexed = [Load(1, 1, 1000), Load(1, 1, 1000, ids_every_message=True), Load(2, 1, 500)]
    extra = [Load(n, k) for n in (1, 64) for k in (8, 64)] + multiplexed
    if which == "all":
        return base + extra
    return base if which == "base" else base + multiplexed


def key(row: dict) -> tuple[int, int, int, bool]:
    return row["streams"], row["k"], row["sessions_per_message"], row["ids_every_message"]


def table(rows: list[dict], ceiling: dict[int, float]) -> str:
    floors = {
        label: {key(r): r["server_cpu_us_per_step"] for r in rows if r["server"] == label}
        for label in (FLOOR, MODEL_FLOOR)
    }
    lines = [
        "| server | streams | k | sessions/msg | steps/s | p50 ms/msg | p99 ms/msg "
        "| server CPU µs/step | CPU vs bare echo | CPU vs echo + ORT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratios = [
            f"{r['server_cpu_us_per_step'] / floor[key(r)]:.2f}x" if key(r) in floor else ""
            for floor in floors.values()
        ]
        ids = ", ids in each" if r["ids_every_message"] else ""
        lines.append(
            f"| {r['server']} | {r['streams']} | {r['k']} | "
            f"{r['sessions_per_message'] or 1}{ids} | {r['steps_per_s']:,.0f} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
            f"{r['server_cpu_us_per_step']:.1f} | {' | '.join(ratios)} |"
        )
    lines.append("")
    lines.append(
        "In-process ONNX Runtime ceiling (echo, one timestep, steps/s): "
        + ", ".join(f"batch {n}: {v:,.0f}" for n, v in ceiling.items())
    )
    return "\n".join(lines)


def medians(label: str, load: Load, runs: list[dict[str, float]]) -> dict:
    """Each figure's median over the rounds: this machine's neighbours come and go."""
    return {
        "server": label,
        "streams": load.streams,
        "k": load.k,
        "sessions_per_message": load.sessions_per_message,
        "ids_every_message": load.ids_every_message,
        "rounds": len(runs),
        **{name: float(np.median([r[name] for r in runs])) for name in runs[0]},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=2.0, help="per configuration and round")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="every server and load is measured once per round, servers interleaved",
    )
    p.add_argument("--streams", default="1,8,64,256")
    args = p.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    servers = {label: ServerProcess(*flags, echo=echo) for label, (flags, echo, _) in PLAN.items()}
    runs: dict[tuple[str, Load], list[dict[str, float]]] = {}
    try:
        for round_ in range(args.rounds):
            for label, server in servers.items():
                for load in loads(PLAN[label][2], counts):
                    result = measure(server, load, args.seconds)
                    runs.setdefault((label, load), []).append(result)
                    print(
                        json.dumps({"round": round_, "server": label, **vars(load), **result}),
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    rows = [medians(label, load, results) for (label, load), results in runs.items()]
    ceiling = {n: ort_ceiling(n, 1.0) for n in sorted({*counts, 1000})}
    print(f"\necho streaming on {machine()}, medians of {args.rounds} rounds\n")
    print(table(rows, ceiling))
    by = {(r["server"], *key(r)): r for r in rows}
    print()
    for n in counts:
        ratio = (
            by[("rnnserve", n, 1, 0, False)]["steps_per_s"]
            / by[("rnnserve, batch size 1", n, 1, 0, False)]["steps_per_s"]
        )
        print(f"{n} streams: batching / batch size 1 = {ratio:.2f}x steps/s")
    save("streaming", rows=rows, ort_ceiling=ceiling)
    return 0


if __name__ == "__main__":
    sys.exit(main())
