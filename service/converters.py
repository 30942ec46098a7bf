"""Protobuf ⇄ numpy for the native API, with the wire-format checks (shape vs byte count)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from rnnserve.generated.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.registry import LoadedModel
from rnnserve.sessions import Session
from rnnserve.shapes import FLOAT32, float32_array

MAX_DIMS = 4


def to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    return float32_array(tensor.data, tensor.shape, what, MAX_DIMS)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    return fill_tensor(pb.Tensor(), array)


def fill_tensor(tensor: pb.Tensor, array: np.ndarray) -> pb.Tensor:
    tensor.shape.extend(array.shape)
    tensor.data = np.ascontiguousarray(array, FLOAT32).tobytes()
    return tensor


def to_arrays(tensors: Mapping[str, pb.Tensor], what: str) -> dict[str, np.ndarray]:
    return {name: to_array(t, f"{what}[{name}]") for name, t in tensors.items()}


def to_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, pb.Tensor]:
    return {name: to_tensor(a) for name, a in arrays.items()}


def model_info(model: LoadedModel, versions: list[int]) -> pb.ModelInfo:
    spec = model.spec
    return pb.ModelInfo(
        name=spec.name, version=spec.version, versions=versions, task=spec.task,
        description=spec.description, cell=spec.cell, layers=spec.layers, units=spec.units,
        features=spec.features, outputs=spec.outputs, output_kind=spec.output_kind,
        states=[pb.StateInfo(name=s.input, output=s.output, size=s.size) for s in spec.states],
        ready=model.ready)


def session_info(session: Session, idle_timeout: float) -> pb.SessionInfo:
    return pb.SessionInfo(session_id=session.id, model=session.model.spec.name,
                          version=session.model.spec.version, steps=session.steps,
                          idle_timeout_seconds=idle_timeout)
