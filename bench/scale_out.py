"""Scale-out figures: echo steps/s through nginx with 1 and 2 replicas, and how long sessions
are unavailable while a drained replica hands them to the other (all on this machine)."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.cluster import Nginx, Redis, Replica, cpu_seconds
from bench.streaming import Load, drive, machine, save
from rnnserve.client import Client, RnnServeError

STREAMS, SECONDS = 64, 3.0
HANDOFF_SESSIONS, PACE = 100, 0.01


class Cluster:
    def __init__(self, replicas: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rnnserve-cluster-"))
        self.redis = Redis()
        self.replicas = [
            Replica(self.redis.url, self.dir / f"replica{i}.log") for i in range(replicas)
        ]
        self.nginx = Nginx(self.dir, self.replicas)
        self.port, self.echo = self.nginx.port, False  # what bench.streaming.drive needs

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(replica.proc.pid) for replica in self.replicas)

    def stop(self) -> None:
        self.nginx.stop()
        for replica in self.replicas:
            replica.kill()
        self.redis.stop()


def throughput(replicas: int) -> dict[str, float]:
    cluster = Cluster(replicas)
    try:
        result = asyncio.run(drive(cluster, Load(STREAMS), SECONDS))
    finally:
        cluster.stop()
    return {
        "replicas": replicas,
        **{name: result[name] for name in ("steps_per_s", "p50_ms", "p99_ms")},
    }


def paced_session(address: str, stop: threading.Event) -> float | None:
    """Step every PACE s; return how long the session was unavailable, if it ever was."""
    with Client(address, timeout=30) as client:
        stream = client.stream("echo")
        session_id, steps, gap = stream.session.session_id, 0, None
        while not stop.is_set():
            try:
                stream.step([1.0])
                steps += 1
                time.sleep(PACE)
            except RnnServeError:
                failed = time.monotonic()
                stream.cancel()
                while True:
                    try:
                        stream = client.stream(resume=session_id)
                        break
                    except RnnServeError:
                        time.sleep(0.01)
                stream.step([1.0])
                gap = time.monotonic() - failed
        stream.close()
        stream.end()
    return gap


def handoff_gaps() -> dict[str, float]:
    cluster = Cluster(2)
    stop = threading.Event()
    try:
        with ThreadPoolExecutor(HANDOFF_SESSIONS) as pool:
            futures = [
                pool.submit(paced_session, cluster.nginx.address, stop)
                for _ in range(HANDOFF_SESSIONS)
            ]
            time.sleep(1.0)
            cluster.replicas[0].proc.send_signal(signal.SIGTERM)
            time.sleep(3.0)
            stop.set()
            gaps = [g for g in (f.result(60) for f in futures) if g is not None]
    finally:
        cluster.stop()
    ms = np.asarray(gaps) * 1e3
    return {
        "sessions": HANDOFF_SESSIONS,
        "handed_off": len(gaps),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> int:
    rows = [throughput(n) for n in (1, 2)]
    gaps = handoff_gaps()
    print(f"\nthrough nginx on {machine()}: {STREAMS} echo streams, one step per message\n")
    print("| replicas | steps/s | p50 ms | p99 ms |\n|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['steps_per_s']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
        )
    print(
        f"\nhandoff: {gaps['handed_off']} of {gaps['sessions']} sessions moved; unavailable "
        f"p50 {gaps['p50_ms']:.0f} ms, p99 {gaps['p99_ms']:.0f} ms"
    )
    save("scale_out", throughput=rows, handoff=gaps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
