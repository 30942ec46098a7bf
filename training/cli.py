"""`python -m training train --task echo [--cell gru] [--units N] [--layers N] [--epochs N]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rnnserve.models.contract import CELLS

# Keras 3 emits CudnnRNNV3 on a visible GPU, which no converter reads; training is CPU-only.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parser() -> argparse.ArgumentParser:
    from training.tasks import TASKS

    p = argparse.ArgumentParser(
        prog="python -m training", description="Train rnnserve's models and export them as ONNX."
    )
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one task (or all) and export it")
    train.add_argument("--task", choices=[*TASKS, "all"], required=True)
    train.add_argument("--cell", choices=CELLS, help="recurrent cell (default: the task's)")
    train.add_argument("--layers", type=int, help="stacked recurrent layers")
    train.add_argument("--units", type=int, help="units per recurrent layer")
    train.add_argument("--activation", choices=["tanh", "relu", "sigmoid"], help="cell activation")
    train.add_argument(
        "--epochs", type=int, help="epochs (binary_add: training steps of fresh pairs)"
    )
    train.add_argument("--out", type=Path, default=Path("exported"), help="model repository")
    train.add_argument("--version", type=int, default=1, help="version directory to write")
    train.add_argument("--name", help="model name (default: the task name)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--mnist", type=Path, help="digits: a local mnist.npz instead of sklearn's")
    train.add_argument(
        "--no-bar", action="store_true", help="write the model even if it misses the task's bar"
    )
    export = sub.add_parser(
        "export",
        help="export a saved Keras model (LSTM/GRU/SimpleRNN "
        "with Dense/Activation layers) with native recurrent ops, checked",
    )
    export.add_argument("model", type=Path, help="the .keras file")
    export.add_argument("--name", required=True, help="the model's name in the repository")
    export.add_argument("--version", type=int, default=1, help="version directory to write")
    export.add_argument("--out", type=Path, default=Path("exported"), help="model repository")
    export.add_argument("--description", default="", help="for model.json")
    return p


def run_export(args: argparse.Namespace) -> int:
    from training.keras_export import export_saved
    from training.onnx_export import ExportError
    from training.verify import VerificationError

    try:
        path = export_saved(args.model, args.name, args.version, args.out, args.description)
    except (ExportError, VerificationError) as exc:
        print(f"error: cannot export {args.model}: {exc}", file=sys.stderr)
        return 2
    print(f"exported {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "export":
        return run_export(args)
    from training.pipeline import BarNotMet, ExportRequest, export_task
    from training.tasks import TASKS

    names = list(TASKS) if args.task == "all" else [args.task]
    if args.name and len(names) > 1:
        print("--name needs a single --task", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        extra = {"mnist": args.mnist} if name == "digits" else {}
        task = TASKS[name](seed=args.seed, **extra)
        d = task.defaults
        request = ExportRequest(
            cell=args.cell or d.cell,
            layers=args.layers or d.layers,
            units=args.units or d.units,
            activation=args.activation or d.activation,
            epochs=args.epochs or d.epochs,
            out=args.out,
            version=args.version,
            name=args.name,
            seed=args.seed,
        )
        try:
            path = export_task(task, request, require_bar=not args.no_bar)
        except BarNotMet as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"exported {path}", file=sys.stderr)
    return 0
