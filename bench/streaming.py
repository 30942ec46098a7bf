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
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from service.contract import read_spec
from service.generated.rnnserve.v1 import rnnserve_pb2 as pb
from service.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from service.runner import Runner

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


class ServerProcess:
    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "serve", "--grpc-port", str(self.port),
             "--metrics-port", "-1", "--models", "echo", "--log-level", "warning", *flags],
            cwd=ROOT)
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(channel).result(timeout=60)
        channel.close()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def drive(port: int, streams: int, seconds: float) -> tuple[int, list[float]]:
    """`streams` ping-pong streams, one echo session each, one timestep per message."""
    latencies: list[float] = []
    steps = 0
    x = pb.Tensor(shape=[1, 1, 1], data=np.ones(1, "<f4").tobytes())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = rpc.InferenceStub(channel)

        async def one() -> None:
            nonlocal steps
            call = stub.Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSessionRequest(model="echo")))
            await call.read()
            request = pb.StreamRequest(steps=pb.Steps(x=x))
            await start.wait()
            while not stop.is_set():
                t0 = time.perf_counter()
                await call.write(request)
                response = await call.read()
                latencies.append(time.perf_counter() - t0)
                assert response.WhichOneof("kind") == "results", response
                steps += 1
            await call.done_writing()

        start, stop = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(one()) for _ in range(streams)]
        await asyncio.sleep(0.5)  # every stream open before the clock starts
        start.set()
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
    return steps, latencies


def measure(server: ServerProcess, streams: int, seconds: float) -> dict[str, float]:
    cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
    steps, latencies = asyncio.run(drive(server.port, streams, seconds))
    cpu, wall = cpu_seconds(server.proc.pid) - cpu0, time.perf_counter() - t0 - 0.5
    ms = np.asarray(latencies) * 1e3
    return {"steps_per_s": steps / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "server_cpu_us_per_step": cpu / steps * 1e6}


def ort_ceiling(batch: int, seconds: float) -> float:
    """Steps/s of bare Runner.run on batch rows, one timestep, in this process."""
    directory = ROOT / "exported" / "echo" / "1"
    runner = Runner(read_spec(directory), directory, "cpu", 1)
    x = np.ones((batch, 1, 1), np.float32)
    states = [np.zeros((batch, s.size), np.float32) for s in runner.spec.states]
    runs, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        runner.run(x, states)
        runs += 1
    return runs * batch / seconds


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=3.0, help="per configuration")
    p.add_argument("--streams", default="1,8,64,256")
    args = p.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    rows = []
    for label, flags in (("batching", ()), ("batch size 1", ("--max-batch-size", "1"))):
        server = ServerProcess(*flags)
        try:
            for n in counts:
                rows.append({"config": label, "streams": n, **measure(server, n, args.seconds)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    ceiling = {n: ort_ceiling(n, 1.0) for n in counts}
    print(f"\necho streaming on {machine()}\n")
    print("| streams | config | steps/s | p50 ms | p99 ms | server CPU µs/step | "
          "ORT ceiling steps/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["streams"], r["config"])):
        print(f"| {r['streams']} | {r['config']} | {r['steps_per_s']:,.0f} | {r['p50_ms']:.2f} | "
              f"{r['p99_ms']:.2f} | {r['server_cpu_us_per_step']:.0f} | "
              f"{ceiling[r['streams']]:,.0f} |")
    by = {(r["config"], r["streams"]): r for r in rows}
    print()
    for n in counts:
        ratio = by[("batching", n)]["steps_per_s"] / by[("batch size 1", n)]["steps_per_s"]
        print(f"{n} streams: batching / batch size 1 = {ratio:.2f}x steps/s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "streaming.json").write_text(json.dumps(
        {"machine": machine(), "rows": rows, "ort_ceiling": ceiling}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
