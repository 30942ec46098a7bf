"""The KServe v2 doors' per-call cost: tritonclient's unary `infer` with a sequence_id, one call
in flight per client, against the bare v2 echo and the echo plus one model run
(bench/echo_server.py), side by side in interleaved rounds (medians); the same calls over the
HTTP/REST door (tritonclient.http, binary tensors) in a server of their own.

    python -m bench.v2_unary [--clients 1 8] [--rounds 3] [--seconds 2]

Server CPU per call is read from each server's /proc counters over the clocked window.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

from bench.cluster import free_port
from bench.streaming import ServerProcess, machine, save

HTTP_PORT = free_port()
SERVERS = {
    "bare v2 echo": ((), True),
    "v2 echo + one ORT run": (("--model", "bound"), True),
    "rnnserve": ((), False),
    "rnnserve, HTTP": (("--http-port", str(HTTP_PORT)), False),
}


def drive(server: ServerProcess, clients: int, seconds: float, http: bool) -> dict[str, float]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module = httpclient if http else grpcclient
    calls, stop, ready = [0] * clients, threading.Event(), threading.Barrier(clients + 1)

    def one(index: int) -> None:
        client = module.InferenceServerClient(f"127.0.0.1:{HTTP_PORT if http else server.port}")
        x = module.InferInput("x", [1, 1, 1], "FP32")
        x.set_data_from_numpy(np.ones((1, 1, 1), np.float32))
        sequence = 1000 + index
        client.infer("echo", [x], sequence_id=sequence, sequence_start=True)
        ready.wait()
        while not stop.is_set():
            client.infer("echo", [x], sequence_id=sequence)
            calls[index] += 1
        client.infer("echo", [x], sequence_id=sequence, sequence_end=True)
        client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()
    cpu0, t0, n0 = server.cpu_seconds(), time.perf_counter(), sum(calls)
    time.sleep(seconds)
    cpu, wall, n = server.cpu_seconds() - cpu0, time.perf_counter() - t0, sum(calls) - n0
    stop.set()
    for thread in threads:
        thread.join()
    return {"calls_per_s": n / wall, "server_cpu_us_per_call": cpu / n * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    servers = {label: ServerProcess(*flags, echo=echo) for label, (flags, echo) in SERVERS.items()}
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for _ in range(args.rounds):
            for clients in args.clients:
                for label, server in servers.items():
                    runs.setdefault((label, clients), []).append(
                        drive(server, clients, args.seconds, http=label.endswith("HTTP"))
                    )
    finally:
        for server in servers.values():
            server.stop()
    rows = {
        key: {k: statistics.median(r[k] for r in results) for k in results[0]}
        for key, results in runs.items()
    }
    print(f"\n{machine()}; medians of {args.rounds} rounds of {args.seconds:g} s\n")
    print("| server | clients | calls/s | server CPU µs/call | vs bare echo | vs echo + run |")
    print("|---|---:|---:|---:|---:|---:|")
    for (label, clients), row in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        bare = rows[("bare v2 echo", clients)]["server_cpu_us_per_call"]
        floor = rows[("v2 echo + one ORT run", clients)]["server_cpu_us_per_call"]
        cost = row["server_cpu_us_per_call"]
        print(
            f"| {label} | {clients} | {row['calls_per_s']:,.0f} | {cost:.0f} | "
            f"{cost / bare:.2f}x | {cost / floor:.2f}x |"
        )
    save("v2_unary", rows=[{"server": k[0], "clients": k[1], **v} for k, v in rows.items()])


if __name__ == "__main__":
    main()
