"""Server configuration: one typed dataclass; each field is a CLI flag and an RNNSERVE_* var."""

from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class ServerConfig:
    repository: Path = _opt(Path("exported"), "model repository: <name>/<version>/model.onnx")
    models: tuple[str, ...] = _opt((), "serve only these models (comma-separated); default all")
    host: str = _opt("127.0.0.1", "address to bind (0.0.0.0 in the container)")
    workers: str = _opt(
        "auto",
        "worker processes serving the gRPC port, each with its own "
        "event loop, models and sessions: a number, or auto (the CPUs this "
        "process may use: affinity and cgroup CPU quota)",
    )
    grpc_port: int = _opt(8500, "gRPC port (0 picks a free one)", minimum=0, maximum=65535)
    http_port: int = _opt(
        -1,
        "KServe v2 HTTP/REST port, beside gRPC (0 picks a free one; -1, the default, "
        "disables it: a second listener is opened on purpose; the container opens 8080)",
        minimum=-1,
        maximum=65535,
    )
    metrics_port: int = _opt(
        8000,
        "Prometheus /metrics port (0 picks a free one, -1 disables)",
        minimum=-1,
        maximum=65535,
    )
    device: str = _opt(
        "auto", "auto (CUDA when present), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    session_state: str = _opt(
        "auto",
        "where session state lives between steps: device (the "
        "provider's memory: on CUDA a step moves only x and y), host, or "
        "auto (device on CUDA, host on CPU)",
        choices=("auto", "device", "host"),
    )
    intra_op_threads: int = _opt(
        1, "ONNX Runtime threads per run; 1 suits tiny recurrent models", minimum=1, maximum=1024
    )
    batch_workers: int = _opt(
        2, "ONNX Runtime runs that may execute at once, across models", minimum=1, maximum=1024
    )
    max_batch_size: int = _opt(256, "rows one coalesced ONNX Runtime run may take", minimum=1)
    max_batch_delay: int = _opt(
        0,
        "µs a batch waits for more work after its first item; 0 "
        "takes what is queued, which batches well under load",
        minimum=0,
        maximum=10_000_000,
    )
    inline_run_us: int = _opt(
        500,
        "runs expected (from the model's measured runs) to take up "
        "to this many µs execute on the event loop, cheaper than a "
        "thread hand-off; longer ones in the thread pool; 0: all there",
        minimum=0,
    )
    max_sessions: int = _opt(
        10_000,
        "sessions in memory; more get RESOURCE_EXHAUSTED, or with --session-ttl the least "
        "recently used wait in the state store (each model preallocates this many state slots)",
        minimum=1,
    )
    session_idle_timeout: float = _opt(
        300.0, "seconds without a step before a session is evicted", minimum=0.1
    )
    max_timesteps: int = _opt(
        100_000, "timesteps per sequence or per session in one request", minimum=1
    )
    max_batch_rows: int = _opt(
        65_536, "sequences per Predict, sessions per Steps message", minimum=1
    )
    max_message_bytes: int = _opt(
        16 * 1024 * 1024,
        "largest gRPC message accepted or sent (K/M/G suffixes, powers of 1024)",
        bytes=True,
        minimum=1,
        maximum=2**31 - 1,
    )  # gRPC's limit: a C int
    max_streams_per_connection: int = _opt(
        2048,
        "concurrent calls (streams) one client "
        "connection may have open (HTTP/2 setting; "
        "a client opens streams before it learns it, "
        "so one below what a client sends on one "
        "connection refuses its calls)",
        minimum=1,
        maximum=2**31 - 1,
    )
    max_concurrent_rpcs: int = _opt(
        2048,
        "calls open at once in all (a stalled stream holds ~140 KiB); more get RESOURCE_EXHAUSTED",
        minimum=1,
        maximum=2**31 - 1,
    )
    read_budget: int = _opt(
        128 * 1024 * 1024,
        "request messages being received at once, "
        "outside --memory-budget: a unary call's message is read only while "
        "it holds one --max-message-bytes of this (so at least one message), "
        "one client at most half of it (K/M/G suffixes)",
        bytes=True,
        minimum=1,
    )
    read_timeout: float = _opt(
        30.0,
        "seconds a unary call's request message may take to "
        "arrive once the server reads it; a slower sender gets "
        "DEADLINE_EXCEEDED",
        minimum=0.01,
        maximum=3600,
    )
    memory_budget: int = _opt(
        512 * 1024 * 1024,
        "working memory all requests together may use "
        "(inputs, runs, answers): larger work waits, work that could never "
        "fit is refused (K/M/G suffixes)",
        bytes=True,
        minimum=1,
    )
    repository_poll: float = _opt(
        0.0,
        "seconds between repository scans for new or removed versions; 0 scans only at start",
        minimum=0,
        zero_or_at_least=0.05,
    )
    state_store: str = _opt(
        "",
        "where sessions wait outside a process: redis://host:port/db (replicas on many "
        "machines adopt each other's) or sqlite://PATH (a database file on this machine, "
        "kept across restarts); a drain parks sessions there, and with --session-ttl so "
        "does an idle sweep; empty: sessions end with the process",
    )
    session_ttl: float = _opt(
        0.0,
        "with --state-store: seconds a session idle past --session-idle-timeout waits in the "
        "store, out of memory, for its next call, which brings it back; 0: idle sessions "
        "are evicted",
        minimum=0,
        maximum=10 * 365 * 86400,
    )
    handoff_wait: float = _opt(
        1.0,
        "seconds to wait for a session another replica is parking "
        "right now, before answering NOT_FOUND",
        minimum=0,
        maximum=3600,
    )
    shutdown_grace: float = _opt(
        10.0,
        "seconds the drain after SIGTERM may take: parking "
        "sessions and finishing in-flight work together",
        minimum=0,
        maximum=3600,
    )
    auth_token: str = _opt(
        "", "bearer token required on every call but health (the client 'default'); empty: none"
    )
    auth_tokens_file: str = _opt(
        "",
        "file of 'client-name token' lines: each client's sessions "
        "and v2 sequences are its own, metrics name the client",
    )
    max_sessions_per_client: int = _opt(
        0, "live sessions one client may hold; 0: no limit beyond --max-sessions", minimum=0
    )
    otlp_endpoint: str = _opt(
        "",
        "OpenTelemetry traces to this OTLP/gRPC collector (http://host:4317 for plaintext, "
        "https:// for TLS); empty: no tracing",
    )
    trace_ratio: float = _opt(
        1.0,
        "share of the traces begun here that are sampled (a caller's sampled traceparent is "
        "always followed)",
        minimum=0,
        maximum=1,
    )
    tls_cert: str = _opt("", "PEM certificate chain; with --tls-key enables TLS")
    tls_key: str = _opt("", "PEM private key")
    log_level: str = _opt(
        "info", "debug, info, warning or error", choices=("debug", "info", "warning", "error")
    )


ENV_PREFIX = "RNNSERVE_"
CLIENT_VARIABLES = ("ADDRESS", "TLS_CA", "TLS_SERVER_NAME")
"""RNNSERVE_* names the client commands read (beside the fields' own)."""
WORKERS_PER_CPU = 4
"""--workers is capped at this many per CPU: far past the cores, workers only contend, and each
drains on its own at SIGTERM (1,000 on 2 cores took over a minute to stop)."""


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
    if kind in ("int", int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
    if kind in ("float", float):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    return str(text)


class FromEnvironment(str):
    """A flag's default as its RNNSERVE_* variable gave it: argparse converts string defaults
    with the flag's type only when that command runs, so a bad value never breaks another
    command (`rnnserve --version`, the container's health probe), and the error names the
    variable rather than a flag nobody typed."""

    variable: str

    def __new__(cls, text: str, variable: str) -> FromEnvironment:
        value = super().__new__(cls, text)
        value.variable = variable
        return value


def _flag_value(f: Any, text: str) -> Any:
    """A flag's value, its choices checked for environment values too (argparse checks them
    only on the command line); a bad one is reported with the reason, not a type name."""
    choices = f.metadata.get("choices")
    try:
        if choices and text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return _parse(f.type, text, f.metadata.get("bytes", False))
    except ValueError as exc:
        where = f"{text.variable}: " if isinstance(text, FromEnvironment) else ""
        raise argparse.ArgumentTypeError(f"{where}{exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; an RNNSERVE_<FIELD> variable supplies the default."""
    for f in fields(ServerConfig):
        env = ENV_PREFIX + f.name.upper()
        default = f.default if f.default is not MISSING else None
        if env in os.environ:
            default = FromEnvironment(os.environ[env], env)
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=default,
            type=functools.partial(_flag_value, f),
            choices=f.metadata.get("choices"),
            help=f"{f.metadata['help']} (default: {shown!s}; env {env})",
        )


def from_namespace(args: argparse.Namespace) -> ServerConfig:
    config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    validate(config)
    return config


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """RNNSERVE_* names in the environment that nothing reads (a typo, a renamed flag)."""
    known = {ENV_PREFIX + f.name.upper() for f in fields(ServerConfig)} | {
        ENV_PREFIX + name for name in CLIENT_VARIABLES
    }
    return sorted(
        n
        for n in (os.environ if environ is None else environ)
        if n.startswith(ENV_PREFIX) and n not in known
    )


def worker_count(config: ServerConfig) -> int:
    """--workers as a number (auto: the CPUs this process may use)."""
    if config.workers.strip().lower() == "auto":
        from rnnserve.ops.cpus import available_cpus

        return available_cpus()
    return int(config.workers)


def _names(name: str) -> str:
    return f"--{name.replace('_', '-')} ({ENV_PREFIX}{name.upper()})"


def _range(f: Any) -> str:
    low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
    if high is None:
        return f"at least {low}"
    return f"between {low} and {high}"


SQLITE = "sqlite://"
STORE_SCHEMES = ("redis://", "rediss://", "unix://", SQLITE)
"""What --state-store takes: redis-py's URL forms, and a database file on this machine."""


def sqlite_path(url: str) -> Path:
    """The database file a `sqlite://PATH` store URL names (sqlite:///var/lib/x.db is
    /var/lib/x.db; sqlite://x.db is x.db in the working directory)."""
    path = url.removeprefix(SQLITE)
    if not path or path.endswith("/"):
        raise ValueError(f"{url!r} names no file: sqlite:// takes the database file's path")
    return Path(path)


def validate(config: ServerConfig) -> None:
    """Every value in range, in one place: each error names the flag and its variable."""
    from rnnserve.ops.cpus import available_cpus

    for f in fields(ServerConfig):
        value = getattr(config, f.name)
        if "minimum" not in f.metadata or not isinstance(value, int | float):
            continue
        low, high = f.metadata["minimum"], f.metadata.get("maximum")
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise ValueError(f"{_names(f.name)} must be {_range(f)}; got {value}")
        floor = f.metadata.get("zero_or_at_least")
        if floor is not None and 0 < value < floor:
            raise ValueError(f"{_names(f.name)} must be 0 or at least {floor}; got {value}")
    workers = config.workers.strip().lower()
    cap = WORKERS_PER_CPU * available_cpus()
    if workers != "auto" and not (
        workers.isascii() and workers.isdigit() and 1 <= int(workers) <= cap
    ):
        raise ValueError(
            f"{_names('workers')} must be auto or a number from 1 to {cap} "
            f"({WORKERS_PER_CPU} per CPU this process may use); got "
            f"{config.workers!r}"
        )
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    store = config.state_store
    if store and not store.startswith(STORE_SCHEMES):
        raise ValueError(
            f"{_names('state_store')} must start with {', '.join(STORE_SCHEMES)}; got {store!r}"
        )
    if store.startswith(SQLITE):
        try:
            sqlite_path(store)
        except ValueError as exc:
            raise ValueError(f"{_names('state_store')}: {exc}") from None
    if config.session_ttl and not store:
        raise ValueError(
            f"{_names('session_ttl')} keeps idle sessions in the state store: set "
            f"{_names('state_store')} too"
        )
    if config.otlp_endpoint and not _otlp_endpoint(config.otlp_endpoint):
        raise ValueError(
            f"{_names('otlp_endpoint')} must be http://host:port (plaintext) or "
            f"https://host:port (TLS); got {config.otlp_endpoint!r}"
        )


def _otlp_endpoint(endpoint: str) -> bool:
    """A collector address the exporter reads as meant: the scheme says whether TLS is used,
    and without one the exporter would try TLS against a plaintext collector and drop every
    span without a word."""
    parts = urlsplit(endpoint)
    try:
        parts.port  # noqa: B018 - raises on a port that is not one
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.path in ("", "/")
