"""KServe v2 protobuf ⇄ the data plane's dataclasses: FP32 tensors (raw or typed contents),
request parameters, metadata and model configuration. Nothing of the protocol's rules: those
are in kserve_dataplane, for every door."""

from __future__ import annotations

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
from rnnserve.generated.inference import grpc_service_pb2 as v2
from rnnserve.generated.inference import model_config_pb2 as mc

MAX_DIMS = 8


def request_inputs(request: v2.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input as a float32 array, from raw_input_contents or fp32_contents."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(request.raw_input_contents)} entries "
            f"for {len(request.inputs)} inputs"
        )
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        what = f"input {tensor.name[:64]!r}"
        if tensor.datatype != FP32:
            raise InvalidArgument(f"{what} is {tensor.datatype[:16]!r}; rnnserve models take FP32")
        if request.raw_input_contents:
            array = float32_array(request.raw_input_contents[i], tensor.shape, what, MAX_DIMS)
        else:
            count = element_count(tensor.shape, what, MAX_DIMS)
            values = tensor.contents.fp32_contents
            if len(values) != count:
                raise InvalidArgument(
                    f"{what}: shape {list(tensor.shape)} needs {count} "
                    f"fp32_contents, got {len(values)}"
                )
            array = np.asarray(values, np.float32).reshape(tuple(tensor.shape))
        if tensor.name in arrays:
            raise InvalidArgument(f"{what} appears twice")
        arrays[tensor.name] = array
    return arrays


def infer_request(message: v2.ModelInferRequest) -> InferRequest:
    """Every input as float32 and every parameter that is set (one step pays this per call:
    plain loops, no comprehension frames)."""
    parameters: dict[str, Parameter] = {}
    for name, param in message.parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if kind:
            parameters[name] = getattr(param, kind)
    outputs = []
    for output in message.outputs:
        outputs.append(output.name)
    return InferRequest(
        message.model_name,
        message.model_version,
        message.id,
        request_inputs(message),
        parameters,
        outputs,
    )


def infer_response(answer: InferResponse) -> v2.ModelInferResponse:
    """The outputs as raw FP32 contents."""
    reply = v2.ModelInferResponse(
        model_name=answer.model_name, model_version=answer.model_version, id=answer.id
    )
    for name, output in answer.outputs:
        array = np.ascontiguousarray(output, FLOAT32)
        reply.outputs.add(name=name, datatype=FP32, shape=array.shape)
        reply.raw_output_contents.append(array.tobytes())
    return reply


def metadata_message(metadata: ModelMetadata) -> v2.ModelMetadataResponse:
    tensor = v2.ModelMetadataResponse.TensorMetadata
    return v2.ModelMetadataResponse(
        name=metadata.name,
        versions=metadata.versions,
        platform=metadata.platform,
        inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs],
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs],
    )


def config_message(config: ModelConfig) -> mc.ModelConfig:
    fp32 = mc.TYPE_FP32
    return mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=0,
        input=[
            mc.ModelInput(name=t.name, data_type=fp32, dims=t.dims, optional=t.optional)
            for t in config.inputs
        ],
        output=[mc.ModelOutput(name=t.name, data_type=fp32, dims=t.dims) for t in config.outputs],
        sequence_batching=mc.ModelSequenceBatching(
            max_sequence_idle_microseconds=config.max_sequence_idle_microseconds,
            state=[
                mc.ModelSequenceBatching.State(
                    input_name=s.input_name,
                    output_name=s.output_name,
                    data_type=fp32,
                    dims=s.dims,
                )
                for s in config.states
            ],
        ),
    )
