"""Train → export → verify → measure → write exported/<name>/<version>/."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from importlib.metadata import version as package_version
from pathlib import Path

import keras
import onnxruntime as ort

from rnnserve.models.contract import INPUT_NAME, ModelSpec, StateSpec, version_dir, write_version
from training.architecture import build_model
from training.onnx_export import OPSET, to_onnx
from training.plots import plot_training
from training.tasks.base import Task
from training.verify import make_probe, run_keras, verify_export

TOOLS = ("tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy")


@dataclass(frozen=True)
class ExportRequest:
    cell: str
    layers: int
    units: int
    activation: str
    epochs: int
    out: Path
    version: int = 1
    name: str | None = None
    seed: int = 0


class BarNotMet(RuntimeError):
    """The trained model misses its task's bar; nothing is written."""


def _tool_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for tool in TOOLS:
        try:
            found[tool] = package_version(tool)
        except Exception:  # a tool that is not installed is simply not recorded
            continue
    return found


def export_task(task: Task, request: ExportRequest, require_bar: bool = True) -> Path:
    """Train and export one model; returns its version directory."""
    keras.utils.set_random_seed(request.seed)
    arch = task.architecture(request.cell, request.layers, request.units, request.activation)
    model = build_model(arch)
    losses, setup = task.train(model, arch, request.epochs)
    proto = to_onnx(model)
    sample = task.sample()
    verification = verify_export(model, proto, sample, seed=request.seed)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    metrics = task.evaluate(session)
    bar_value = metrics[task.bar.metric]
    if require_bar and not task.bar.passed(bar_value):
        raise BarNotMet(
            f"{task.name}: {task.bar.metric} = {bar_value:.4f} misses the bar {task.bar.threshold}"
        )
    name = request.name or task.name
    spec = ModelSpec(
        name=name,
        version=request.version,
        task=task.name,
        description=task.description,
        cell=arch.cell,
        layers=arch.layers,
        units=arch.units,
        features=arch.features,
        outputs=arch.outputs,
        output_kind=arch.output_kind,
        states=tuple(StateSpec(i, o, arch.units) for i, o in arch.state_layout()),
        extra={
            "architecture": asdict(arch),
            "training": {**setup, "seed": request.seed},
            "metrics": {
                **metrics,
                "bar": {
                    "metric": task.bar.metric,
                    "threshold": task.bar.threshold,
                    "passed": task.bar.passed(bar_value),
                },
                "seed_figure": task.bar.seed_figure,
            },
            "verification": {**verification, "tolerance": 1e-5},
            "onnx": {"opset": OPSET, "ops": sorted({n.op_type for n in proto.graph.node})},
            "tools": _tool_versions(),
        },
    )
    golden = make_probe(model, sample, batch=4, time=10, seed=request.seed + 1)
    expected = run_keras(model, golden)
    target = version_dir(request.out, name, request.version)
    write_version(
        target,
        proto.SerializeToString(),
        spec,
        {
            INPUT_NAME: golden.x,
            **golden.states,
            **{f"expected_{k}": v for k, v in expected.items()},
        },
        lambda staged: plot_training(losses, metrics, spec, staged / "training.png"),
        replace=True,
    )
    print(
        json.dumps(
            {"model": name, "version": request.version, **metrics, "verification": verification}
        )
    )
    return target
