"""What OpenTelemetry tracing costs per message: the server's CPU (servicer and engine, in
process, no transport) per lone stream step and per v2 sequence step with tracing off, on with
every trace sampled, and on with none sampled (--trace-ratio 0), in interleaved rounds
(medians).

    python -m bench.tracing [--messages 3000] [--rounds 5]

On, spans go through the batch span processor, as with --otlp-endpoint, to an exporter that
drops them: span creation, attributes and the processor's queue are counted; the export's
serialization and network (in the processor's own thread) are not. CPU time is the process's
(all threads).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from bench.instructions import _rnnserve
from rnnserve.ops.tracing import Tracing


class Dropping(SpanExporter):
    def export(self, spans):  # noqa: ANN001, ANN201
        return SpanExportResult.SUCCESS


def tracing(mode: str) -> Tracing | None:
    if mode == "off":
        return None
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(1.0 if mode == "sampled" else 0.0))
    )
    provider.add_span_processor(BatchSpanProcessor(Dropping()))
    return Tracing(provider)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    modes = ("off", "sampled", "unsampled")
    cpu: dict[tuple[str, str], list[float]] = {}
    for load in ("lone", "v2"):
        runs = {mode: await _rnnserve(load, tracing(mode)) for mode in modes}
        for run in runs.values():
            await run(300)  # warm
        for _ in range(args.rounds):
            for mode, run in runs.items():
                started = time.process_time()
                await run(args.messages)
                cpu.setdefault((load, mode), []).append(
                    (time.process_time() - started) / args.messages
                )
    print(f"server CPU per message, median of {args.rounds} interleaved rounds")
    print("| load | tracing | µs per message | vs off |")
    print("|---|---|---:|---:|")
    for load in ("lone", "v2"):
        off = statistics.median(cpu[(load, "off")])
        for mode in modes:
            median = statistics.median(cpu[(load, mode)])
            print(f"| {load} | {mode} | {median * 1e6:.1f} | {median / off:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
