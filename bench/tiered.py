"""Sessions far beyond memory: N sessions through a table of --hot (`--max-sessions`) with
`--session-ttl` and a state store, each stepped three times: at its open (in memory), then
after every other session had its turn (cold: spilled to the store, brought back by this
call), then at once again (hot). The cold and hot calls alternate, so both are timed side by
side under the same conditions; every output is checked against one whole-sequence Predict.

    python -m bench.tiered [--sessions 100000] [--hot 1000] [--store sqlite|redis]

Prints the cold and hot call latencies (p50, p99) and their ratio, the spills, and the store's
size; saves bench/results/tiered.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.cluster import Redis, ServerProcess
from bench.streaming import machine, save
from rnnserve.client import Client

MODEL = "binary_add"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--hot", type=int, default=1000)
    parser.add_argument("--store", choices=("sqlite", "redis"), default="sqlite")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (args.sessions, 3, 2)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis() if args.store == "redis" else None
        url = redis.url if redis else f"sqlite://{Path(tmp) / 'sessions.db'}"
        server = ServerProcess(
            Path(tmp) / "log",
            "--state-store", url,
            "--session-ttl", "86400",
            "--max-sessions", str(args.hot),
            metrics=True,
        )  # fmt: skip
        try:
            with Client(server.address) as client:
                expected = np.concatenate(
                    [
                        client.predict(MODEL, x[i : i + 10_000]).y
                        for i in range(0, args.sessions, 10_000)
                    ]
                )
                ids, got = [], np.empty_like(expected)
                started = time.perf_counter()
                for row in range(args.sessions):
                    session = client.open_session(MODEL).session_id
                    ids.append(session)
                    got[row, 0] = client.step(session, x[row, 0])[0]
                opened = time.perf_counter() - started
                cold, hot = [], []
                order = rng.permutation(args.sessions)
                for row in order:  # each comes back from the store, then steps again at once
                    t0 = time.perf_counter()
                    got[row, 1] = client.step(ids[row], x[row, 1])[0]
                    t1 = time.perf_counter()
                    got[row, 2] = client.step(ids[row], x[row, 2])[0]
                    t2 = time.perf_counter()
                    cold.append(t1 - t0)
                    hot.append(t2 - t1)
            worst = float(np.max(np.abs(got - expected)))
            spilled = server.metric("rnnserve_session_handoffs_total", direction="spilled")
            adopted = server.metric("rnnserve_session_handoffs_total", direction="adopted")
            in_memory = server.metric("rnnserve_sessions")
        finally:
            server.stop()
            if redis:
                redis.stop()
        size = sum(p.stat().st_size for p in Path(tmp).glob("sessions.db*"))
    result = {
        "sessions": args.sessions,
        "hot_tier": args.hot,
        "store": args.store,
        "worst_difference_vs_predict": worst,
        "opens_per_second": args.sessions / opened,
        "cold_ms": {"p50": 1e3 * percentile(cold, 0.5), "p99": 1e3 * percentile(cold, 0.99)},
        "hot_ms": {"p50": 1e3 * percentile(hot, 0.5), "p99": 1e3 * percentile(hot, 0.99)},
        "cold_over_hot_median": statistics.median(cold) / statistics.median(hot),
        "spilled": spilled,
        "adopted": adopted,
        "in_memory_at_end": in_memory,
        "store_bytes": size,
    }
    print(f"{machine()}; {args.sessions:,} sessions, {args.hot:,} in memory, {args.store} store")
    print(f"  every output equals Predict within {worst:.1e}")
    print(f"  opens: {result['opens_per_second']:,.0f}/s (each with its first step)")
    for name in ("cold", "hot"):
        ms = result[f"{name}_ms"]
        print(f"  {name} step: p50 {ms['p50']:.3f} ms, p99 {ms['p99']:.3f} ms")
    print(f"  cold / hot (medians): {result['cold_over_hot_median']:.2f}x")
    print(
        f"  spilled {spilled:,.0f}, adopted {adopted:,.0f}, in memory at the end {in_memory:,.0f}"
    )
    if args.store == "sqlite":
        print(f"  store file: {size / 2**20:.1f} MiB")
    save("tiered", **result)


if __name__ == "__main__":
    main()
