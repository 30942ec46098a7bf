"""Instructions per message inside the server (servicer and engine, no gRPC transport), counted
by valgrind's callgrind: for this tree, beside the floor (bench/echo_server.py's servicers: the
same messages, one bound run each) and optionally another revision:

    python -m bench.instructions [--against REV] [--loads lone,multiplexed,v2]

Why: on the shared 2-core machine the server CPU per step moves by up to 2x between rounds
(README, Benchmarks), more than most changes to a message's path, so the over-the-wire benches
cannot tell a 10 % change from noise. An instruction count moved by 2-8 % between runs here
(the most at 1,000 rows per message), so a change of 10 % or more to the Python work of a
message is told apart in one run. It does not count the transport, nor what cold caches add
between messages: bench/streaming.py and bench/v2_unary.py measure those.

Each load runs N and 2N messages in a fresh process (PYTHONHASHSEED=0), and the difference is
divided by N, so start-up and model loading cancel out. Runs are rated short whatever their
measured time, as they are at full speed: under callgrind a run is ~50x slower and would
otherwise go to the thread pool. --against checks REV out into a temporary git worktree and
imports `rnnserve` from it, with this tree's generated protobuf code; the loads use the
engine's and servicers' own classes, so REV must be close enough to have the same ones.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOADS = {"lone": (1000, 1), "multiplexed": (300, 1000), "v2": (1000, 1)}
"""Each load's N and rows per message: a lone stream's step of its own session, a 1,000-session
step sent as `same_sessions` (the stream's memo in use), a v2 sequence step as tritonclient
sends it."""


def count(load: str, messages: int, pythonpath: str, floor: bool) -> int:
    """Instructions callgrind counts for one child process running `messages` messages."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            load,
            str(messages),
            *(["--floor"] if floor else []),
        ],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"Collected : (\d+)", done.stderr).group(1))


def per_message(load: str, pythonpath: str = "", floor: bool = False) -> float:
    n = LOADS[load][0]
    return (count(load, 2 * n, pythonpath, floor) - count(load, n, pythonpath, floor)) / n


def checkout(rev: str, into: Path) -> str:
    """REV in a worktree under `into`; the PYTHONPATH that imports `rnnserve` from it."""
    tree = into / "tree"
    added = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev],
        capture_output=True,
        text=True,
    )
    if added.returncode:
        raise SystemExit(
            f"--against {rev}: git could not check it out: {added.stderr.strip().splitlines()[-1]}"
        )
    generated = ROOT / "service" / "rnnserve" / "generated"
    if (tree / "service" / "rnnserve").is_dir():  # service/ is a source root
        shutil.copytree(generated, tree / "service" / "rnnserve" / "generated", dirs_exist_ok=True)
        return str(tree / "service")
    # before the src-layout, service/ itself was the package
    shutil.copytree(generated, tree / "service" / "generated", dirs_exist_ok=True)
    (into / "path").mkdir()
    (into / "path" / "rnnserve").symlink_to(tree / "service")
    return str(into / "path")


def _v2_request(start: bool) -> bytes:
    """A v2 sequence step as tritonclient's unary infer sends it."""
    import numpy as np

    from rnnserve.generated.inference import grpc_service_pb2 as v2

    message = v2.ModelInferRequest(model_name="echo", id="1")
    message.parameters["sequence_id"].int64_param = 1001
    message.parameters["sequence_start"].bool_param = start
    message.inputs.add(name="x", datatype="FP32", shape=[1, 1, 1])
    message.raw_input_contents.append(np.ones((1, 1, 1), "<f4").tobytes())
    return message.SerializeToString()


def _step(rows: int) -> bytes:
    """A stream step as the Python client sends it once the stream keeps its sessions."""
    import numpy as np

    from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb

    to_tensor = _module("doors.tensors", "tensors").to_tensor
    x = to_tensor(np.ones((rows, 1, 1), np.float32))
    step = pb.StepRequest(same_sessions=True, x=x) if rows > 1 else pb.StepRequest(x=x)
    return pb.StreamRequest(step=step).SerializeToString()


class _Context:
    def invocation_metadata(self) -> tuple:
        return ()


def _v2_calls(servicer: Any) -> Callable[[int], Awaitable[None]]:
    """`messages` sequence steps through `servicer.ModelInfer`, each answer serialized."""
    from rnnserve.generated.inference import grpc_service_pb2 as v2

    data = _v2_request(False)

    async def infer(messages: int) -> None:
        for _ in range(messages):
            request = v2.ModelInferRequest.FromString(data)
            (await servicer.ModelInfer(request, _Context())).SerializeToString()

    return infer


def _module(path: str, flat: str) -> Any:
    """rnnserve.<path>, or rnnserve.<flat> in a revision from before the src-layout (--against
    counts one beside this tree)."""
    try:
        return importlib.import_module(f"rnnserve.{path}")
    except ImportError:
        return importlib.import_module(f"rnnserve.{flat}")


async def _rnnserve(load: str, tracing: Any = None) -> Callable[[int], Awaitable[None]]:
    """`messages` messages through the servicers' own methods (`tracing`: this tree's Tracing,
    for bench/tracing.py)."""
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client import CollectorRegistry

    from rnnserve.generated.inference import grpc_service_pb2 as v2
    from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb

    Identities = _module("doors.identity", "identity").Identities
    KServeServicer = _module("doors.kserve", "kserve").KServeServicer
    native_module = _module("doors.native", "servicer")
    InferenceServicer, _StreamState = native_module.InferenceServicer, native_module._StreamState
    OpenStreams = _module("doors.streams", "streams").OpenStreams
    Engine = _module("engine.engine", "engine").Engine
    ModelRegistry = _module("engine.registry", "registry").ModelRegistry
    ServerConfig = _module("ops.config", "config").ServerConfig
    Metrics = _module("ops.metrics", "metrics").Metrics
    MemoryBudget = _module("state.memory", "memory").MemoryBudget
    SessionTable = _module("state.sessions", "sessions").SessionTable

    config = ServerConfig(
        repository=ROOT / "exported",
        models=("echo",),
        grpc_port=0,
        metrics_port=-1,
        inline_run_us=10**9,
    )
    metrics = Metrics(CollectorRegistry(), tracing) if tracing else Metrics(CollectorRegistry())
    registry = ModelRegistry(config, metrics, ThreadPoolExecutor(2))
    await registry.sync()
    engine = Engine(
        config,
        registry,
        SessionTable(config.max_sessions, 60, metrics),
        MemoryBudget(config.memory_budget),
    )
    identities = Identities.load("", None)
    if load == "v2":
        kserve = KServeServicer(engine, metrics, identities, OpenStreams())
        await kserve.ModelInfer(v2.ModelInferRequest.FromString(_v2_request(True)), _Context())
        return _v2_calls(kserve)
    native = InferenceServicer(engine, metrics, identities, OpenStreams())
    stream = _StreamState()
    rows = LOADS[load][1]

    async def opened() -> str:
        session = engine.open_session("echo", 0, {})  # a coroutine in newer revisions
        return (await session if inspect.isawaitable(session) else session).session_id

    if rows == 1:
        stream.current = await opened()
    else:
        ids = [await opened() for _ in range(rows)]
        first = pb.StreamRequest.FromString(_step(rows))
        first.step.same_sessions = False
        first.step.session_ids.extend(ids)
        await native._stream_message(first, stream)
    data = _step(rows)

    async def steps(messages: int) -> None:
        for _ in range(messages):
            request = pb.StreamRequest.FromString(data)
            (await native._stream_message(request, stream)).SerializeToString()

    return steps


async def _floor(load: str) -> Callable[[int], Awaitable[None]]:
    """The same messages through bench/echo_server.py's servicers, one bound run each."""
    sys.path.insert(0, str(ROOT))
    from bench.echo_server import ECHO, EchoServicer, EchoV2Servicer
    from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
    from rnnserve.models.contract import read_spec
    from rnnserve.models.runner import OrtRunner

    runner = OrtRunner(read_spec(ECHO), ECHO, "cpu", 1)
    if load == "v2":
        return _v2_calls(EchoV2Servicer(runner))
    stream = EchoServicer(runner, bound=True)
    data = _step(LOADS[load][1])

    async def steps(messages: int) -> None:
        async def requests():  # noqa: ANN202
            for _ in range(messages):
                yield pb.StreamRequest.FromString(data)

        async for answer in stream.Stream(requests(), _Context()):
            answer.SerializeToString()

    return steps


async def child(load: str, messages: int, floor: bool) -> None:
    run = await (_floor(load) if floor else _rnnserve(load))
    await run(30)  # caches, buffers, the stream's memo: in both counts
    await run(messages)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", metavar="REV", help="a git revision to count beside")
    parser.add_argument("--loads", default=",".join(LOADS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child[0], int(args.child[1]), args.floor))
        return 0
    if shutil.which("valgrind") is None:
        print("bench.instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        other = checkout(args.against, Path(scratch)) if args.against else None
        try:
            print(
                "| load | echo + one run | this tree | vs the floor |"
                + (f" {args.against} | this tree vs {args.against} |" if other else "")
                + "\n|---|---:|---:|---:|"
                + ("---:|---:|" if other else "")
            )
            for load in args.loads.split(","):
                floor, mine = per_message(load, floor=True), per_message(load)
                line = f"| {load} | {floor:,.0f} | {mine:,.0f} | {mine / floor:.2f}x |"
                if other:
                    theirs = per_message(load, other)
                    line += f" {theirs:,.0f} | {mine / theirs:.2f}x |"
                print(line, flush=True)
        finally:
            if other:
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(ROOT),
                        "worktree",
                        "remove",
                        "--force",
                        str(Path(scratch) / "tree"),
                    ],
                    check=False,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
