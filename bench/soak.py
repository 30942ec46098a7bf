"""`make bench-soak`: a bounded soak of one server process. Session churn (open, a few steps,
close), long-lived streams and large Predicts run side by side for --seconds; the server's RSS
is sampled throughout. A server that leaks grows round after round; a sound one levels off.

Prints RSS per round and the growth from the first to the last round; writes
bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.cluster import ServerProcess
from bench.streaming import save
from rnnserve.client import Client, RnnServeError


def churn(address: str, stop: threading.Event, counts: dict) -> None:
    with Client(address, timeout=30) as client:
        while not stop.is_set():
            session = client.open_session("binary_add").session_id
            client.step(session, np.ones((4, 2), np.float32))
            client.close_session(session)
            counts["churned"] += 1


def long_stream(address: str, stop: threading.Event, counts: dict) -> None:
    with Client(address, timeout=30) as client, client.stream("echo") as stream:
        while not stop.is_set():
            stream.step([1.0])
            counts["streamed"] += 1


def big_predicts(address: str, stop: threading.Event, counts: dict) -> None:
    x = np.ones((16384, 32, 1), np.float32)
    with Client(address, timeout=120) as client:
        while not stop.is_set():
            try:
                client.predict("forecast", x, last_only=True)
                counts["predicted"] += 1
            except RnnServeError as exc:  # budget busy: the documented answer
                counts[exc.code.name] = counts.get(exc.code.name, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    log = Path("/tmp/rnnserve-soak.log")
    server = ServerProcess(log, "--log-level", "warning")
    stop = threading.Event()
    counts = {"churned": 0, "streamed": 0, "predicted": 0}
    workers = [churn, churn, long_stream, long_stream, big_predicts]
    rss = []
    try:
        with ThreadPoolExecutor(len(workers)) as pool:
            for work in workers:
                pool.submit(work, server.address, stop, counts)
            for round_ in range(args.rounds):
                time.sleep(args.seconds / args.rounds)
                rss.append(server.status("VmRSS") // 2**20)
                print(f"round {round_ + 1}: RSS {rss[-1]} MiB, {counts}", flush=True)
            stop.set()
        peak = server.status("VmHWM") // 2**20
    finally:
        stop.set()
        server.stop()
    growth = rss[-1] - rss[0]
    print(f"RSS first→last round: {rss[0]} → {rss[-1]} MiB ({growth:+d}), peak {peak} MiB")
    save("soak", rss_mib=rss, peak_mib=peak, growth_mib=growth, counts=counts, seconds=args.seconds)


if __name__ == "__main__":
    main()
