"""Finds model versions on disk: <root>/<name>/<version>/{model.onnx, model.json}.

Each entry is judged on its own: a malformed one is reported with its reason and skipped, so it
can never block the others (nor a server's start, nor a later scan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rnnserve.models.contract import MODEL_FILE, SPEC_FILE, ModelSpec, is_version_name, read_spec

log = logging.getLogger(__name__)
IMPORT_HINT = "run `rnnserve import`, which wraps a recurrent graph and writes its model.json:"


def _name_for(graph: Path) -> str:
    """A model name the repository accepts, from a file name."""
    name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in graph.stem)
    return name.lstrip("._-") or "model"


@dataclass(frozen=True)
class ModelVersion:
    spec: ModelSpec
    path: Path
    signature: tuple
    """Sizes and modification times of the version's files: a rejected version is tried again
    only once one of them changes."""

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.name, self.spec.version


@dataclass(frozen=True)
class Scan:
    found: dict[tuple[str, int], ModelVersion]
    problems: dict[Path, str]
    """Entries skipped, each with a one-line reason."""


def signature(directory: Path) -> tuple:
    stats = []
    for path in sorted(directory.iterdir()):
        try:
            stat = path.stat()
        except OSError:
            continue
        stats.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(stats)


def scan(root: Path, only: tuple[str, ...] = ()) -> Scan:
    """Every complete, well-formed version under root, and why each other entry was skipped."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    found: dict[tuple[str, int], ModelVersion] = {}
    problems: dict[Path, str] = {}
    for graph in sorted(root.glob("*.onnx")):
        problems[graph] = (
            f"a graph needs a directory of its own: {IMPORT_HINT} {graph} --name {_name_for(graph)}"
        )
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if only and model_dir.name not in only:
            continue
        try:
            version_dirs = sorted(
                p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
            )
            loose = sorted(model_dir.glob("*.onnx"))
        except OSError as exc:
            problems[model_dir] = f"cannot list it: {exc.strerror}"
            continue
        if loose and not version_dirs:
            problems[model_dir] = (
                f"no version directories ({model_dir.name}/1/model.onnx, "
                f"…): {IMPORT_HINT} {loose[0]} --name {model_dir.name}"
            )
        for version_dir in version_dirs:
            try:
                found_version = _version(model_dir.name, version_dir)
            except ValueError as exc:
                problems[version_dir] = str(exc)
                continue
            found[found_version.key] = found_version
    return Scan(found, problems)


def _version(name: str, directory: Path) -> ModelVersion:
    if not is_version_name(directory.name):
        raise ValueError(
            "version directories are named by their version number (1, 2, …; "
            "ASCII digits, no leading zero)"
        )
    if not (directory / MODEL_FILE).is_file():
        raise ValueError(f"no {MODEL_FILE}")
    if not (directory / SPEC_FILE).is_file():
        raise ValueError(
            f"no {SPEC_FILE} beside {MODEL_FILE} (its format: model.schema.json); "
            f"for a graph from another exporter: {IMPORT_HINT} "
            f"{directory / MODEL_FILE} --name NAME"
        )
    spec = read_spec(directory)
    if (spec.name, spec.version) != (name, int(directory.name)):
        raise ValueError(
            f"{SPEC_FILE} says {spec.name} v{spec.version}; the directory says "
            f"{name} v{directory.name}"
        )
    return ModelVersion(spec, directory, signature(directory))
