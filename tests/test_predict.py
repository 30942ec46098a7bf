"""Whole-sequence prediction through the real server."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.client import Client
from tests.conftest import golden, spec

MODELS = ["echo", "binary_add", "digits", "forecast"]


def close(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / (1 + np.abs(b))))


@pytest.mark.parametrize("name", MODELS)
def test_predict_reproduces_golden_vectors(client: Client, name: str) -> None:
    data = golden(name)
    s = spec(name)
    states = {st.input: data[st.input] for st in s.states}
    result = client.predict(name, data["x"], initial_states=states)
    assert close(result.y, data["expected_y"]) <= 1e-5
    for st in s.states:
        assert close(result.final_states[st.input], data[f"expected_{st.output}"]) <= 1e-5


def test_binary_add_all_pairs_in_one_call(client: Client) -> None:
    a, b = (g.reshape(-1) for g in np.meshgrid(np.arange(128), np.arange(128)))
    bits = lambda v: (v[:, None] >> np.arange(8)) & 1  # noqa: E731
    x = np.stack([bits(a), bits(b)], axis=-1).astype(np.float32)
    y = client.predict("binary_add", x).y
    sums = (np.rint(y[..., 0]).astype(int) << np.arange(8)).sum(axis=1)
    assert np.array_equal(sums, a + b)


def test_ragged_batch_equals_each_sequence_alone(client: Client) -> None:
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 2, (n, 2)).astype(np.float32) for n in (8, 3, 5, 8, 1)]
    together = client.predict("binary_add", seqs)
    last = client.predict("binary_add", seqs, last_only=True)
    for i, seq in enumerate(seqs):
        alone = client.predict("binary_add", seq[None])
        n = len(seq)
        assert close(together.y[i, :n], alone.y[0]) <= 1e-5
        assert np.all(together.y[i, n:] == 0)
        assert close(last.y[i], alone.y[0, -1]) <= 1e-5
        for name, state in alone.final_states.items():
            assert close(together.final_states[name][i], state[0]) <= 1e-5


def test_initial_states_continue_a_sequence(client: Client) -> None:
    x = np.random.default_rng(4).uniform(320, 360, (2, 30, 1)).astype(np.float32)
    whole = client.predict("forecast", x)
    first = client.predict("forecast", x[:, :12])
    rest = client.predict("forecast", x[:, 12:], initial_states=first.final_states)
    assert close(np.concatenate([first.y, rest.y], axis=1), whole.y) <= 1e-5
    assert whole.version == 1 and whole.model == "forecast"


@pytest.mark.parametrize(
    "x", [[[1, 1]], [], [[[1.0]], [1.0]], [np.ones((2, 1)), np.ones((2, 2))], [np.ones((0, 2))]]
)
def test_the_client_refuses_an_x_that_is_no_batch_of_sequences(client, x) -> None:
    """A 1-D sequence used to be read as timesteps of a broadcast row ([[1, 1]]: 2 steps of
    [1, 1]), an empty list raised a bare max() error."""
    with pytest.raises(ValueError, match="predict's x: a"):
        client.predict("binary_add", x)
