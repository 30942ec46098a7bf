"""Device-resident session state (--session-state device) on the CPU provider: the gather, run
and in-place scatter graphs that keep state on a GPU, held bit-equal to the host store.

CUDA itself is checked by bench/gpu.py on a GPU machine; CI has none. What runs here is the same
code on CPU OrtValues, so any difference in slots, rows, step counts or ordering shows up.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnserve.models.runner import OrtRunner, providers_for
from rnnserve.state.device_state import DeviceStateStore
from rnnserve.state.state_store import StateStore
from tests.conftest import EXPORTED, running, spec

MODELS = ("echo", "binary_add", "digits", "forecast")
SLOTS = 6


@pytest.fixture(scope="module")
def runners() -> dict[str, OrtRunner]:
    return {name: OrtRunner(spec(name), EXPORTED / name / "1", "cpu", 1) for name in MODELS}


step = st.tuples(
    st.just("step"),
    st.lists(st.integers(0, SLOTS - 1), min_size=1, max_size=4, unique=True),
    st.integers(1, 3),
    st.booleans(),
    st.integers(0, 4),
)
"""Rows' slots, timesteps, inline (cached buffers) or not, and which row's caller left (>= rows:
none did): its final state must not be committed."""
write = st.tuples(st.just("write"), st.integers(0, SLOTS - 1), st.integers(0, 2**16))
reopen = st.tuples(st.just("reopen"), st.integers(0, SLOTS - 1))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(MODELS),
    ops=st.lists(st.one_of(step, write, reopen), max_size=20),
    seed=st.integers(0, 2**16),
)
def test_device_store_equals_host_store(runners, name, ops, seed) -> None:
    """Any sequence of steps (batched, inline or not, some callers gone), restores and reopened
    slots leaves both stores bit-equal: outputs, states and step counts."""
    runner = runners[name]
    host, device = (
        StateStore(runner.spec, SLOTS, runner),
        DeviceStateStore(runner.spec, SLOTS, runner),
    )
    assert [host.allocate() for _ in range(SLOTS)] == [device.allocate() for _ in range(SLOTS)]
    rng = np.random.default_rng(seed)
    for op in ops:
        if op[0] == "step":
            _, slots, k, inline, gone = op
            xs = [
                rng.standard_normal((1, k, runner.spec.features)).astype(np.float32) for _ in slots
            ]
            y_host, finals_host, _ = host.step(xs, slots, inline)
            y_host = y_host.copy()
            y_device, finals_device, _ = device.step(xs, slots, inline)
            assert np.array_equal(y_host, y_device)
            for store, finals in ((host, finals_host), (device, finals_device)):
                if gone >= len(slots):
                    store.commit(slots, finals, k)
                    continue
                for row, slot in enumerate(slots):
                    if row != gone:
                        store.commit_rows([slot], finals, row, k)
        elif op[0] == "write":
            states = [
                np.random.default_rng(op[2]).standard_normal(s.size).astype(np.float32)
                for s in runner.spec.states
            ]
            host.write(op[1], states)
            device.write(op[1], states)
        else:
            for store in (host, device):
                store.release(op[1])
                assert store.allocate() == op[1]
    assert np.array_equal(host.steps, device.steps)
    for slot in range(SLOTS):
        for a, b in zip(host.read(slot), device.read(slot), strict=True):
            assert np.array_equal(a, b)


def test_scatter_writes_in_place(runners) -> None:
    """The scatter graph's output is the table itself: a step costs the same whatever the
    capacity (a copied table would cost ~4 ms at 1M slots, not ~20 µs)."""
    runner = runners["echo"]
    store = DeviceStateStore(runner.spec, 1_000_000, runner)
    slot = store.allocate()
    table = store.tables[0]
    before = table.data_ptr()
    y, finals, _ = store.step([np.ones((1, 1, 1), np.float32)], [slot], True)
    store.commit([slot], finals, 1)
    assert store.tables[0].data_ptr() == before
    assert not np.array_equal(store.read(slot)[0], np.zeros(runner.spec.states[0].size))
    assert store.steps[slot] == 1


def test_served_with_device_state_over_the_wire(client) -> None:
    """Every model through a server keeping state in ORT values: streamed, multi-session,
    restored, snapshot and reset sessions answer bit-equal to the host-state server."""
    rng = np.random.default_rng(3)
    with running(session_state="device") as srv, srv.client() as device:
        for name in MODELS:
            features = spec(name).features
            x = rng.standard_normal((3, 9, features)).astype(np.float32)
            answers = []
            for c in (client, device):
                ids = [c.open_session(name).session_id for _ in range(3)]
                streamed = np.concatenate(
                    [c.step_many(ids, x[:, t : t + 3]).y for t in range(0, 9, 3)], axis=1
                )
                snapshot = c.snapshot(ids[0])
                restored = c.open_session(name, initial_states=snapshot).session_id
                more = c.step(restored, x[1, :4])
                c.reset(ids[1])
                after_reset = c.step(ids[1], x[2, :2])
                with c.stream(name) as stream:
                    one_by_one = np.concatenate([stream.step(x[0, t]) for t in range(9)])
                answers.append(
                    [
                        streamed,
                        more,
                        after_reset,
                        one_by_one,
                        *(snapshot[k] for k in sorted(snapshot)),
                    ]
                )
                whole = c.predict(name, x).y
                assert np.max(np.abs(streamed - whole)) <= 1e-5
                for session_id in (*ids, restored):
                    c.close_session(session_id)
            for a, b in zip(*answers, strict=True):
                assert np.array_equal(a, b), name


def test_cuda_requested_without_cuda() -> None:
    """--device cuda where the CUDA provider cannot run stops the server with one line; auto
    runs on CPU."""
    assert providers_for("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="--device cuda: "):
        providers_for("cuda")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve",
            "serve",
            "--device",
            "cuda",
            "--workers",
            "1",
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            "--repository",
            str(EXPORTED),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "cannot serve: --device cuda: this ONNX Runtime" in result.stderr
    assert "Traceback" not in result.stderr
