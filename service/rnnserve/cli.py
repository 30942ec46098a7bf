"""The `rnnserve` command: serve, and talk to a server (models, predict, stream)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from rnnserve import __version__
from rnnserve.ops import config as config_module


def _client_flags(cmd: argparse.ArgumentParser) -> None:
    """How every client command reaches the server: address, TLS, token. Beside the server
    (a container's probe, `docker exec`), the server's own RNNSERVE_GRPC_PORT says where."""
    env = os.environ.get
    port = env("RNNSERVE_GRPC_PORT") or "8500"
    local = f"localhost:{port}" if port.isdigit() and 0 < int(port) < 65536 else None
    cmd.add_argument(
        "--address",
        default=env("RNNSERVE_ADDRESS", local),
        help="server host:port (default: localhost and RNNSERVE_GRPC_PORT, else "
        f"8500: {local}; env RNNSERVE_ADDRESS)",
    )
    cmd.add_argument(
        "--tls-ca",
        default=env("RNNSERVE_TLS_CA") or None,
        help="PEM file of the CA that signed the server's certificate: connect "
        "with TLS (env RNNSERVE_TLS_CA; default: plaintext)",
    )
    cmd.add_argument(
        "--token",
        default=env("RNNSERVE_AUTH_TOKEN") or None,
        help="bearer token, when the server requires one (env RNNSERVE_AUTH_TOKEN)",
    )


class _Parser(argparse.ArgumentParser):
    """Errors in one line, naming the flag or variable (the usage is one --help away): in a
    container's log, that line is what the operator sees."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="rnnserve",
        description="Serve recurrent ONNX models over gRPC: whole sequences and stateful streams.",
    )
    p.add_argument("--version", action="version", version=f"rnnserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (every flag also from RNNSERVE_*)")
    config_module.add_arguments(serve)
    for name, text in (
        ("health", "exit 0 if the server reports SERVING (container probe)"),
        ("models", "list the served models"),
        ("predict", "predict whole sequences read from stdin"),
        ("stream", "stream stdin lines as timesteps of one session"),
    ):
        cmd = sub.add_parser(name, help=text, description=text)
        _client_flags(cmd)
        if name == "health":
            _health_flags(cmd)
        if name not in ("models", "health"):
            cmd.add_argument("--model", required=True, help="model name (see `rnnserve models`)")
            cmd.add_argument(
                "--model-version",
                type=int,
                default=0,
                help="model version (default: 0, the latest)",
            )
    _import_flags(
        sub.add_parser(
            "import",
            help="wrap a recurrent ONNX graph (PyTorch nn.LSTM/GRU/RNN, any layout) into "
            "a model version, proven equal to the original",
            description="Wrap a recurrent ONNX graph into <repository>/<name>/<version>/ "
            "(model.onnx, model.json, golden.npz), proven equal to the original whole and "
            "streamed. "
            "Each LSTM/GRU/RNN node gets its own state tensors (h<i>, plus c<i> for an LSTM).",
        )
    )
    sub.choices["predict"].add_argument(
        "--last-only", action="store_true", help="print only each sequence's last output"
    )
    sub.choices["predict"].epilog = (
        "stdin: JSON (a list of sequences, each a list of timesteps, each a list of features) "
        "or CSV (one timestep per line, a blank line between sequences). Output: JSON."
    )
    return p


def _health_flags(cmd: argparse.ArgumentParser) -> None:
    """A probe runs beside the server it checks, with the server's environment: a server with
    TLS is checked with TLS, trusting its own certificate unless a CA is named."""
    env = os.environ.get
    cmd.set_defaults(tls_ca=env("RNNSERVE_TLS_CA") or env("RNNSERVE_TLS_CERT") or None)
    cmd.add_argument(
        "--tls-server-name",
        default=env("RNNSERVE_TLS_SERVER_NAME") or None,
        help="name the server's certificate must carry, where it is not the "
        "address's host (env RNNSERVE_TLS_SERVER_NAME)",
    )
    cmd.add_argument(
        "--service",
        default="",
        help="health entry to check: '' (default) the server is ready; "
        "'liveness' its process answers (a liveness probe); a model's name",
    )


def _import_flags(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("graph", help="the .onnx file")
    cmd.add_argument("--name", required=True, help="the model's name in the repository")
    cmd.add_argument("--version", type=int, default=1, help="version to write (default 1)")
    cmd.add_argument(
        "--repository",
        default=os.environ.get("RNNSERVE_REPOSITORY", "exported"),
        help="model repository (default: exported; env RNNSERVE_REPOSITORY)",
    )
    layout = cmd.add_mutually_exclusive_group()
    layout.add_argument(
        "--time-major",
        dest="time_major",
        action="store_true",
        default=None,
        help="the input is [time, batch, features] (default: found by running)",
    )
    layout.add_argument(
        "--batch-first",
        dest="time_major",
        action="store_false",
        help="the input is [batch, time, features]",
    )
    cmd.add_argument(
        "--input",
        default="",
        help="the sequence input's name, where the graph has several candidates",
    )
    cmd.add_argument("--output", default="", help="the per-step output's name, likewise")
    cmd.add_argument(
        "--output-kind",
        default="regression",
        help="what y holds: regression (default), sigmoid or probabilities",
    )
    cmd.add_argument("--description", default="", help="for model.json")


def run_import(args: argparse.Namespace) -> int:

    from rnnserve.models.importer import ImportRefused, describe, import_graph

    try:
        written = import_graph(
            Path(args.graph),
            args.name,
            args.version,
            Path(args.repository),
            time_major=args.time_major,
            input_name=args.input,
            output_name=args.output,
            output_kind=args.output_kind,
            description=args.description,
        )
    except ImportRefused as exc:
        print(f"error: cannot import {args.graph}: {exc}", file=sys.stderr)
        return 2
    print(describe(written))
    return 0


def parse_timestep(line: str) -> list[float]:
    return [float(v) for v in re.split(r"[,\s]+", line.strip()) if v]


def read_sequences(text: str) -> list[list[list[float]]]:
    if text.lstrip().startswith("["):
        return json.loads(text)
    blocks = re.split(r"\n\s*\n", text.strip())
    return [
        [parse_timestep(line) for line in block.splitlines() if line.strip()]
        for block in blocks
        if block.strip()
    ]


def format_output(row: Iterable[float]) -> str:
    return " ".join(f"{v:.6g}" for v in row)


def _client(args: argparse.Namespace):
    from rnnserve.client import Client

    return Client(args.address, token=args.token, tls_ca=args.tls_ca)


def run_stream(args: argparse.Namespace) -> int:
    """One stdin line → one timestep → one printed line, as soon as its output arrives."""
    with _client(args) as client, client.stream(args.model, args.model_version) as session:
        for line in sys.stdin:
            if not line.strip():
                continue
            for row in session.step(parse_timestep(line)):
                print(format_output(row), flush=True)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    sequences = [np.asarray(s, np.float32) for s in read_sequences(sys.stdin.read())]
    if not sequences:
        print("error: no sequences on stdin", file=sys.stderr)
        return 2
    with _client(args) as client:
        result = client.predict(
            args.model, sequences, version=args.model_version, last_only=args.last_only
        )
    lengths = [len(s) for s in sequences]
    outputs = (
        result.y.tolist()
        if args.last_only
        else [result.y[i, :n].tolist() for i, n in enumerate(lengths)]
    )
    print(
        json.dumps(
            {
                "model": result.model,
                "version": result.version,
                "y": outputs,
                "final_states": {k: v.tolist() for k, v in result.final_states.items()},
            }
        )
    )
    return 0


def run_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for m in client.list_models():
            states = ", ".join(f"{s.name}[{s.size}]" for s in m.states)
            print(
                f"{m.name} v{m.version} ({m.layers}x{m.cell}({m.units}), "
                f"{m.features} in -> {m.outputs} {m.output_kind}; states {states}): "
                f"{m.description}"
            )
    return 0


def run_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from rnnserve.client import _credentials

    options = (
        [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    )
    try:
        creds = _credentials(args.tls_ca)
        channel = (
            grpc.secure_channel(args.address, creds, options)
            if creds
            else grpc.insecure_channel(args.address, options)
        )
    except OSError as exc:
        print(
            f"unhealthy: cannot read the CA file {args.tls_ca}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    with channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=args.service), timeout=3)
                .status
            )
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def run_serve(args: argparse.Namespace) -> int:
    from rnnserve import preflight

    if importlib.util.find_spec("onnxruntime") is None:
        print(
            "error: ONNX Runtime is not installed: pip install 'rnnserve[cpu]' (or "
            "'rnnserve[gpu]' for CUDA)",
            file=sys.stderr,
        )
        return 2
    try:
        config = config_module.from_namespace(args)
        preflight.check(config)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rnnserve.ops.logs import configure
    from rnnserve.server import serve

    configure(config.log_level)
    for name in config_module.unknown_variables():
        logging.getLogger("rnnserve").warning(
            "%s is set, but no flag reads it (a typo, or a "
            "renamed flag? see rnnserve serve --help)",
            name,
        )
    workers = config_module.worker_count(config)
    if workers > 1 or os.getpid() == 1:  # PID 1 (a container) must also reap and forward
        from rnnserve.supervisor import supervise

        return supervise(config, workers)
    try:
        return asyncio.run(serve(config))
    except (ValueError, OSError, RuntimeError) as exc:  # bad tokens file, repository, ports
        logging.getLogger("rnnserve").error("cannot serve: %s", exc)
        return 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C on a client command: stop, no traceback
        return 130


def _main(argv: list[str] | None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if getattr(args, "address", "") is None:
        cli.error(
            f"RNNSERVE_GRPC_PORT={os.environ['RNNSERVE_GRPC_PORT']!r} is no port "
            "(1-65535); give --address host:port"
        )
    if args.command == "serve":
        return run_serve(args)
    if args.command == "import":
        return run_import(args)
    from rnnserve.client import RnnServeError

    commands = {
        "health": run_health,
        "models": run_models,
        "predict": run_predict,
        "stream": run_stream,
    }
    try:
        return commands[args.command](args)
    except RnnServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, json.JSONDecodeError) as exc:
        print(f"error: bad input: {exc}", file=sys.stderr)
        return 2
