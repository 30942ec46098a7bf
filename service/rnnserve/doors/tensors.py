"""rnnserve.v1 Tensor ⇄ numpy, with the wire checks (datatype, shape against byte count).

Shared by the server and the client: no server state is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from rnnserve.doors.shapes import FLOAT32, float32_array
from rnnserve.errors import InvalidArgument
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb

MAX_DIMS = 4
DATATYPES = {pb.DATA_TYPE_FP32: FLOAT32}


def to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """A request's tensor as a read-only view of its bytes; INVALID_ARGUMENT if they do not fit
    its header, or it is empty."""
    _check_datatype(tensor, what)
    return float32_array(tensor.data, tensor.shape, what, MAX_DIMS)


def answer_array(tensor: pb.Tensor) -> np.ndarray:
    """A server's tensor (the client's side): may be empty, e.g. y when every row failed."""
    _check_datatype(tensor, "answer")
    return np.frombuffer(tensor.data, DATATYPES[tensor.datatype]).reshape(tuple(tensor.shape))


def _check_datatype(tensor: pb.Tensor, what: str) -> None:
    if tensor.datatype not in DATATYPES:
        name = (
            pb.DataType.Name(tensor.datatype)
            if tensor.datatype in pb.DataType.values()
            else str(tensor.datatype)
        )
        raise InvalidArgument(
            f"{what}: datatype {name} is not served; rnnserve models take "
            "DATA_TYPE_FP32 (set Tensor.datatype)"
        )


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> pb.Tensor:
    """Written into the message in place: a streamed answer must not build and copy a second."""
    tensor.datatype = pb.DATA_TYPE_FP32
    tensor.shape.extend(array.shape)
    tensor.data = np.ascontiguousarray(array, FLOAT32).tobytes()
    return tensor


def to_tensor(array: np.ndarray | Sequence) -> pb.Tensor:
    return fill_tensor(pb.Tensor(), np.asarray(array, FLOAT32))


def to_arrays(tensors: Mapping[str, pb.Tensor], what: str) -> dict[str, np.ndarray]:
    return {name: to_array(t, f"{what}[{name}]") for name, t in tensors.items()}


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, pb.Tensor]:
    return {name: to_tensor(a) for name, a in arrays.items()}
