"""KServe v2 protobuf ⇄ numpy: FP32 tensors (raw or typed contents) and request parameters."""

from __future__ import annotations

import numpy as np

from rnnserve.doors.shapes import FLOAT32, element_count, float32_array
from rnnserve.errors import InvalidArgument
from rnnserve.generated.inference import grpc_service_pb2 as v2
from rnnserve.generated.inference import model_config_pb2 as mc
from rnnserve.models.contract import INPUT_NAME, OUTPUT_NAME, ModelSpec

FP32 = "FP32"
PLATFORM = "onnxruntime_onnx"
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


def parameter(request: v2.ModelInferRequest, name: str) -> bool | int | str | float | None:
    if name not in request.parameters:
        return None
    param = request.parameters[name]
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def response(
    model: ModelSpec, request: v2.ModelInferRequest, outputs: dict[str, np.ndarray]
) -> v2.ModelInferResponse:
    """Only the requested outputs (all when none are named), as raw FP32."""
    wanted = [o.name for o in request.outputs] or list(outputs)
    unknown = sorted(set(wanted) - set(outputs))
    if unknown:
        raise InvalidArgument(
            f"unknown output {', '.join(unknown)}; {model.name} has {', '.join(outputs)}"
        )
    reply = v2.ModelInferResponse(
        model_name=model.name, model_version=str(model.version), id=request.id
    )
    for name in wanted:
        array = np.ascontiguousarray(outputs[name], FLOAT32)
        reply.outputs.add(name=name, datatype=FP32, shape=array.shape)
        reply.raw_output_contents.append(array.tobytes())
    return reply


def metadata(model: ModelSpec, versions: list[int]) -> v2.ModelMetadataResponse:
    tensor = v2.ModelMetadataResponse.TensorMetadata
    return v2.ModelMetadataResponse(
        name=model.name,
        versions=[str(v) for v in versions],
        platform=PLATFORM,
        inputs=[
            tensor(name=INPUT_NAME, datatype=FP32, shape=[-1, -1, model.features]),
            *(tensor(name=s.input, datatype=FP32, shape=[-1, s.size]) for s in model.states),
        ],
        outputs=[
            tensor(name=OUTPUT_NAME, datatype=FP32, shape=[-1, -1, model.outputs]),
            *(tensor(name=s.output, datatype=FP32, shape=[-1, s.size]) for s in model.states),
        ],
    )


def config(model: ModelSpec, idle_timeout: float) -> mc.ModelConfig:
    fp32 = mc.TYPE_FP32
    return mc.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=0,
        input=[
            mc.ModelInput(name=INPUT_NAME, data_type=fp32, dims=[-1, -1, model.features]),
            *(
                mc.ModelInput(name=s.input, data_type=fp32, dims=[-1, s.size], optional=True)
                for s in model.states
            ),
        ],
        output=[
            mc.ModelOutput(name=OUTPUT_NAME, data_type=fp32, dims=[-1, -1, model.outputs]),
            *(
                mc.ModelOutput(name=s.output, data_type=fp32, dims=[-1, s.size])
                for s in model.states
            ),
        ],
        sequence_batching=mc.ModelSequenceBatching(
            max_sequence_idle_microseconds=int(idle_timeout * 1e6),
            state=[
                mc.ModelSequenceBatching.State(
                    input_name=s.input, output_name=s.output, data_type=fp32, dims=[s.size]
                )
                for s in model.states
            ],
        ),
    )
