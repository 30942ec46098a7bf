"""Wire tensors to numpy, checked before anything is allocated: one rule for both front doors.

Every dimension must be 1..2^31-1 and the element count must match the bytes sent, so a shape
with a zero next to a huge dimension, a product past int64 or hundreds of dimensions is a
client error (INVALID_ARGUMENT), never a numpy exception.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rnnserve.errors import InvalidArgument

MAX_DIMENSION = 2**31 - 1
FLOAT32 = np.dtype("<f4")


def element_count(shape: Sequence[int], what: str, max_dims: int) -> int:
    if not 1 <= len(shape) <= max_dims:
        raise InvalidArgument(
            f"{what}: shape has {len(shape)} dimensions; 1 to {max_dims} are accepted"
        )
    if min(shape) < 1 or max(shape) > MAX_DIMENSION:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} has a dimension outside "
            f"1..{MAX_DIMENSION}; tensors may not be empty"
        )
    return math.prod(shape)


def float32_array(data: bytes, shape: Sequence[int], what: str, max_dims: int) -> np.ndarray:
    """A read-only view of `data` (little-endian float32) with the given shape."""
    count = element_count(shape, what, max_dims)
    if len(data) != count * FLOAT32.itemsize:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} needs {count * FLOAT32.itemsize} "
            f"bytes of float32, got {len(data)}"
        )
    return np.frombuffer(data, FLOAT32).reshape(tuple(shape))
