"""Every code block in README.md and the documentation pages (docs/*.md) runs, verbatim, so the
docs cannot rot.

- ```sh blocks run with bash in a sandbox that links to this checkout (so `make` and `.venv`
  work, and what they write stays out of the checkout), with HOME in a temporary directory.
- ```console blocks are transcripts: each `$ command` runs and its output must match what the
  README shows (numbers to 1e-4; a line ending in "..." is a prefix).
- ```python blocks run as scripts against the server the README starts with `make serve`.
- A block marked `<!-- readme-test: skip: WHY -->` says why CI cannot run it; ```text blocks
  are diagrams.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.cluster import wait_until_serving
from tests.conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- readme-test: (.*?) -->")
PORTS = (8500, 8080, 8000)  # what `make serve` binds by default, as the examples assume


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str
    marker: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}:{self.language}"


def blocks() -> list[Block]:
    return [block for page in PAGES for block in page_blocks(page)]


def page_blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text().splitlines()
    name = str(page.relative_to(ROOT))
    i = 0
    while i < len(lines):
        if lines[i].startswith("```"):
            language, start = lines[i][3:].strip(), i
            end = lines.index("```", i + 1)
            previous = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            marker = MARKER.fullmatch(previous.strip())
            found.append(
                Block(
                    name,
                    start + 1,
                    language,
                    "\n".join(lines[start + 1 : end]) + "\n",
                    marker.group(1) if marker else "",
                )
            )
            i = end
        i += 1
    return found


def runnable(language: str) -> list[Block]:
    return [b for b in blocks() if b.language == language and not b.marker]


def test_every_block_runs_or_says_why() -> None:
    for block in blocks():
        assert block.language in {"sh", "console", "python", "text"}, block
        if block.marker:
            assert block.marker.startswith(("skip: ", "background server")), block


def sandbox(tmp: Path) -> Path:
    """A directory that looks like this checkout (links to its files) but is not it."""
    work = tmp / "checkout"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", "my-models"}:
            (work / entry.name).symlink_to(entry)
    return work


def environment(tmp: Path) -> dict[str, str]:
    cache = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
    (tmp / "home").mkdir(exist_ok=True)
    return {
        **os.environ,
        "HOME": str(tmp / "home"),
        "PIP_CACHE_DIR": cache,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def readme_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The README's own `make serve`, on the ports its examples use."""
    busy = [p for p in PORTS if not _port_free(p)]
    if busy:
        pytest.skip(
            f"port(s) {busy} in use (a running `make serve`?); the README examples need them"
        )
    (block,) = [b for b in blocks() if b.marker.startswith("background server")]
    log = tmp_path_factory.mktemp("readme") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", block.code],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until_serving("localhost:8500", proc, timeout=300)
        assert proc.poll() is None, log.read_text()[-3000:]
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _matches(expected: str, got: str) -> bool:
    expected = expected.split("#", 1)[0].rstrip()
    if expected.endswith("..."):
        return got.startswith(expected[:-3].rstrip())
    want, have = expected.split(), got.split()
    if len(want) != len(have):
        return False
    for a, b in zip(want, have):
        try:
            if abs(float(a) - float(b)) > 1e-4 * max(1.0, abs(float(a))):
                return False
        except ValueError:
            if a != b:
                return False
    return True


def transcript(code: str) -> list[tuple[str, list[str]]]:
    steps: list[tuple[str, list[str]]] = []
    for line in code.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        elif line.strip():
            steps[-1][1].append(line)
    return steps


@pytest.mark.parametrize("block", runnable("console"), ids=str)
def test_console_transcript(block: Block, readme_server: None) -> None:
    for command, expected in transcript(block.code):
        out = subprocess.run(
            ["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"{command}\n{out.stderr}"
        got = out.stdout.splitlines()
        assert len(got) == len(expected), f"{command}\n{out.stdout}"
        for want, have in zip(expected, got):
            assert _matches(want, have), f"{block} `{command}`: docs {want!r}, got {have!r}"


@pytest.mark.parametrize("block", runnable("python"), ids=str)
def test_python_example(block: Block, readme_server: None, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", block.code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"{block}\n{out.stderr}"
    assert out.stdout.strip(), "the example prints what the README says it prints"


def _sh_blocks(needle: str) -> list[Block]:
    return [b for b in runnable("sh") if needle in b.code]


def test_every_sh_block_is_run_below() -> None:
    covered = (
        _sh_blocks("rnnserve-env")
        + _sh_blocks("python -m training train")
        + _sh_blocks("rnnserve import")
    )
    assert sorted(map(str, covered)) == sorted(map(str, runnable("sh")))


@pytest.mark.training
def test_train_your_own(tmp_path: Path) -> None:
    (block,) = _sh_blocks("python -m training train")
    work = sandbox(tmp_path)
    out = subprocess.run(
        ["bash", "-euc", block.code],
        cwd=work,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (work / "my-models" / "echo_gru" / "1" / "model.onnx").is_file()


@pytest.mark.training
def test_serve_your_own(tmp_path: Path) -> None:
    """The import and export commands, on what the page's own torch export example wrote
    (tests/torch_exports/) and a saved Keras model."""
    import keras

    (block,) = _sh_blocks("rnnserve import")
    work = sandbox(tmp_path)
    for name in ("lstm.onnx", "lstm.onnx.data"):
        shutil.copy(ROOT / "tests" / "torch_exports" / name, work / name)
    keras.Sequential([keras.Input((None, 2)), keras.layers.GRU(5), keras.layers.Dense(1)]).save(
        work / "my_model.keras"
    )
    out = subprocess.run(
        ["bash", "-euc", block.code],
        cwd=work,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for name in ("my_lstm", "my_keras"):
        assert (work / "my-models" / name / "1" / "model.json").is_file()


@pytest.mark.skipif(
    shutil.which("python3.11") is None, reason="the README's pip block names python3.11"
)
def test_pip_install_beside_tritonclient(tmp_path: Path) -> None:
    """The README's pip block in a fresh venv; then that venv serves from another directory,
    tritonclient (on the protobuf 6 its pins pick) talks to it, and without an ONNX Runtime
    `rnnserve serve` names the extra to install."""
    (block,) = _sh_blocks("rnnserve-env")
    env = environment(tmp_path)
    out = subprocess.run(
        ["bash", "-euc", block.code],
        cwd=sandbox(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.fullmatch(r"rnnserve \S+\n", out.stdout.splitlines(keepends=True)[-1])
    venv = tmp_path / "home" / "rnnserve-env" / "bin"
    check = subprocess.run(
        [str(venv / "python"), "-c", TRITON_BESIDE_RNNSERVE, str(ROOT / "exported")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert check.stdout.startswith("protobuf 6."), check.stdout
    subprocess.run(
        [str(venv / "pip"), "uninstall", "-q", "-y", "onnxruntime"],
        env=env,
        check=True,
        timeout=120,
    )
    bare = subprocess.run(
        [str(venv / "rnnserve"), "serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bare.returncode == 2 and "pip install 'rnnserve[cpu]'" in bare.stderr, bare.stderr


TRITON_BESIDE_RNNSERVE = """
import re, subprocess, sys
import google.protobuf, numpy as np
import tritonclient.grpc as grpcclient
from rnnserve.client import Client

print("protobuf", google.protobuf.__version__)
server = subprocess.Popen([sys.executable, "-m", "rnnserve", "serve", "--repository",
                           sys.argv[1], "--grpc-port", "0", "--metrics-port", "-1",
                           "--workers", "1"], stderr=subprocess.PIPE, text=True)
try:
    for line in server.stderr:
        found = re.search(r"serving .* on 127\\.0\\.0\\.1:(\\d+)", line)
        if found:
            break
    address = f"127.0.0.1:{found.group(1)}"
    with Client(address, timeout=30) as client:
        assert client.predict("echo", np.ones((1, 4, 1))).y.shape == (1, 4, 2)
    triton = grpcclient.InferenceServerClient(address)
    x = grpcclient.InferInput("x", [1, 1, 1], "FP32")
    x.set_data_from_numpy(np.ones((1, 1, 1), np.float32))
    y = triton.infer("echo", [x], sequence_id=7, sequence_start=True).as_numpy("y")
    assert y.shape == (1, 1, 2)
finally:
    server.terminate()
assert server.wait(30) == 0
"""
