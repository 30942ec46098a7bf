"""KServe v2 REST bodies ⇄ the data plane's dataclasses: JSON tensors, and Triton's binary
tensor data extension (a JSON header of `Inference-Header-Content-Length` bytes, then each
binary tensor's bytes in order).

Every rule that a malformed body could break is checked here, before any array is made: the
JSON's structure, each tensor's datatype, shape and element count, and the binary sizes against
the bytes that came. A failure is INVALID_ARGUMENT naming the tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import numpy as np

from rnnserve.doors.kserve_dataplane import (
    FP32,
    InferRequest,
    InferResponse,
    ModelConfig,
    ModelMetadata,
    Parameter,
)
from rnnserve.doors.shapes import FLOAT32, element_count, float32_array
from rnnserve.errors import InvalidArgument

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMS = 8
NAME_CHARS = 64
"""Characters of a client's tensor name quoted in an error."""


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _parameters(value: Any, what: str) -> dict[str, Parameter]:
    if value is None:
        return {}
    found = _object(value, what)
    for name, item in found.items():
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidArgument(f"{what}: {name[:NAME_CHARS]!r} must be a bool, number or string")
    return found


def _shape(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in value
    ):
        raise InvalidArgument(f"{what}: shape must be a list of integers")
    return value


def _json_data(data: Any, shape: list[int], what: str) -> np.ndarray:
    """A tensor's "data": numbers, flat or nested row-major, exactly as many as the shape."""
    count = element_count(shape, what, MAX_DIMS)
    if not isinstance(data, list):
        raise InvalidArgument(f"{what}: data must be a list of numbers")
    try:
        array = np.array(data)
    except ValueError:  # ragged nesting
        raise InvalidArgument(f"{what}: data is not a list of numbers") from None
    if array.dtype.kind not in "iuf":  # strings, booleans, objects (mixed or ragged)
        raise InvalidArgument(f"{what}: data must hold numbers only, for FP32")
    if array.size != count:
        raise InvalidArgument(f"{what}: shape {shape} needs {count} values, got {array.size}")
    return array.astype(np.float32).reshape(shape)


def infer_request(
    body: bytes, header_length: str | None, model_name: str, model_version: str
) -> tuple[InferRequest, set[str] | None]:
    """The request, and the outputs to send as binary data (None: every one)."""
    json_end = len(body)
    if header_length is not None:
        if not header_length.isascii() or not header_length.isdigit():
            raise InvalidArgument(f"{HEADER_LENGTH} must be a byte count")
        json_end = int(header_length)
        if json_end > len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} is {json_end}, but the body has {len(body)} bytes"
            )
    try:
        doc = _object(json.loads(body[:json_end]), "the request body")
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep
        raise InvalidArgument("the request body is not a JSON object") from None
    parameters = _parameters(doc.get("parameters"), "parameters")
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("id must be a string")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("inputs must be a list of tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = json_end
    for i, item in enumerate(inputs):
        tensor = _object(item, f"inputs[{i}]")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"inputs[{i}]: name must be a string")
        what = f"input {name[:NAME_CHARS]!r}"
        datatype = tensor.get("datatype")
        if datatype != FP32:
            raise InvalidArgument(f"{what} is {str(datatype)[:16]!r}; rnnserve models take {FP32}")
        shape = _shape(tensor.get("shape"), what)
        size = _parameters(tensor.get("parameters"), f"{what} parameters").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"{what}: binary_data_size must be a byte count")
            if offset + size > len(body):
                raise InvalidArgument(
                    f"{what}: binary_data_size {size} runs past the end of the body"
                )
            array = float32_array(body[offset : offset + size], shape, what, MAX_DIMS)
            offset += size
        else:
            array = _json_data(tensor.get("data"), shape, what)
        if name in arrays:
            raise InvalidArgument(f"{what} appears twice")
        arrays[name] = array
    if offset != len(body):
        raise InvalidArgument(
            f"the body has {len(body) - offset} bytes after the tensors its JSON announces"
        )
    wanted = doc.get("outputs", [])
    if not isinstance(wanted, list):
        raise InvalidArgument("outputs must be a list")
    names: list[str] = []
    binary: set[str] | None = None if parameters.get("binary_data_output") else set()
    for i, item in enumerate(wanted):
        output = _object(item, f"outputs[{i}]")
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidArgument(f"outputs[{i}]: name must be a string")
        names.append(name)
        own = _parameters(output.get("parameters"), f"output {name[:NAME_CHARS]!r} parameters")
        if binary is not None and own.get("binary_data"):
            binary.add(name)
    return InferRequest(model_name, model_version, request_id, arrays, parameters, names), binary


def index_request(body: bytes) -> bool:
    """Whether a repository index request asks for ready models only: an empty body, or a JSON
    object whose optional "ready" is a bool (Triton's repository extension)."""
    if not body.strip():
        return False
    try:
        doc = _object(json.loads(body), "the request body")
    except (ValueError, RecursionError):
        raise InvalidArgument("the request body is not a JSON object") from None
    ready = doc.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidArgument("ready must be true or false")
    return ready


def infer_response(answer: InferResponse, binary: set[str] | None) -> tuple[bytes, int | None]:
    """The body, and the length of its JSON part when binary tensors follow it (for the
    `Inference-Header-Content-Length` header); None for a JSON-only body."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, output in answer.outputs:
        array = np.ascontiguousarray(output, FLOAT32)
        tensor: dict[str, Any] = {"name": name, "datatype": FP32, "shape": list(array.shape)}
        if binary is None or name in binary:
            chunks.append(array.tobytes())
            tensor["parameters"] = {"binary_data_size": array.nbytes}
        else:
            tensor["data"] = [None if math.isnan(v) else v for v in array.ravel().tolist()]
        outputs.append(tensor)
    header = json.dumps(
        {
            "model_name": answer.model_name,
            "model_version": answer.model_version,
            **({"id": answer.id} if answer.id else {}),
            "outputs": outputs,
        },
        separators=(",", ":"),
    ).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def metadata_json(metadata: ModelMetadata) -> dict[str, Any]:
    return asdict(metadata)


def config_json(config: ModelConfig) -> dict[str, Any]:
    """As Triton's HTTP API writes a model configuration (its protobuf's JSON form)."""
    return {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": 0,
        "input": [
            {"name": t.name, "data_type": "TYPE_FP32", "dims": t.dims, "optional": t.optional}
            for t in config.inputs
        ],
        "output": [
            {"name": t.name, "data_type": "TYPE_FP32", "dims": t.dims} for t in config.outputs
        ],
        "sequence_batching": {
            "max_sequence_idle_microseconds": config.max_sequence_idle_microseconds,
            "state": [
                {
                    "input_name": s.input_name,
                    "output_name": s.output_name,
                    "data_type": "TYPE_FP32",
                    "dims": s.dims,
                }
                for s in config.states
            ],
        },
    }
