"""Server configuration: one typed dataclass; each field is a CLI flag and an RNNSERVE_* var."""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServerConfig:
    repository: Path = _opt(Path("exported"), "model repository: <name>/<version>/model.onnx")
    models: tuple[str, ...] = _opt((), "serve only these models (comma-separated); default all")
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 in the container)")
    workers: str = _opt("auto", "worker processes serving the gRPC port, each with its own "
                        "event loop, models and sessions: a number, or auto (the CPUs this "
                        "process may use: affinity and cgroup CPU quota)")
    grpc_port: int = _opt(8500, "gRPC port (0 picks a free one)")
    metrics_port: int = _opt(8000, "Prometheus /metrics port (0 picks a free one, -1 disables)")
    device: str = _opt("auto", "auto (CUDA when present), cpu or cuda",
                       choices=("auto", "cpu", "cuda"))
    session_state: str = _opt("auto", "where session state lives between steps: device (the "
                              "provider's memory: on CUDA a step moves only x and y), host, or "
                              "auto (device on CUDA, host on CPU)",
                              choices=("auto", "device", "host"))
    intra_op_threads: int = _opt(1, "ONNX Runtime threads per run; 1 suits tiny recurrent models")
    batch_workers: int = _opt(2, "ONNX Runtime runs that may execute at once, across models")
    max_batch_size: int = _opt(256, "rows one coalesced ONNX Runtime run may take")
    max_batch_delay: int = _opt(0, "µs a batch waits for more work after its first item; 0 "
                                   "takes what is queued, which batches well under load")
    inline_run_us: int = _opt(500, "runs expected (from the model's measured runs) to take up "
                                   "to this many µs execute on the event loop, cheaper than a "
                                   "thread hand-off; longer ones in the thread pool; 0: all there")
    max_sessions: int = _opt(10_000, "live sessions in all; more get RESOURCE_EXHAUSTED "
                                     "(each model preallocates this many state slots)")
    session_idle_timeout: float = _opt(300.0, "seconds without a step before a session is evicted")
    max_timesteps: int = _opt(100_000, "timesteps per sequence or per session in one request")
    max_batch_rows: int = _opt(65_536, "sequences per Predict, sessions per Steps message")
    max_message_bytes: int = _opt(16 * 1024 * 1024, "largest gRPC message accepted or sent "
                                  "(K/M/G suffixes, powers of 1024)", bytes=True)
    max_streams_per_connection: int = _opt(100, "concurrent calls (streams) one client "
                                                "connection may have open (HTTP/2 setting)")
    max_concurrent_rpcs: int = _opt(2048, "calls open at once in all (a stalled stream holds "
                                          "~140 KiB); more get RESOURCE_EXHAUSTED")
    memory_budget: int = _opt(512 * 1024 * 1024, "working memory all requests together may use "
                              "(inputs, runs, answers): larger work waits, work that could never "
                              "fit is refused (K/M/G suffixes)", bytes=True)
    repository_poll: float = _opt(0.0, "seconds between repository scans for new or removed "
                                       "versions; 0 scans only at start")
    state_store: str = _opt("", "redis://host:port/db: on drain, park sessions there for other "
                                "replicas to adopt; empty: sessions end with the process")
    handoff_wait: float = _opt(1.0, "seconds to wait for a session another replica is parking "
                                    "right now, before answering NOT_FOUND")
    shutdown_grace: float = _opt(10.0, "seconds in-flight work may finish after SIGTERM")
    auth_token: str = _opt("", "bearer token required on every call but health (the client "
                               "'default'); empty: none")
    auth_tokens_file: str = _opt("", "file of 'client-name token' lines: each client's sessions "
                                     "and v2 sequences are its own, metrics name the client")
    max_sessions_per_client: int = _opt(0, "live sessions one client may hold; 0: no limit "
                                           "beyond --max-sessions")
    tls_cert: str = _opt("", "PEM certificate chain; with --tls-key enables TLS")
    tls_key: str = _opt("", "PEM private key")
    log_level: str = _opt("info", "debug, info, warning or error")


ENV_PREFIX = "RNNSERVE_"


SIZE_SUFFIXES = {"k": 2**10, "m": 2**20, "g": 2**30}


def parse_bytes(text: str) -> int:
    """'512M', '512Mi', '1G' or a plain byte count."""
    digits = text.strip().lower().removesuffix("i").removesuffix("b")
    scale = SIZE_SUFFIXES.get(digits[-1:], 1)
    number = digits[:-1] if scale > 1 else digits
    if not number.isascii() or not number.isdigit():
        raise ValueError(f"{text!r} is not a size such as 512M or 1G")
    return int(number) * scale


def _parse(kind: Any, text: str, unit_bytes: bool = False) -> Any:
    if unit_bytes:
        return parse_bytes(text)
    if kind in ("tuple[str, ...]", tuple):
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if kind in ("Path", Path):
        return Path(text)
    return {"int": int, "float": float, "str": str}.get(kind, str)(text)


def _flag_value(kind: Any, unit_bytes: bool, text: str) -> Any:
    """A flag's value; a bad one is reported by argparse with the reason, not a type name."""
    try:
        return _parse(kind, text, unit_bytes)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; an RNNSERVE_<FIELD> variable supplies the default."""
    for f in fields(ServerConfig):
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not MISSING else None
        unit_bytes = f.metadata.get("bytes", False)
        if env in os.environ:
            default = _parse(f.type, os.environ[env], unit_bytes)
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=default,
                            type=functools.partial(_flag_value, f.type, unit_bytes),
                            choices=f.metadata.get("choices"),
                            help=f"{f.metadata['help']} (default: {shown!s}; env {env})")


def from_namespace(args: argparse.Namespace) -> ServerConfig:
    config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    validate(config)
    return config


def worker_count(config: ServerConfig) -> int:
    """--workers as a number (auto: the CPUs this process may use)."""
    if config.workers.strip().lower() == "auto":
        from rnnserve.cpus import available_cpus

        return available_cpus()
    return int(config.workers)


def validate(config: ServerConfig) -> None:
    if config.workers.strip().lower() != "auto" and not (
            config.workers.strip().isdigit() and int(config.workers) >= 1):
        raise ValueError(f"--workers must be a number of at least 1, or auto; got "
                         f"{config.workers!r}")
    positive = ("intra_op_threads", "batch_workers", "max_batch_size", "max_sessions",
                "max_timesteps", "max_batch_rows", "max_message_bytes", "memory_budget",
                "max_streams_per_connection", "max_concurrent_rpcs")
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if config.max_sessions_per_client < 0:
        raise ValueError("--max-sessions-per-client must be >= 0")
    if config.inline_run_us < 0 or config.max_batch_delay < 0 or config.session_idle_timeout <= 0:
        raise ValueError("--inline-run-us and --max-batch-delay must be >= 0, "
                         "--session-idle-timeout > 0")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
