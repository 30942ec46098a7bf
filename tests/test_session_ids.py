"""Which ids of a message are worth looking for elsewhere: the batched check the engine uses for
messages of thousands of ids answers exactly as the per-id one, whatever the ids hold."""

from __future__ import annotations

import asyncio
import functools

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rnnserve.ops.metrics import Metrics
from rnnserve.state.sessions import SESSION_ID_HEX, SessionTable
from tests.test_batcher import echo_model

hex_ids = st.text("0123456789abcdef", min_size=SESSION_ID_HEX, max_size=SESSION_ID_HEX)
near_ids = st.one_of(
    st.text("0123456789abcdefABCDEF\n ", max_size=2 * SESSION_ID_HEX + 2),
    st.tuples(hex_ids, hex_ids).map("\n".join),  # two good ids in one: not an id
    hex_ids.map(lambda i: i + "\n"),
    hex_ids.map(lambda i: i[:-1]),
)


@functools.cache
def echo():
    return asyncio.run(echo_model())[0].get("echo")


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.one_of(hex_ids, hex_ids, near_ids), max_size=12),
    live=st.integers(0, 3),
    owner=st.sampled_from(["", "alice"]),
)
def test_the_batched_check_matches_the_per_id_one(ids: list[str], live: int, owner: str) -> None:
    table = SessionTable(10, 60, Metrics(CollectorRegistry()))
    opened = [table.open(echo(), None, owner=owner).id for _ in range(live)]
    named = ids + opened[:2] + ids[:2]
    expected = [i for i in dict.fromkeys(named) if table.adoptable(i, owner)]
    assert table.adoptable_among(named, owner) == expected
