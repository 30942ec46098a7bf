"""`rnnserve serve --workers N`: N worker processes serve one port; a parent keeps them.

Why processes: Python's gRPC transport is most of a step's cost, and one process saturates one
core (bench/streaming.py). Each worker has its own event loop, ONNX Runtime sessions and state
slots, and listens on the same port with SO_REUSEPORT, so the kernel spreads connections over
them (the pattern of grpc's multiprocessing example). Sessions follow their calls between
workers (rnnserve.cluster.siblings).

The parent:
- refuses a port another server holds (it checks before any worker binds, then holds the
  port in the workers' SO_REUSEPORT group with a socket that never listens);
- gives each worker 1/N of --memory-budget, so the budget holds for the server as a whole;
- serves the one /metrics: prometheus-client's multiprocess mode sums the workers' files, and
  a collector adds per-worker CPU, memory and restarts;
- restarts a worker that dies (a crash, the OOM killer, SIGKILL);
- forwards SIGTERM/SIGINT: every worker drains, and the exit status is the worst of theirs;
  and SIGHUP: every worker scans the model repository now;
- is a correct PID 1 in a container (plain `docker run`, no --init): it handles the signals the
  kernel would otherwise drop for PID 1, and reaps orphaned processes that the kernel hands it.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

from rnnserve.ops.config import ServerConfig
from rnnserve.ops.ports import hold_port, start_metrics
from rnnserve.state import claims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlace:
    """Where a worker process stands among its siblings (given by the supervisor)."""

    index: int
    count: int
    run_dir: Path
    """The supervisor's private directory: the workers' sockets, the metrics files."""
    supervisor_pid: int
    """Whose death ends the worker. Not "is my parent PID 1?": in a container the supervisor
    itself is PID 1, and every worker took that for its parent's death."""
    sibling_key: str
    """A secret the workers send each other: their sockets answer no other process."""


METRICS_DIR = "metrics"
RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
"""Seconds before restarting a worker that keeps dying, by how many times in a row it died
without becoming ready."""
STOP_MARGIN = 10.0
"""Seconds a draining worker gets past its own deadline before it is killed."""
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
PAGE = os.sysconf("SC_PAGE_SIZE")


def _end_with_parent(supervisor_pid: int) -> None:
    """Drain (SIGTERM) when the supervisor dies, even by SIGKILL: no orphaned workers holding
    the port. Linux's parent-death signal; the check after it closes the race with a
    supervisor that died before it was set (the worker was then handed to another parent)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own stop ends workers
        return
    if os.getppid() != supervisor_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(config: ServerConfig, place: WorkerPlace, ready) -> None:
    """A worker process (spawned: a fresh interpreter, so no state leaks from the parent)."""
    import asyncio

    from rnnserve.ops.logs import configure
    from rnnserve.server import serve

    configure(config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards a terminal's ^C
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it: not a death
    _end_with_parent(place.supervisor_pid)
    try:
        code = asyncio.run(serve(config, place, on_ready=lambda port: ready.send(port)))
    except (ValueError, OSError, RuntimeError) as exc:
        logging.getLogger("rnnserve").error("worker %d cannot serve: %s", place.index, exc)
        code = 2
    raise SystemExit(code)


class _WorkerStats:
    """Per-worker CPU, memory and restarts, from /proc: the figures multiprocess mode cannot
    sum (each worker's process_* metrics would describe one process only)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        cpu = CounterMetricFamily(
            "rnnserve_worker_cpu_seconds",
            "CPU time of each worker process (user + system)",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            "rnnserve_worker_resident_memory_bytes",
            "Resident memory of each worker process",
            labels=["worker"],
        )
        for index, process in sorted(self.supervisor.processes.items()):
            try:
                fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it just died; the supervisor restarts it
            cpu.add_metric([str(index)], (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
            rss.add_metric([str(index)], int(fields[21]) * PAGE)
        restarts = CounterMetricFamily(
            "rnnserve_worker_restarts", "Workers started again after they died", labels=[]
        )
        restarts.add_metric([], self.supervisor.restarts)
        workers = GaugeMetricFamily("rnnserve_workers", "Worker processes serving")
        workers.add_metric([], len(self.supervisor.ready))
        lost = CounterMetricFamily(
            "rnnserve_worker_sessions_lost",
            "Sessions that died with their worker (a crash, the OOM killer, SIGKILL)",
            labels=[],
        )
        lost.add_metric([], self.supervisor.sessions_lost)
        return [cpu, rss, restarts, workers, lost]


class Supervisor:
    def __init__(self, config: ServerConfig, count: int) -> None:
        self.config = config
        self.count = count
        self.run_dir = Path()  # made by run(), where a missing /tmp can be reported
        self.sibling_key = secrets.token_hex(32)  # reaches the workers through their pipes
        self.context = multiprocessing.get_context("spawn")
        self.processes: dict[int, BaseProcess] = {}
        self.pipes: dict[int, Connection] = {}
        self.ready: set[int] = set()
        self.failures: dict[int, int] = {}
        self.due: dict[int, float] = {}
        """Workers to start again, by when (monotonic): their restart back-off."""
        self.restarts = 0
        self.sessions_lost = 0
        """Sessions that died with their worker."""
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):  # as PID 1, unhandled ones are dropped
            signal.signal(sig, self._on_signal)
        signal.signal(signal.SIGHUP, self._forward)
        try:
            self.run_dir = Path(tempfile.mkdtemp(prefix="rnnserve-"))
        except OSError as exc:
            log.error(
                "cannot serve: the workers need a writable temporary directory (%s): "
                "mount one at /tmp (docker run --read-only --tmpfs /tmp) or set TMPDIR",
                exc,
            )
            return 2
        metrics_dir = self.run_dir / METRICS_DIR
        metrics_dir.mkdir()
        claims.create(self.run_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # before the workers start
        held: list[socket.socket] = []
        try:
            held.append(hold_port(self.config.host, self.config.grpc_port, "--grpc-port"))
            port = held[0].getsockname()[1]
            http_port = self.config.http_port
            if http_port >= 0:  # the workers share it as they share the gRPC port
                held.append(hold_port(self.config.host, http_port, "--http-port"))
                http_port = held[1].getsockname()[1]
            worker_config = dataclasses.replace(
                self.config,
                grpc_port=port,
                http_port=http_port,
                metrics_port=-1,
                memory_budget=max(1, self.config.memory_budget // self.count),
            )
            http = start_metrics(self.config, self._registry())
        except OSError as exc:
            log.error("cannot serve: %s", exc)
            for sock in held:
                sock.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return 2
        try:
            return self._supervise(worker_config, port, http)
        finally:
            for sock in held:
                sock.close()
            if http is not None:
                http.shutdown()
                http.server_close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _registry(self):
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(_WorkerStats(self))
        return registry

    def _start(self, index: int, config: ServerConfig) -> None:
        receive, send = self.context.Pipe(duplex=False)
        place = WorkerPlace(index, self.count, self.run_dir, os.getpid(), self.sibling_key)
        process = self.context.Process(
            target=_worker_main,
            args=(config, place, send),
            name=f"rnnserve-worker-{index}",
            daemon=False,
        )
        process.start()
        send.close()
        self.processes[index] = process
        self.pipes[index] = receive

    def _supervise(self, config: ServerConfig, port: int, http) -> int:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous = signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes _watch: reap orphans
        try:
            for index in range(self.count):
                self._start(index, config)
            codes = self._watch(config, port, http, wake_read)
        finally:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.set_wakeup_fd(previous)
            os.close(wake_read)
            os.close(wake_write)
        worst = max(codes.values(), default=0)
        log.info("stopped (%d workers; worst exit status %d)", self.count, worst)
        return worst

    def _forward(self, signum: int, frame: object) -> None:
        """SIGHUP: every worker scans the repository now."""
        self._signal_workers(signum)

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = True
            self._signal_workers(signal.SIGTERM)

    def _signal_workers(self, signum: int) -> None:
        for process in self.processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signum)

    def _watch(self, config: ServerConfig, port: int, http, wake: int) -> dict[int, int]:
        """Until every worker has exited after a stop: readiness, deaths and restarts."""
        codes: dict[int, int] = {}
        announced = False
        deadline = None
        while self.processes or (self.due and not self.stopping):
            if self.stopping:
                self.due.clear()  # a stop during a restart's back-off starts nothing new
                if deadline is None:
                    deadline = (
                        time.monotonic()
                        + self.config.shutdown_grace
                        + self.config.handoff_wait
                        + STOP_MARGIN
                    )
            self._start_due(config)
            wake_at = min([*self.due.values(), *([deadline] if deadline else [])], default=None)
            timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
            waiting = {p.sentinel: (i, p) for i, p in self.processes.items()}
            pipes = {id(pipe): (i, pipe) for i, pipe in self.pipes.items()}
            events = wait([*waiting, *self.pipes.values(), wake], timeout)
            if not events and deadline is not None and time.monotonic() >= deadline:
                self._kill_all()
                continue
            if wake in events:
                os.read(wake, 512)
            for event in events:  # readiness first: a worker may be ready, then die
                ready = pipes.get(id(event))
                if ready is not None and self.pipes.get(ready[0]) is ready[1]:
                    self._ready(*ready)
            for event in events:
                dead = waiting.get(event) if isinstance(event, int) else None
                if dead is not None and self.processes.get(dead[0]) is dead[1]:
                    code = self._died(dead[0], config)
                    if code is not None:
                        codes[dead[0]] = code
            self._reap_orphans()
            if not announced and len(self.ready) == self.count:
                announced = True
                metrics = (
                    f"metrics on :{http.server_port}" if http is not None else "metrics disabled"
                )
                log.info(
                    "serving on %s:%d with %d workers; %s",
                    self.config.host,
                    port,
                    self.count,
                    metrics,
                )
        return codes

    def _reap_orphans(self) -> None:
        """Collect ended processes that are not this supervisor's workers: as PID 1, every
        orphan of the container is handed to it, and unreaped they stay zombies for good.
        Workers are left to their own join (which needs their exit status): a dead one stops
        the look-up until its sentinel has been handled."""
        workers = {process.pid for process in self.processes.values()}
        while True:
            try:
                ended = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if ended is None or ended.si_pid in workers or ended.si_pid == 0:
                return
            try:
                os.waitpid(ended.si_pid, 0)
            except ChildProcessError:
                return

    def _ready(self, index: int, pipe: Connection) -> None:
        del self.pipes[index]
        with pipe:
            try:
                pipe.recv()
            except EOFError:  # the worker died before it was ready; its sentinel says so
                return
        self.ready.add(index)
        self.failures[index] = 0

    def _died(self, index: int, config: ServerConfig) -> int | None:
        """A worker ended: its exit status when stopping (or when it never got ready at the
        first start: the server cannot serve); otherwise it is started again."""
        from prometheus_client import multiprocess

        process = self.processes.pop(index)
        process.join()  # its sentinel may be ready before its exit status is
        assert process.exitcode is not None and process.pid is not None  # joined
        pipe = self.pipes.pop(index, None)
        if pipe is not None:
            pipe.close()
        multiprocess.mark_process_dead(process.pid)  # its live gauges stop counting
        was_ready = index in self.ready
        self.ready.discard(index)
        code = process.exitcode if process.exitcode >= 0 else 128 - process.exitcode
        if self.stopping:  # one still starting held no sessions: its end is no failure
            return code if was_ready else 0
        failures = self.failures.get(index, 0)
        if not was_ready and self.restarts == 0 and failures == 0 and code == 2:
            log.error("worker %d could not start (exit status %d): stopping", index, code)
            self._on_signal(signal.SIGTERM, None)
            return code
        how = (
            f"exit status {code}"
            if process.exitcode >= 0
            else f"signal {signal.Signals(-process.exitcode).name}"
        )
        self.failures[index] = 0 if was_ready else failures + 1
        pause = (
            RESTART_BACKOFF[min(self.failures[index], len(RESTART_BACKOFF) - 1)]
            if self.failures[index]
            else 0.0
        )
        log.error(
            "worker %d (pid %d) died (%s): starting it again%s",
            index,
            process.pid,
            how,
            f" in {pause:g} s" if pause else "",
        )
        self.due[index] = time.monotonic() + pause  # _watch starts it, unless a stop comes
        return None

    def _start_due(self, config: ServerConfig) -> None:
        """Start the workers whose restart back-off is over."""
        now = time.monotonic()
        for index, at in sorted(self.due.items()):
            if at <= now:
                del self.due[index]
                self.restarts += 1
                try:
                    forgotten = claims.forget_worker(self.run_dir, index)
                except sqlite3.Error as exc:  # its rows stay; the worker must start anyway
                    log.error(
                        "could not drop worker %d's sessions from the shared table: %s", index, exc
                    )
                    forgotten = 0
                self.sessions_lost += forgotten
                if forgotten:
                    log.error("worker %d died holding %d sessions; they are lost", index, forgotten)
                self._start(index, config)

    def _kill_all(self) -> None:
        for index, process in self.processes.items():
            if process.is_alive():
                log.error("worker %d did not stop in time: killed", index)
                process.kill()


def supervise(config: ServerConfig, count: int) -> int:
    return Supervisor(config, count).run()
