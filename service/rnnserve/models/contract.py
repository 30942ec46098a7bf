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
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

INPUT_NAME = "x"
OUTPUT_NAME = "y"
MODEL_FILE = "model.onnx"
SPEC_FILE = "model.json"
GOLDEN_FILE = "golden.npz"
CELLS = ("lstm", "gru", "simple_rnn")
"""The cells training builds and model.json names."""
LOOP = "loop"
"""The cell of an imported graph whose recurrence is a generic ONNX Loop or Scan (rnnserve
import)."""
MIXED = "mixed"
"""The cell of an imported stack of recurrences of different kinds (a GRU over an LSTM, say):
model.json's imported.recurrent_ops names each."""
OUTPUT_KINDS = ("probabilities", "sigmoid", "regression")
SCHEMA_FILE = Path(__file__).with_name("model.schema.json")
MAX_SPEC_BYTES = 1024 * 1024
MAX_VERSION_DIGITS = 18
"""Versions are int64 on the native API; longer digit strings cannot name one."""


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
    def from_json(cls, doc: Any) -> ModelSpec:
        """The spec in a model.json document; ValueError naming the first field that is off."""
        error = jsonschema.exceptions.best_match(_validator().iter_errors(doc))
        if error is not None:
            where = error.json_path.removeprefix("$.") if error.json_path != "$" else "document"
            raise ValueError(f"{where}: {_short(error.message)} (see {SCHEMA_FILE.name})")
        known = set(_validator().schema["properties"])
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
            states=tuple(
                StateSpec(str(s["input"]), str(s["output"]), int(s["size"])) for s in doc["states"]
            ),
            extra={k: v for k, v in doc.items() if k not in known},
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        names = [n for s in self.states for n in (s.input, s.output)]
        if len(set(names)) != len(names) or {INPUT_NAME, OUTPUT_NAME} & set(names):
            raise ValueError(
                "states: every state input and output name must be unique and "
                f"differ from {INPUT_NAME!r} and {OUTPUT_NAME!r}"
            )
        if self.cell not in (*CELLS, LOOP, MIXED):
            raise ValueError(f"cell {self.cell!r} is not one of {(*CELLS, LOOP, MIXED)}")
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output kind {self.output_kind!r} is not one of {OUTPUT_KINDS}")
        if min(self.layers, self.units, self.features, self.outputs) < 1:
            raise ValueError("layers, units, features and outputs must be positive")
        if not self.states:
            raise ValueError("a recurrent model has at least one state tensor")


def version_dir(root: Path, name: str, version: int) -> Path:
    return root / name / str(version)


def read_spec(directory: Path) -> ModelSpec:
    """The directory's model.json; ValueError with a one-line reason naming the file."""
    path = directory / SPEC_FILE
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise ValueError(f"larger than {MAX_SPEC_BYTES} bytes")
        return ModelSpec.from_json(json.loads(path.read_bytes()))
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ValueError(f"{path}: {_short(str(exc))}") from None


def is_version_name(name: str) -> bool:
    """A version directory's name: the version number in ASCII digits, no leading zero."""
    return (
        name.isascii()
        and name.isdigit()
        and len(name) <= MAX_VERSION_DIGITS
        and not name.startswith("0")
    )


def check_model_name(name: str) -> None:
    """A name model.json may carry (the schema's own pattern): one directory level of safe
    characters, so `<repository>/<name>` never leaves the repository (`../x`, `/abs`)."""
    pattern = _validator().schema["properties"]["name"]["pattern"]
    if not re.fullmatch(pattern, name):
        raise ValueError(
            f"{name!r} is not a model name: a letter or digit, then up to 127 "
            "letters, digits, '_', '.' or '-' (no '/')"
        )


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def write_spec(directory: Path, spec: ModelSpec) -> None:
    (directory / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2) + "\n")


def write_version(
    target: Path,
    model: bytes,
    spec: ModelSpec,
    golden: dict[str, np.ndarray],
    before_rename: Callable[[Path], None] | None = None,
    replace: bool = False,
) -> Path:
    """A version's files (model.onnx, model.json, golden.npz) written into a staging directory
    beside `target`, then renamed into place, so a repository scan never sees half a version.
    `before_rename` may add files or check the staged version (raising stops it; nothing is
    left behind); `replace` lets an existing version go first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a server run as another user
        (staging / MODEL_FILE).write_bytes(model)
        write_spec(staging, spec)
        np.savez(staging / GOLDEN_FILE, allow_pickle=False, **golden)
        if before_rename is not None:
            before_rename(staging)
        if replace and target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
