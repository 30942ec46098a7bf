"""What today's torch.onnx.export writes, imported with `rnnserve import`, served, and checked
over the wire against torch's own answers; and the exports torch fixes to their traced length,
refused with what to change. The graphs and torch's answers are committed
(tests/torch_exports/, made by its export.py, which runs the docs' own export examples)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnserve.models.importer import ImportRefused, import_graph
from tests.conftest import ROOT, running
from tests.test_readme import page_blocks

EXPORTS = ROOT / "tests" / "torch_exports"
MANIFEST = json.loads((EXPORTS / "manifest.json").read_text())
TOLERANCE = 1e-5


def test_the_docs_show_the_export_calls_that_made_these_graphs() -> None:
    """The committed graphs came from the docs' blocks as they stand, on the torch they name."""
    blocks = [
        b.code for b in page_blocks(ROOT / "docs" / "models.md") if "torch.onnx.export(" in b.code
    ]
    assert [hashlib.sha256(b.encode()).hexdigest() for b in blocks] == MANIFEST[
        "docs_blocks_sha256"
    ], "docs/models.md's export examples changed: run `make torch-exports` and commit"
    named = re.search(
        r"torch\s+(\d+\.\d+)'s\s+default\s+exporter", (ROOT / "docs" / "models.md").read_text()
    )
    assert named and MANIFEST["torch"].startswith(named.group(1) + ".")


@pytest.mark.parametrize("case", ["lstm", "gru", "rnn"])
def test_a_torch_export_serves_what_torch_computed(tmp_path: Path, case: str) -> None:
    answers = np.load(EXPORTS / f"{case}.npz")
    kinds = ["h", "c"] if case == "lstm" else ["h"]
    written = import_graph(EXPORTS / f"{case}.onnx", case, 1, tmp_path / "repo")
    imported = json.loads((written / "model.json").read_text())["imported"]
    assert imported["producer"].startswith("pytorch 2.")  # the legacy exporter drops "+cpu"
    assert imported["external_data"] == sorted(
        p.name for p in EXPORTS.glob(f"{case}.onnx.data") if p.stat().st_size
    )
    x = answers["x"]
    per_layer = {f"{k}{layer}": answers[f"{k}0"][layer] for layer in range(2) for k in kinds}
    with running(repository=tmp_path / "repo") as srv, srv.client() as client:
        whole = client.predict(case, x, initial_states=per_layer)
        assert np.max(np.abs(whole.y - answers["y"])) <= TOLERANCE
        for k in kinds:
            finals = np.stack([whole.final_states[f"{k}{layer}"] for layer in range(2)])
            assert np.max(np.abs(finals - answers[f"{k}0_final"])) <= TOLERANCE
        row = 1
        with client.stream(
            case, initial_states={n: v[row : row + 1] for n, v in per_layer.items()}
        ) as stream:
            streamed = np.concatenate([stream.step(x[row, t]) for t in range(x.shape[1])])
        assert np.max(np.abs(streamed - answers["y"][row])) <= TOLERANCE


@pytest.mark.parametrize(
    "case, reason",
    [
        (
            "lstm_time_major_dynamo",
            r"runs only at the length it was traced with: its exporter fixed 5 inside the graph "
            r"\(Reshape node_Reshape_\d+ to \[5, -1, 8\]\); build it with batch_first=True",
        ),
        (
            "rnn_dynamo",
            r"no recurrent operator .*; input 'x' is \['batch', 5, 4\], so the exporter unrolled "
            r"the recurrence over the traced steps \(torch.onnx.export's dynamo exporter does this "
            r"to nn.RNN: export it with dynamo=False",
        ),
    ],
)
def test_what_torch_fixes_to_its_traced_length_is_refused_with_what_to_change(
    tmp_path: Path, case: str, reason: str
) -> None:
    with pytest.raises(ImportRefused, match=reason):
        import_graph(EXPORTS / f"{case}.onnx", case, 1, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_the_command_prints_only_its_own_lines(tmp_path: Path) -> None:
    """ONNX Runtime warns on every run of a dynamo export (its y is declared [batch, 5, 3]) and
    logs errors for the layout the probe rejects; none of it reaches the user's terminal."""
    for path in EXPORTS.glob("*.onnx*"):  # graphs and their external data
        shutil.copy(path, tmp_path / path.name)

    def command(graph: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "rnnserve", "import", graph, "--name", graph.split(".")[0]]
            + ["--repository", "repo"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    done = command("lstm.onnx")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("wrote repo/lstm/1: 2 recurrent op(s)")
    for name in ("rnn_dynamo.onnx", "lstm_time_major_dynamo.onnx"):
        refused = command(name)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "dynamo=False" in refused.stderr
