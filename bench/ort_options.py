"""Each ONNX Runtime session choice in service/rnnserve/models/runner.py against its
alternative: one streamed step (time = 1) at batch 1 and 64, median µs per run, in this
process."""

from __future__ import annotations

import sys
import time

import numpy as np
import onnxruntime as ort

from bench.streaming import ROOT, machine, save
from rnnserve.models.contract import INPUT_NAME, MODEL_FILE, read_spec

MODELS = ("echo", "binary_add")
BATCHES = (1, 64)
RUNS = 2000


def options(
    intra: int = 1,
    parallel: bool = False,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.intra_op_num_threads = intra
    o.inter_op_num_threads = 1
    o.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    o.graph_optimization_level = level
    return o


CHOICES = {
    "rnnserve (1 thread, sequential, all optimizations)": (options(), False),
    "2 intra-op threads": (options(intra=2), False),
    "parallel execution mode": (options(parallel=True), False),
    "no graph optimizations": (options(level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL), False),
    "I/O binding, preallocated outputs": (options(), True),
}


def median_us(fn) -> float:
    for _ in range(200):
        fn()
    samples = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples) * 1e6)


def runner(session: ort.InferenceSession, feeds: dict, bind: bool):
    names = [o.name for o in session.get_outputs()]
    if not bind:
        return lambda: session.run(names, feeds)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    outputs = [
        ort.OrtValue.ortvalue_from_numpy(np.empty_like(value))
        for value in session.run(names, feeds)
    ]
    for name, value in zip(names, outputs):
        binding.bind_ortvalue_output(name, value)
    return lambda: session.run_with_iobinding(binding) or outputs  # outputs stay referenced


def main() -> int:
    rows = []
    for model in MODELS:
        directory = ROOT / "exported" / model / "1"
        spec = read_spec(directory)
        for batch in BATCHES:
            feeds = {
                INPUT_NAME: np.ones((batch, 1, spec.features), np.float32),
                **{s.input: np.zeros((batch, s.size), np.float32) for s in spec.states},
            }
            for label, (opts, bind) in CHOICES.items():
                session = ort.InferenceSession(
                    str(directory / MODEL_FILE), opts, providers=["CPUExecutionProvider"]
                )
                rows.append(
                    {
                        "model": model,
                        "batch": batch,
                        "choice": label,
                        "us_per_run": median_us(runner(session, feeds, bind)),
                    }
                )
    print(f"\nONNX Runtime {ort.__version__} session choices, one step, on {machine()}\n")
    print("| model | batch | choice | µs per run | vs rnnserve |\n|---|---:|---|---:|---:|")
    base = {
        (r["model"], r["batch"]): r["us_per_run"]
        for r in rows
        if r["choice"].startswith("rnnserve")
    }
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['choice']} | {r['us_per_run']:.1f} | "
            f"{r['us_per_run'] / base[(r['model'], r['batch'])]:.2f}x |"
        )
    save("ort_options", rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
