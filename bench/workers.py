"""`make bench-workers`: what --workers N buys, measured side by side in one run.

For N = 1, 2, 4, … (up to the CPUs this process may use) one server each, all started first;
then in interleaved rounds every server gets every load, and each figure is the median of its
rounds (machines are noisy). Loads, on the echo model:
- 64 and 256 streams of one timestep per message, spread over 2 connections per worker (the
  kernel picks a worker per connection, not per call);
- multiplexed: 2 streams per worker, each message stepping 250 sessions.
Reported: steps/s, its ratio to N x one worker's (the target is >= 0.8 up to 16 workers on a
16-core machine), p50/p99 per message and server CPU per step (every process of the server).

    python -m bench.workers [--rounds 3] [--seconds 1.5] [--max-workers 16] [--generators 8]

The load comes from --generators processes (default: half the CPUs, up to 8), each driving
its share of the streams: one asyncio process saturates its core at ~17k round trips/s (16
cores, H100 host), far below what 16 workers serve. They run on the same machine: on a small
one they take cores from the workers, so read the scaling there as a floor. A session moving
between workers is timed too: a new connection's first step for a session another worker
holds, against a step that stays.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.synchronize import Barrier
from pathlib import Path

import numpy as np

from bench.cluster import ServerProcess, cpu_seconds
from bench.streaming import Load, drive, measure, save
from rnnserve.client import Client
from rnnserve.ops.cpus import available_cpus


class Sessions:
    """The sessions bench.streaming.drive opens for multiplexed loads, through our client."""

    address: str
    echo = False

    def session_ids(self, count: int, model: str = "echo") -> list[str]:
        with Client(self.address) as client:
            return [client.open_session(model).session_id for _ in range(count)]

    def close_sessions(self, ids: list[str]) -> None:
        with Client(self.address) as client:
            for session_id in ids:
                client.close_session(session_id)


class Server(Sessions, ServerProcess):
    """rnnserve with N workers, serving only echo, as bench.streaming.drive drives it; its
    /metrics tell which steps moved a session."""

    def __init__(self, workers: int, log: Path) -> None:
        super().__init__(
            log,
            "--workers",
            str(workers),
            "--models",
            "echo",
            "--log-level",
            "warning",
            metrics=True,
        )
        self.workers = workers


@dataclass(frozen=True)
class Remote(Sessions):
    """What bench.streaming.drive needs of a server, picklable for a load-generator process:
    its port and processes (for server CPU)."""

    port: int
    pids: tuple[int, ...]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)


def _generate(
    remote: Remote, load: Load, seconds: float, connections: int, start: Barrier
) -> dict[str, float]:
    """One load-generator process: its share of the streams, clocked with the others."""
    asyncio.run(drive(remote, load, 0.2, connections))  # warm-up
    start.wait()
    return asyncio.run(drive(remote, load, seconds, connections))


def measure_spread(
    server: Server, load: Load, seconds: float, connections: int, generators: int
) -> dict[str, float]:
    """`load` from `generators` processes at once (one asyncio process saturates its core at
    ~17k round trips/s, well below 16 workers). Steps/s add up; each process saw the whole
    server's CPU over the same clocked window, so CPU per step is their median rate over the
    total; latencies are the medians of the processes' percentiles."""
    used = min(generators, load.streams)
    if used == 1:
        return measure(server, load, seconds, connections)
    share = replace(load, streams=load.streams // used)
    remote = Remote(server.port, tuple(server.pids()))
    context = multiprocessing.get_context("spawn")  # no gRPC state crosses a fork
    with context.Manager() as manager, context.Pool(used) as pool:
        start = manager.Barrier(used)
        parts = pool.starmap(
            _generate, [(remote, share, seconds, max(1, connections // used), start)] * used
        )
    steps = sum(p["steps_per_s"] for p in parts)
    cpu_rate = statistics.median(p["server_cpu_us_per_step"] * p["steps_per_s"] for p in parts)
    return {
        "steps_per_s": steps,
        "p50_ms": statistics.median(p["p50_ms"] for p in parts),
        "p99_ms": statistics.median(p["p99_ms"] for p in parts),
        "server_cpu_us_per_step": cpu_rate / steps,
    }


def loads(workers: int) -> list[tuple[str, Load, int]]:
    """(label, load, connections)."""
    connections = 2 * workers
    return [
        ("64 streams", Load(64), connections),
        ("256 streams", Load(256), connections),
        ("multiplexed 250/msg", Load(2 * workers, sessions_per_message=250), connections),
    ]


def move_latency(server: Server, samples: int = 200) -> dict[str, float]:
    """ms for a step that moves its session here from another worker (a new connection that
    lands elsewhere), and for steps on the same connection, which stay."""
    moved, stayed = [], []
    with Client(server.address) as client:
        session = client.open_session("echo").session_id
    while len(moved) < samples:
        before = server.metric("rnnserve_session_handoffs_total")
        with Client(server.address) as client:
            start = time.perf_counter()
            client.step(session, [1.0])
            first = time.perf_counter() - start
            start = time.perf_counter()
            client.step(session, [0.0])
            stayed.append(time.perf_counter() - start)
        if server.metric("rnnserve_session_handoffs_total") > before:
            moved.append(first)
    ms = {name: np.asarray(values) * 1e3 for name, values in (("moved", moved), ("stayed", stayed))}
    return {
        f"{name}_{q}_ms": float(np.percentile(v, int(q[1:])))
        for name, v in ms.items()
        for q in ("p50", "p99")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--max-workers", type=int, default=16)
    cpus = available_cpus()
    parser.add_argument(
        "--generators",
        type=int,
        default=max(1, min(8, cpus // 2)),
        help="load-generator processes (default: half the CPUs, up to 8)",
    )
    args = parser.parse_args()
    counts = [n for n in (1, 2, 4, 8, 16) if n <= min(cpus, args.max_workers)]
    logs = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    servers: dict[int, Server] = {}
    runs: dict[tuple[int, str], list[dict[str, float]]] = {}
    try:
        for n in counts:
            servers[n] = Server(n, logs / f"workers{n}.log")
        for round_ in range(args.rounds):
            for n, server in servers.items():
                for label, load, connections in loads(n):
                    runs.setdefault((n, label), []).append(
                        measure_spread(server, load, args.seconds, connections, args.generators)
                    )
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
        moves = move_latency(servers[max(counts)]) if max(counts) > 1 else {}
    finally:
        for server in servers.values():
            server.stop()
    table = []
    for (n, label), results in runs.items():
        row = {key: statistics.median(r[key] for r in results) for key in results[0]}
        table.append({"workers": n, "load": label, **row})
    one = {row["load"]: row["steps_per_s"] for row in table if row["workers"] == 1}
    print(
        f"\n{len(counts)} servers, {cpus} CPUs usable; medians of {args.rounds} rounds, "
        f"{args.seconds:g} s each; {args.generators} load-generator process(es) on the same "
        "machine\n"
    )
    print(
        "| workers | load | steps/s | vs N x 1 worker | p50 ms/msg | p99 ms/msg | "
        "server CPU µs/step |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in sorted(table, key=lambda r: (r["load"], r["workers"])):
        scaling = row["steps_per_s"] / (row["workers"] * one[row["load"]])
        print(
            f"| {row['workers']} | {row['load']} | {row['steps_per_s']:,.0f} | "
            f"{scaling:.2f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['server_cpu_us_per_step']:.1f} |"
        )
    if moves:
        print(
            f"\nsession move between workers ({max(counts)} workers): first step after a "
            f"move p50 {moves['moved_p50_ms']:.2f} ms, p99 {moves['moved_p99_ms']:.2f} ms; "
            f"a step that stays p50 {moves['stayed_p50_ms']:.2f} ms, "
            f"p99 {moves['stayed_p99_ms']:.2f} ms"
        )
    save("workers", table=table, moves=moves, rounds=args.rounds, seconds=args.seconds)


if __name__ == "__main__":
    main()
