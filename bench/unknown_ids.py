"""`python -m bench.unknown_ids`: what a Step message naming ids the server does not hold costs,
beside one naming as many of its live sessions (2 workers and a real redis-server: an unknown id
is asked of the sibling and of the store before it is NOT_FOUND). Medians of interleaved rounds
of the server's CPU (every process) per id, and their ratio.

Measured (2 cores, AMD EPYC): 65,536 unknown ids took 1.51 s of server CPU with one GETDEL per
id in a pipeline, 0.73 s with one script call for all of them.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import tempfile
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, nargs="+", default=[1024, 8192])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    redis = Redis()
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = ServerProcess(log, "--workers", "2", "--state-store", redis.url,
                           "--max-sessions", str(2 * max(args.ids)))
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
    finally:
        server.stop()
        redis.stop()


if __name__ == "__main__":
    main()
