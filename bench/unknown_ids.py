"""`python -m bench.unknown_ids`: what a Step message naming ids the server does not hold costs,
beside one naming as many of its live sessions (2 workers and a real redis-server: an unknown id
is asked of the sibling and of the store before it is NOT_FOUND). Medians of interleaved rounds
of the server's CPU (every process) per id, and their ratio; then what such messages, sent back
to back by one client, do to another client's stream steps (p50 and p99, quiet and flooded, in
interleaved rounds). Results: the README's section on the shared store.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.cluster import Redis, ServerProcess
from rnnserve.client import Client

CALLS_IDS = 65_536
"""Ids per measurement, over as many messages as it takes: CPU time comes in 10 ms ticks."""


def cpu_per_id(server: ServerProcess, client: Client, ids: list[str] | None, n: int) -> float:
    """Server CPU µs per id over messages of `n` ids: `ids`, or new random ones each time."""
    x = np.zeros((n, 1, 1), np.float32)
    calls = max(1, CALLS_IDS // n)
    messages = [ids or [secrets.token_hex(16) for _ in range(n)] for _ in range(calls)]
    before = server.cpu_seconds()
    for message in messages:
        client.step_many(message, x)
    return (server.cpu_seconds() - before) / (n * calls) * 1e6


def stream_latencies(address: str, seconds: float) -> list[float]:
    """ms per step of one stream's session, stepped back to back for `seconds`."""
    times = []
    with Client(address, timeout=120) as client, client.stream("echo") as stream:
        stream.step([1.0])
        end = time.perf_counter() + seconds
        while (start := time.perf_counter()) < end:
            stream.step([1.0])
            times.append((time.perf_counter() - start) * 1e3)
    return times


def flood(address: str, n: int, until: threading.Event) -> None:
    """Messages of `n` new unknown ids, back to back, until told to stop."""
    x = np.zeros((n, 1, 1), np.float32)
    with Client(address, timeout=120) as client:
        while not until.is_set():
            client.step_many([secrets.token_hex(16) for _ in range(n)], x)


def others(address: str, n: int, rounds: int, seconds: float = 2.0) -> None:
    """Another client's stream steps, quiet and while one client floods: medians over rounds."""
    quiet, flooded = [], []
    for _ in range(rounds):
        quiet.append(stream_latencies(address, seconds))
        stop = threading.Event()
        flooder = threading.Thread(target=flood, args=(address, n, stop))
        flooder.start()
        time.sleep(0.2)
        flooded.append(stream_latencies(address, seconds))
        stop.set()
        flooder.join()

    def at(runs: list[list[float]], q: float) -> float:
        return statistics.median(float(np.quantile(r, q)) for r in runs)

    print(
        f"another stream, {n:,} unknown ids per flooding message: "
        f"quiet p50 {at(quiet, 0.5):.2f} ms p99 {at(quiet, 0.99):.2f} ms; "
        f"flooded p50 {at(flooded, 0.5):.2f} ms p99 {at(flooded, 0.99):.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", default="2")
    parser.add_argument(
        "--flood-ids",
        type=int,
        default=10_000,
        help="ids per message while another client's steps are timed",
    )
    args = parser.parse_args()
    redis = Redis()
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = ServerProcess(
        log,
        "--workers",
        args.workers,
        "--state-store",
        redis.url,
        "--max-sessions",
        str(2 * max(args.ids)),
    )
    try:
        with Client(server.address, timeout=120) as client:
            print(f"{'ids':>7} {'unknown µs/id':>14} {'live µs/id':>11} {'ratio':>6}")
            for n in args.ids:
                live = [client.open_session("echo").session_id for _ in range(n)]
                unknown, known = [], []
                for _ in range(args.rounds):
                    unknown.append(cpu_per_id(server, client, None, n))
                    known.append(cpu_per_id(server, client, live, n))
                u, k = statistics.median(unknown), statistics.median(known)
                print(f"{n:>7} {u:>14.1f} {k:>11.1f} {u / k:>6.1f}")
                for session in live:
                    client.close_session(session)
        others(server.address, args.flood_ids, args.rounds)
    finally:
        server.stop()
        redis.stop()


if __name__ == "__main__":
    main()
