"""Writes the graphs in this directory: what torch.onnx.export writes for nn.LSTM, nn.GRU and
nn.RNN, with torch's own answers beside each, for tests/test_torch_exports.py to import, serve
and compare. PyTorch is far too heavy for the test environment, so its output is committed and
this script is how it was made (`make torch-exports`, on the torch named in manifest.json).

The two export examples of docs/models.md run verbatim, so the example users copy is the one
tested; manifest.json records each block's sha256 and the tests check that the page still
holds those blocks. The other cases are the exports the import must refuse with a reason that
says what to change (measured on torch 2.13: the dynamo exporter unrolls nn.RNN, and fixes
the traced length inside a time-major LSTM or GRU)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnxscript
import torch

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent.parent / "docs" / "models.md"
BATCH, TIME = 3, 11
"""The test input: neither the traced batch (2) nor the traced length (5)."""


def docs_blocks() -> list[str]:
    """The page's python blocks that export with torch, in page order."""
    return [
        code
        for code in re.findall(r"^```python\n(.*?)^```$", DOCS.read_text(), re.S | re.M)
        if "torch.onnx.export(" in code
    ]


class Stacked(torch.nn.Module):
    """A two-layer recurrence of any kind with a per-step head, its states as inputs."""

    def __init__(self, cell: type[torch.nn.RNNBase], batch_first: bool) -> None:
        super().__init__()
        self.recurrence = cell(4, 8, num_layers=2, batch_first=batch_first)
        self.head = torch.nn.Linear(8, 2)
        self.lstm = cell is torch.nn.LSTM

    def forward(self, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None = None):
        y, states = self.recurrence(x, (h0, c0) if self.lstm else h0)
        return (self.head(y), *(states if self.lstm else (states,)))


def dynamo(cell: type[torch.nn.RNNBase], batch_first: bool, path: str) -> torch.nn.Module:
    """torch.onnx.export's default exporter with both axes named, the way the docs show."""
    model = Stacked(cell, batch_first).eval()
    x = torch.randn(2, 5, 4) if batch_first else torch.randn(5, 2, 4)
    h = torch.zeros(2, 2, 8)
    batch, time = torch.export.Dim("batch"), torch.export.Dim("time")
    args = (x, h, h.clone()) if model.lstm else (x, h)
    shapes = {"x": {0: batch, 1: time} if batch_first else {0: time, 1: batch}, "h0": {1: batch}}
    if model.lstm:
        shapes["c0"] = {1: batch}
    torch.onnx.export(model, args, path, input_names=list(shapes), dynamic_shapes=shapes)
    return model


def run_block(code: str) -> torch.nn.Module:
    """A docs block run as a script would run it; the model it defines."""
    scope: dict = {"__name__": "__main__"}
    exec(compile(code, str(DOCS), "exec"), scope)  # noqa: S102 - our own documentation
    return scope["model"]


def answer(model: torch.nn.Module, batch_first: bool, states: list[str], path: str) -> None:
    """torch's own outputs for one random input and random states, saved beside the graph."""
    rng = np.random.default_rng(7)
    features = 4
    x = rng.standard_normal((BATCH, TIME, features)).astype(np.float32)
    hidden = model.head.in_features
    initial = {
        name: (0.5 * rng.standard_normal((2, BATCH, hidden))).astype(np.float32) for name in states
    }
    with torch.no_grad():
        fed = torch.from_numpy(x if batch_first else x.transpose(1, 0, 2).copy())
        y, *finals = model(fed, *(torch.from_numpy(initial[n]) for n in states))
    y = y.numpy() if batch_first else y.numpy().transpose(1, 0, 2)
    np.savez(
        path,
        x=x,
        y=y,
        **initial,
        **{f"{n}_final": f.numpy() for n, f in zip(states, finals, strict=True)},
    )


def main() -> None:
    torch.manual_seed(0)
    os.chdir(HERE)
    for stale in HERE.glob("*.onnx*"):
        stale.unlink()
    blocks = docs_blocks()
    if len(blocks) != 2:
        sys.exit(f"{DOCS} should hold 2 torch export blocks, not {len(blocks)}")
    cases = {}
    with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines
        answer(run_block(blocks[0]), True, ["h0", "c0"], "lstm.npz")
        cases["lstm"] = {"graph": "lstm.onnx", "made_by": "docs/models.md, first export block"}
        answer(run_block(blocks[1]), False, ["h0"], "rnn.npz")
        cases["rnn"] = {"graph": "rnn.onnx", "made_by": "docs/models.md, second export block"}
        answer(dynamo(torch.nn.GRU, True, "gru.onnx"), True, ["h0"], "gru.npz")
        cases["gru"] = {"graph": "gru.onnx", "made_by": "dynamo, batch_first=True"}
        dynamo(torch.nn.LSTM, False, "lstm_time_major_dynamo.onnx")
        cases["lstm_time_major_dynamo"] = {
            "graph": "lstm_time_major_dynamo.onnx",
            "made_by": "dynamo, batch_first=False",
        }
        dynamo(torch.nn.RNN, True, "rnn_dynamo.onnx")
        cases["rnn_dynamo"] = {"graph": "rnn_dynamo.onnx", "made_by": "dynamo, batch_first=True"}
    manifest = {
        "torch": torch.__version__,
        "onnxscript": onnxscript.__version__,
        "docs_blocks_sha256": [hashlib.sha256(b.encode()).hexdigest() for b in blocks],
        "cases": cases,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(cases)} graphs with torch {torch.__version__} into {HERE}")


if __name__ == "__main__":
    main()
