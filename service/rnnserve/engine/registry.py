"""Loaded model versions: load new ones before retiring old ones, and keep a removed version
serving the sessions pinned to it until the last of them ends."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rnnserve.engine.batcher import Batcher
from rnnserve.engine.run_times import RunTimes, timed_at_load
from rnnserve.errors import NotFound, Unavailable
from rnnserve.models.checks import check_model
from rnnserve.models.contract import MODEL_FILE, ModelSpec
from rnnserve.models.repository import ModelVersion, scan
from rnnserve.models.runner import OrtRunner
from rnnserve.models.runtime import Runner
from rnnserve.ops.config import ServerConfig
from rnnserve.ops.metrics import Metrics
from rnnserve.state.device_state import DeviceStateStore
from rnnserve.state.memory import RunCost
from rnnserve.state.state_store import Slots, StateStore

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    spec: ModelSpec
    path: Path
    runner: Runner
    store: Slots
    batcher: Batcher
    cost: RunCost
    graph: str
    """sha256 of model.onnx: a parked session carries it, so a replica whose same-named
    version holds another graph (a rolling update) leaves the session for one that has it."""
    retiring: bool = False
    sessions: int = 0
    labels: tuple[str, str] = field(init=False)
    """(name, version as text): the metrics' labels and a step's answer, made once."""

    def __post_init__(self) -> None:
        self.labels = (self.spec.name, str(self.spec.version))


class ModelRegistry:
    def __init__(
        self,
        config: ServerConfig,
        metrics: Metrics,
        executor: Executor,
        runner: Callable[[ModelSpec, Path, str, int], Runner] = OrtRunner,
    ) -> None:
        self.config = config
        self.runner = runner
        """What loads and runs a version (spec, directory, --device, intra-op threads): ONNX
        Runtime's, or another runtime's `Runner`; tests inject one that fails or stalls on
        cue."""
        self.metrics = metrics
        self.executor = executor
        self.run_slots = asyncio.Semaphore(config.batch_workers)
        self._models: dict[tuple[str, int], LoadedModel] = {}
        self._open: dict[str, list[int]] = {}
        """`versions` by name, kept until the models change: every call looks a model up."""
        self._loading: dict[tuple[str, int], ModelSpec] = {}
        """Versions being loaded now: listed, not ready, not yet served."""
        self._rejected: dict[Path, tuple] = {}
        """Versions that failed to load, by directory, with their files' signature then."""
        self._reported: dict[Path, str] = {}

    def _load(self, found: ModelVersion) -> tuple[Runner, RunTimes, str, RunCost]:
        runner = self.runner(
            found.spec, found.path, self.config.device, self.config.intra_op_threads
        )
        check_model(runner, found.path)
        data = (found.path / MODEL_FILE).read_bytes()  # once: the digest and the cost's graph
        return (
            runner,
            timed_at_load(runner),
            hashlib.sha256(data).hexdigest(),
            RunCost.of(found.spec, onnx.load_model_from_string(data)),
        )

    async def sync(self, changed: Callable[[], Awaitable[None]] | None = None) -> None:
        """Load versions that appeared on disk; retire those that disappeared. A broken entry
        is reported once (until its files change) and skipped; it never blocks the others.
        `changed` (health) is awaited when loads begin and as each one ends."""

        async def tell() -> None:
            if changed is not None:
                await changed()

        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self.executor, scan, self.config.repository, self.config.models
        )
        for path, reason in result.problems.items():
            self._report(path, reason)
        self._loading.update(
            {
                key: version.spec
                for key, version in result.found.items()
                if key not in self._models and self._rejected.get(version.path) != version.signature
            }
        )
        if self._loading:
            await tell()
        for key, version in sorted(result.found.items()):
            if key in self._models:  # already loaded; back on disk if it was retiring
                if self._models[key].retiring:
                    self._models[key].retiring = False
                    self._open.clear()
                continue
            if self._rejected.get(version.path) == version.signature:
                continue  # failed before and unchanged since
            try:
                runner, times, graph, cost = await loop.run_in_executor(
                    self.executor, self._load, version
                )
            except Exception as exc:  # one broken model must not stop the others
                self._rejected[version.path] = version.signature
                self._report(version.path, _one_line(exc))
                continue
            finally:
                del self._loading[key]
            self._rejected.pop(version.path, None)
            self._add(version, runner, times, graph, cost)
            await tell()
        self._reported = {
            path: reason
            for path, reason in self._reported.items()
            if path in result.problems or path in self._rejected
        }
        for key, model in list(self._models.items()):
            if key not in result.found and not model.retiring:
                model.retiring = True
                self._open.clear()
                log.info("retiring %s v%d (%d sessions pinned)", *key, model.sessions)
            if model.retiring and model.sessions == 0:
                await self._unload(key)

    def _report(self, path: Path, reason: str) -> None:
        """Log why an entry is skipped, once per entry and reason, not on every scan."""
        if self._reported.get(path) != reason:
            self._reported[path] = reason
            log.error("skipping %s: %s", path, reason)

    def _add(
        self, version: ModelVersion, runner: Runner, times: RunTimes, graph: str, cost: RunCost
    ) -> None:
        labels = (version.spec.name, str(version.spec.version))
        store = self._store(version.spec, runner)
        batcher = Batcher(
            runner,
            store,
            self.metrics,
            labels,
            self.executor,
            self.run_slots,
            self.config.max_batch_size,
            self.config.max_batch_delay / 1e6,
            self.config.inline_run_us / 1e6,
            times,
        )
        self._open.clear()
        self._models[version.key] = LoadedModel(
            version.spec, version.path, runner, store, batcher, cost, graph
        )
        self.metrics.model_events.labels(*labels, "load").inc()
        log.info(
            "loaded %s v%d on %s, session state on the %s",
            *version.key,
            runner.provider,
            "device" if isinstance(store, DeviceStateStore) else "host",
        )

    def _store(self, spec: ModelSpec, runner: Runner) -> Slots:
        """--session-state: auto keeps state where the model runs (CUDA: on the device)."""
        placement = self.config.session_state
        if isinstance(runner, OrtRunner) and (
            placement == "device" or (placement == "auto" and runner.device_type == "cuda")
        ):
            return DeviceStateStore(spec, self.config.max_sessions, runner)
        if placement == "device":
            raise ValueError(
                f"--session-state device binds ONNX Runtime values; {type(runner).__name__} "
                "keeps its state on the host (--session-state host)"
            )
        return StateStore(spec, self.config.max_sessions, runner)

    async def _unload(self, key: tuple[str, int]) -> None:
        model = self._models.pop(key)
        self._open.clear()
        await model.batcher.close()
        self.metrics.model_events.labels(*model.labels, "unload").inc()
        log.info("unloaded %s v%d", *key)

    async def close(self) -> None:
        for key in list(self._models):
            await self._unload(key)

    def serving(self) -> list[LoadedModel]:
        """Versions open for new work, by name then version."""
        return [m for k, m in sorted(self._models.items()) if not m.retiring]

    def loading(self) -> list[ModelSpec]:
        return [spec for _, spec in sorted(self._loading.items())]

    def versions(self, name: str) -> list[int]:
        """The versions of `name` open for new work, ascending (not to be modified)."""
        found = self._open.get(name)
        if found is None:
            found = sorted(
                version
                for (key, version), model in self._models.items()
                if key == name and not model.retiring
            )
            if found:  # names clients make up are not kept
                self._open[name] = found
        return found

    def knows(self, name: str) -> bool:
        """Whether some version of `name` is loaded or loading here."""
        return any(found == name for found, _ in self._models) or any(
            found == name for found, _ in self._loading
        )

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The named version, or the latest when version is 0."""
        if not name:
            raise NotFound("no model named; ListModels shows what is served")
        versions = self.versions(name)
        if not versions and any(loading == name for loading, _ in self._loading):
            raise Unavailable(f"model {name!r} is loading; retry shortly", retry_after=1.0)
        if not versions:
            known = ", ".join(sorted({m.spec.name for m in self.serving()})) or "none"
            raise NotFound(f"no model {name!r} (served: {known})")
        chosen = version or versions[-1]
        if (name, chosen) in self._loading:
            raise Unavailable(
                f"model {name!r} v{chosen} is loading; retry shortly", retry_after=1.0
            )
        model = self._models.get((name, chosen))
        if model is None or model.retiring:
            raise NotFound(f"model {name!r} has no version {chosen} (loaded: {versions})")
        return model


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:299] + "…"
