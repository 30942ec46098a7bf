"""The `exported/` format: the one place that defines model.json and the tensor names.

Training writes it, the server reads it, and outside tools may rely on it:

    exported/<name>/<version>/model.onnx   the graph (native LSTM/GRU/RNN ops)
    exported/<name>/<version>/model.json   the ModelSpec below, plus free-form training facts
    exported/<name>/<version>/golden.npz   inputs, initial states and the expected outputs

The graph takes `x` float32 [batch, time, features] and one [batch, units] input per recurrent
state tensor, and returns `y` float32 [batch, time, outputs] and the matching final states.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

INPUT_NAME = "x"
OUTPUT_NAME = "y"
MODEL_FILE = "model.onnx"
SPEC_FILE = "model.json"
GOLDEN_FILE = "golden.npz"
CELLS = ("lstm", "gru", "simple_rnn")
OUTPUT_KINDS = ("probabilities", "sigmoid", "regression")


def state_names(cell: str, layer: int) -> list[tuple[str, str]]:
    """(input name, output name) of each state tensor a layer carries: h, plus c for LSTM."""
    kinds = ("h", "c") if cell == "lstm" else ("h",)
    return [(f"{k}{layer}", f"{k}{layer}_out") for k in kinds]


@dataclass(frozen=True)
class StateSpec:
    input: str
    output: str
    size: int


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: int
    task: str
    description: str
    cell: str
    layers: int
    units: int
    features: int
    outputs: int
    output_kind: str
    states: tuple[StateSpec, ...]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """model.json layout: the fields the server needs, then training facts in `extra`."""
        doc: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "description": self.description,
            "cell": self.cell,
            "layers": self.layers,
            "units": self.units,
            "input": {"name": INPUT_NAME, "features": self.features},
            "output": {"name": OUTPUT_NAME, "size": self.outputs, "kind": self.output_kind},
            "states": [asdict(s) for s in self.states],
        }
        doc.update(self.extra)
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelSpec:
        known = {"name", "version", "task", "description", "cell", "layers", "units", "input",
                 "output", "states"}
        missing = sorted(known - doc.keys())
        if missing:
            raise ValueError(f"model.json lacks {', '.join(missing)}")
        spec = cls(
            name=str(doc["name"]),
            version=int(doc["version"]),
            task=str(doc["task"]),
            description=str(doc["description"]),
            cell=str(doc["cell"]),
            layers=int(doc["layers"]),
            units=int(doc["units"]),
            features=int(doc["input"]["features"]),
            outputs=int(doc["output"]["size"]),
            output_kind=str(doc["output"]["kind"]),
            states=tuple(StateSpec(str(s["input"]), str(s["output"]), int(s["size"]))
                         for s in doc["states"]),
            extra={k: v for k, v in doc.items() if k not in known},
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"cell {self.cell!r} is not one of {CELLS}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output kind {self.output_kind!r} is not one of {OUTPUT_KINDS}")
        if min(self.layers, self.units, self.features, self.outputs) < 1:
            raise ValueError("layers, units, features and outputs must be positive")
        if not self.states:
            raise ValueError("a recurrent model has at least one state tensor")


def version_dir(root: Path, name: str, version: int) -> Path:
    return root / name / str(version)


def read_spec(directory: Path) -> ModelSpec:
    return ModelSpec.from_json(json.loads((directory / SPEC_FILE).read_text()))


def write_spec(directory: Path, spec: ModelSpec) -> None:
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
