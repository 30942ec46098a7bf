"""The KServe v2 protocol with Triton's sequence extension, on plain dataclasses: what every v2
door (gRPC today, HTTP/REST next) answers, whatever its wire format.

A door decodes its wire into these classes and encodes them back; the rules live here once:
versions as text, which inputs are required, a sequence_id as a session, which outputs are
sent, the metadata and configuration each model reports.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from rnnserve import __version__
from rnnserve.engine.engine import Engine, ModelView
from rnnserve.errors import InvalidArgument
from rnnserve.models.contract import INPUT_NAME, MAX_VERSION_DIGITS, OUTPUT_NAME, ModelSpec
from rnnserve.ops.metrics import Call

FP32 = "FP32"
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["sequence", "model_configuration", "model_repository"]
MAX_SEQUENCE_ID = 256
"""Characters in a string sequence_id: it is hashed into a session id, never stored."""
Parameter = bool | int | str | float


@dataclass
class InferRequest:
    model_name: str
    model_version: str
    """Text, as the protocol sends it: "" for the latest."""
    id: str = ""
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    """Every input as float32, by name (the door decoded and checked its shape and bytes)."""
    parameters: dict[str, Parameter] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    """The outputs asked for; every output when empty."""


@dataclass
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[tuple[str, np.ndarray]]
    """Each output asked for, in the order asked, as float32."""


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]
    """-1 for a dimension of any size."""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True)
class RepositoryModel:
    name: str
    version: str
    state: str


@dataclass(frozen=True)
class ConfigTensor:
    name: str
    dims: list[int]
    optional: bool = False


@dataclass(frozen=True)
class ConfigState:
    """A state Triton's sequence batcher would carry: its input, its output, its size."""

    input_name: str
    output_name: str
    dims: list[int]


@dataclass(frozen=True)
class ModelConfig:
    """What Triton's model configuration says of a served model (all FP32, no batch
    dimension of Triton's own: the batch is the first dimension of x)."""

    name: str
    platform: str
    backend: str
    inputs: list[ConfigTensor]
    outputs: list[ConfigTensor]
    max_sequence_idle_microseconds: int
    states: list[ConfigState]


def model_version(text: str) -> int:
    if not text:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_VERSION_DIGITS):
        raise InvalidArgument(
            f"model_version {text[:32]!r} is not a version number (digits "
            "0-9; empty for the latest)"
        )
    return int(text)


def sequence_session_id(client: str, model: str, sequence_id: int | str) -> str:
    """The session behind a v2 sequence: derived, not stored, so every replica (also one that
    adopts it after a handoff) finds the same session for the same (client, model, sequence
    id). The client is part of it, so another client's sequence 1 is another session."""
    kind = "str" if isinstance(sequence_id, str) else "int"
    key = f"{client}\0{model}\0{kind}\0{sequence_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _metadata(spec: ModelSpec, versions: list[int]) -> ModelMetadata:
    return ModelMetadata(
        spec.name,
        [str(v) for v in versions],
        PLATFORM,
        [
            TensorMetadata(INPUT_NAME, FP32, [-1, -1, spec.features]),
            *(TensorMetadata(s.input, FP32, [-1, s.size]) for s in spec.states),
        ],
        [
            TensorMetadata(OUTPUT_NAME, FP32, [-1, -1, spec.outputs]),
            *(TensorMetadata(s.output, FP32, [-1, s.size]) for s in spec.states),
        ],
    )


def _config(spec: ModelSpec, idle_timeout: float) -> ModelConfig:
    return ModelConfig(
        spec.name,
        PLATFORM,
        "onnxruntime",
        [
            ConfigTensor(INPUT_NAME, [-1, -1, spec.features]),
            *(ConfigTensor(s.input, [-1, s.size], optional=True) for s in spec.states),
        ],
        [
            ConfigTensor(OUTPUT_NAME, [-1, -1, spec.outputs]),
            *(ConfigTensor(s.output, [-1, s.size]) for s in spec.states),
        ],
        int(idle_timeout * 1e6),
        [ConfigState(s.input, s.output, [s.size]) for s in spec.states],
    )


def _answer(
    spec: ModelSpec, request: InferRequest, outputs: dict[str, np.ndarray]
) -> InferResponse:
    """Only the requested outputs (all when none are named)."""
    wanted = request.outputs or list(outputs)
    if request.outputs and not outputs.keys() >= set(wanted):
        unknown = sorted(set(wanted) - outputs.keys())
        raise InvalidArgument(
            f"unknown output {', '.join(unknown)}; {spec.name} has {', '.join(outputs)}"
        )
    return InferResponse(
        spec.name,
        str(spec.version),
        request.id,
        list(zip(wanted, map(outputs.__getitem__, wanted))),
    )


class DataPlane:
    """The v2 protocol's calls, each answered from the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def server_live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return self.engine.ready

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("rnnserve", __version__, EXTENSIONS)

    def model_ready(self, name: str, version: str) -> bool:
        return self.engine.model_ready(name, model_version(version))

    def model_metadata(self, name: str, version: str, call: Call) -> ModelMetadata:
        model = self.model(name, version, call)
        return _metadata(model.spec, model.versions)

    def model_config(self, name: str, version: str, call: Call) -> ModelConfig:
        model = self.model(name, version, call)
        return _config(model.spec, self.engine.idle_timeout)

    def repository_index(self, ready_only: bool) -> list[RepositoryModel]:
        return [
            RepositoryModel(m.spec.name, str(m.spec.version), m.state)
            for m in self.engine.models()
            if m.ready or not ready_only
        ]

    def model(self, name: str, version: str, call: Call) -> ModelView:
        """The model version asked for, its labels on the call's metrics. A door asks it
        before it decodes an inference request's tensors, so an unknown model is NOT_FOUND
        whatever the tensors hold, and their errors are counted under their model."""
        call.model = self.engine.model_label(name)
        model = self.engine.describe(name, model_version(version) if version else 0)
        call.model, call.version = model.labels
        return model

    async def infer(self, model: ModelView, request: InferRequest, call: Call) -> InferResponse:
        """A whole-sequence prediction, or with a sequence_id one step of that sequence, of
        `model` (what `model` answered for the request's name and version)."""
        inputs = request.inputs
        if INPUT_NAME not in inputs:
            raise InvalidArgument(
                f"input {INPUT_NAME!r} (FP32 [batch, time, {model.spec.features}]) is required"
            )
        x = inputs.pop(INPUT_NAME)
        sequence_id = request.parameters.get("sequence_id")
        if not sequence_id:  # Triton: 0 or "" means no sequence
            result = await self.engine.predict(
                model.spec.name, model.spec.version, x, [], inputs, last_only=False
            )
            outputs = {
                OUTPUT_NAME: result.y,
                **{s.output: result.final_states[s.input] for s in model.spec.states},
            }
            return _answer(model.spec, request, outputs)
        return await self._sequence_step(model, request, sequence_id, x, inputs, call.client)

    async def _sequence_step(
        self,
        model: ModelView,
        request: InferRequest,
        sequence_id: Parameter,
        x: np.ndarray,
        states: dict[str, np.ndarray],
        client: str,
    ) -> InferResponse:
        spec = model.spec
        if isinstance(sequence_id, (float, bool)) or (
            isinstance(sequence_id, str) and len(sequence_id) > MAX_SEQUENCE_ID
        ):
            raise InvalidArgument(
                "sequence_id must be an integer or a string of at most "
                f"{MAX_SEQUENCE_ID} characters"
            )
        wanted = set(request.outputs)
        step = await self.engine.sequence_step(
            spec.name,
            spec.version,
            sequence_session_id(client, spec.name, sequence_id),
            x,
            states,
            start=bool(request.parameters.get("sequence_start")),
            end=bool(request.parameters.get("sequence_end")),
            with_states=not wanted or bool(wanted - {OUTPUT_NAME}),
            owner=client,
        )
        outputs = {OUTPUT_NAME: step.y}
        if step.states is not None:
            outputs.update({s.output: step.states[s.input][None] for s in spec.states})
        return _answer(spec, request, outputs)
