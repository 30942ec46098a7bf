"""The engine without gRPC: coalesced runs return exactly what separate runs return."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CollectorRegistry

from service.config import ServerConfig
from service.contract import read_spec
from service.engine import Engine
from service.errors import InvalidArgument
from service.metrics import Metrics
from service.registry import ModelRegistry
from service.runner import Runner
from service.sessions import SessionTable
from tests.conftest import EXPORTED


async def make_engine(**overrides) -> Engine:
    config = ServerConfig(repository=EXPORTED, **overrides)
    metrics = Metrics(CollectorRegistry())
    registry = ModelRegistry(config, metrics, ThreadPoolExecutor(2))
    await registry.sync()
    return Engine(config, registry, SessionTable(config.max_sessions, 60, metrics))


def test_concurrent_sessions_coalesce_and_match_unbatched_runs() -> None:
    rng = np.random.default_rng(11)
    xs = rng.integers(0, 2, (40, 12, 2)).astype(np.float32)
    runner = Runner(read_spec(EXPORTED / "binary_add" / "1"), EXPORTED / "binary_add" / "1",
                    "cpu", 1)
    expected = [runner.run(x[None], [np.zeros((1, 20), np.float32)] * 4)[0][0] for x in xs]

    async def main() -> tuple[list[np.ndarray], float]:
        engine = await make_engine(max_batch_size=16, max_batch_delay=2000)
        sessions = [engine.open_session("binary_add", 0, {}) for _ in xs]

        async def drive(i: int) -> np.ndarray:
            await asyncio.sleep(rng.uniform(0, 0.002))  # random arrival order
            outs = [(await engine.step([sessions[i].id], xs[i, t][None, None])).y[0]
                    for t in range(xs.shape[1])]
            return np.concatenate(outs)

        ys = await asyncio.gather(*(drive(i) for i in range(len(xs))))
        labels = {"model": "binary_add", "version": "1"}
        sample = engine.registry.metrics.registry.get_sample_value
        mean_rows = (sample("rnnserve_batch_size_sum", labels)
                     / sample("rnnserve_batch_size_count", labels))
        await engine.registry.close()
        return ys, mean_rows

    ys, mean_rows = asyncio.run(main())
    for got, want in zip(ys, expected):
        assert np.max(np.abs(got - want)) <= 1e-5  # every caller got its own rows back
    assert mean_rows > 1.5  # steps from different sessions really shared runs


def test_engine_validates_before_queueing() -> None:
    async def main() -> None:
        engine = await make_engine()
        try:
            await engine.predict("echo", 0, np.zeros((1, 2, 3), np.float32), [], {}, False)
        except InvalidArgument as exc:
            assert "[rows, timesteps, 1]" in str(exc)
        else:
            raise AssertionError("accepted 3 features for a 1-feature model")
        await engine.registry.close()

    asyncio.run(main())
