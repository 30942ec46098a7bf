"""`make bench-gpu`: the CPU provider, CUDA with host state and CUDA with device-resident state,
checked for parity and then measured side by side in one run on this machine.

Parity, over the wire, for every shipped model: Predict of whole sequences and the same
sequences streamed one timestep per Step (all sessions in one message), on each server; every
server's outputs and final states within rtol = atol = 1e-5 of the CPU server's. The figures
are still measured after a failed check (GPU time is scarce), but the run exits 1.

Then, in interleaved rounds (medians; machines are noisy), on binary_add (2-layer LSTM, four
state tensors of 20): 1, 64 and 256 streams of one timestep per message; 1,000 and 10,000
sessions per message on one stream; and Predict of all 16,384 binary_add pairs in one call.
Reported: steps/s (sequences/s), p50/p99 per message and server CPU per step.

    python -m bench.gpu [--servers cpu,cuda-host,cuda-device] [--rounds 3] [--seconds 2]

Without a GPU, `--servers cpu,cpu-device` runs the device-state code path on the CPU provider.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench.cluster import ServerProcess
from bench.predict import LARGE_MESSAGES, all_pairs, request
from bench.streaming import Load, machine, measure, save
from rnnserve.client import Client
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2_grpc as rpc
from rnnserve.models.contract import read_spec

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("binary_add", "digits", "echo", "forecast")
MODEL = "binary_add"
TOLERANCE = 1e-5
SERVERS = {
    "cpu": ("CPU provider", ("--device", "cpu")),
    "cpu-device": (
        "CPU provider, state in ORT values",
        ("--device", "cpu", "--session-state", "device"),
    ),
    "cuda-host": ("CUDA, host state", ("--device", "cuda", "--session-state", "host")),
    "cuda-device": ("CUDA, device state", ("--device", "cuda", "--session-state", "device")),
}
LOADS = [
    Load(1, model=MODEL, features=2),
    Load(64, model=MODEL, features=2),
    Load(256, model=MODEL, features=2),
    Load(1, sessions_per_message=1_000, model=MODEL, features=2),
    Load(1, sessions_per_message=10_000, model=MODEL, features=2),
]


class Server(ServerProcess):
    """One rnnserve process serving every shipped model. Multiplexed loads reuse their sessions
    between rounds: opening 10,000 sessions would otherwise dwarf the measurement."""

    echo = False

    def __init__(self, flags: tuple[str, ...], log: Path) -> None:
        super().__init__(log, *flags, "--max-sessions", "40000", "--log-level", "warning")
        self._kept: dict[tuple[int, str], list[list[str]]] = {}

    def session_ids(self, count: int, model: str = MODEL) -> list[str]:
        kept = self._kept.setdefault((count, model), [])
        if kept:
            return kept.pop()
        ids: list[str] = []
        with grpc.insecure_channel(self.address) as channel:
            stub = rpc.InferenceStub(channel)
            for start in range(0, count, 64):  # the server allows 100 per connection
                calls = [
                    stub.OpenSession.future(pb.OpenSessionRequest(model=model))
                    for _ in range(min(64, count - start))
                ]
                ids += [call.result().session.session_id for call in calls]
        return ids

    def close_sessions(self, ids: list[str]) -> None:
        self._kept.setdefault((len(ids), MODEL), []).append(ids)


def parity(servers: dict[str, Server], reference: str) -> list[str]:
    """Every model, whole and streamed, on every server against the reference server: a line
    per comparison with its verdict and worst difference."""
    lines = []
    rng = np.random.default_rng(0)
    for model in MODELS:
        spec = read_spec(ROOT / "exported" / model / "1")
        x = rng.standard_normal((8, 24, spec.features)).astype(np.float32)
        if model == MODEL:
            x = (x > 0).astype(np.float32)  # bits, as it was trained on
        got = {label: _run(server, model, x) for label, server in servers.items()}
        for label, (whole, streamed, finals, states) in got.items():
            ref_whole, ref_streamed, ref_finals, ref_states = got[reference]
            pairs = {
                "whole": (whole, ref_whole),
                "streamed": (streamed, ref_whole),
                "final states": (finals, ref_finals),
                "session state": (states, ref_finals),
                "streamed vs own whole": (streamed, whole),
            }
            for what, (a, b) in pairs.items():
                worst = float(np.max(np.abs(a - b)))
                verdict = "ok" if np.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE) else "FAILED"
                lines.append(
                    f"{verdict:6s} {model:10s} {label:34s} {what:22s} max |diff| {worst:.2e}"
                )
    return lines


def _run(server: Server, model: str, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """y whole, y streamed, the whole run's final states and the sessions' state after
    streaming, concatenated."""
    with Client(server.address, timeout=60) as client:
        prediction = client.predict(model, x)
        ids = [client.open_session(model).session_id for _ in range(len(x))]
        streamed = np.concatenate(
            [client.step_many(ids, x[:, t : t + 1]).y for t in range(x.shape[1])], axis=1
        )
        snapshots = [client.snapshot(i) for i in ids]
        for session_id in ids:
            client.close_session(session_id)
    names = sorted(prediction.final_states)
    finals = np.concatenate([prediction.final_states[n] for n in names], axis=1)
    states = np.stack([np.concatenate([s[n].reshape(-1) for n in names]) for s in snapshots])
    return prediction.y, streamed, finals, states


def predict_seconds(server: Server, x: np.ndarray) -> float:
    message = request(x)
    with grpc.insecure_channel(server.address, LARGE_MESSAGES) as channel:
        predict = rpc.InferenceStub(channel).Predict
        predict(message)  # warm-up
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            predict(message)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_name() -> str:
    try:
        return (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
            or "no GPU"
        )
    except (OSError, subprocess.SubprocessError):
        return "no GPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="cpu,cuda-host,cuda-device")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    chosen = args.servers.split(",")
    logs = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    servers: dict[str, Server] = {}
    runs: dict[tuple[str, Load], list[dict[str, float]]] = {}
    predicts: dict[str, list[float]] = {}
    try:
        for key in chosen:
            label, flags = SERVERS[key]
            servers[label] = Server(flags, logs / f"{key}.log")
        checks = parity(servers, SERVERS[chosen[0]][0])
        print(
            "parity (rtol = atol = 1e-5 against the first server):", *checks, sep="\n  ", flush=True
        )
        pairs = all_pairs()
        for round_ in range(args.rounds):
            for label, server in servers.items():
                for load in LOADS:
                    runs.setdefault((label, load), []).append(measure(server, load, args.seconds))
                predicts.setdefault(label, []).append(len(pairs) / predict_seconds(server, pairs))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    table = [
        {
            "server": label,
            "streams": load.streams,
            "sessions_per_message": load.sessions_per_message or 1,
            **{k: statistics.median(r[k] for r in results) for k in results[0]},
        }
        for (label, load), results in runs.items()
    ]
    where = f"{machine()}, GPU: {gpu_name()}"
    print(f"\n{where}; {MODEL}, medians of {args.rounds} rounds of {args.seconds:g} s\n")
    print(
        "| server | streams | sessions/msg | steps/s | p50 ms/msg | p99 ms/msg | "
        "server CPU µs/step |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in sorted(table, key=lambda r: (r["streams"], r["sessions_per_message"])):
        print(
            f"| {row['server']} | {row['streams']} | {row['sessions_per_message']:,} | "
            f"{row['steps_per_s']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['server_cpu_us_per_step']:.2f} |"
        )
    print(
        f"\nPredict, all {len(pairs):,} {MODEL} pairs in one call (sequences/s): "
        + ", ".join(f"{label} {statistics.median(v):,.0f}" for label, v in predicts.items())
    )
    save(
        "gpu",
        machine=where,
        parity=checks,
        table=table,
        predict={label: statistics.median(v) for label, v in predicts.items()},
        rounds=args.rounds,
        seconds=args.seconds,
    )
    failed = [line for line in checks if line.startswith("FAILED")]
    print("\nparity: " + (f"{len(failed)} FAILED" if failed else f"all {len(checks)} ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
