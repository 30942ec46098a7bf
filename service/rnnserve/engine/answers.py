"""What a call's answer will weigh, refused before any work when it would not fit in a message.

Predict and every kind of step ask it first, so an answer that could never be sent costs no
run and no memory.
"""

from __future__ import annotations

from rnnserve.errors import ResourceExhausted
from rnnserve.models.contract import ModelSpec
from rnnserve.state.memory import FLOAT

MESSAGE_OVERHEAD = 1024
ROW_OVERHEAD = 16
"""Room in a response for its framing and names, and per row for its step count and framing."""


def answer_bytes(spec: ModelSpec, rows: int, steps: int, states: bool, limit: int) -> int:
    """The answer's tensor bytes: y for `rows` x `steps`, and the final states when `states`.
    RESOURCE_EXHAUSTED when the whole response would exceed `limit` (--max-message-bytes)."""
    nbytes = (
        FLOAT * rows * (steps * spec.outputs + (sum(s.size for s in spec.states) if states else 0))
    )
    if nbytes + MESSAGE_OVERHEAD + ROW_OVERHEAD * rows > limit:
        raise ResourceExhausted(
            f"the answer would be {nbytes:,} bytes, over the {limit:,}-byte message limit "
            "(--max-message-bytes): send fewer rows or timesteps per call"
            + (
                ", or ask for the last step only (OUTPUT_MODE_LAST_STEP)"
                if steps > 1 and states
                else ""
            )
        )
    return nbytes
