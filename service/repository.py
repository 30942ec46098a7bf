"""Finds model versions on disk: <root>/<name>/<integer version>/{model.onnx, model.json}."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from service.contract import MODEL_FILE, SPEC_FILE, ModelSpec, read_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    spec: ModelSpec
    path: Path

    @property
    def key(self) -> tuple[str, int]:
        return self.spec.name, self.spec.version


def scan(root: Path, only: tuple[str, ...] = ()) -> dict[tuple[str, int], ModelVersion]:
    """Every complete, readable version; broken ones are logged and skipped, never fatal."""
    found: dict[tuple[str, int], ModelVersion] = {}
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a directory")
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if only and model_dir.name not in only:
            continue
        for version_dir in model_dir.iterdir():
            if not version_dir.name.isdigit():
                continue
            if not (version_dir / MODEL_FILE).is_file() or not (version_dir / SPEC_FILE).is_file():
                continue
            try:
                spec = read_spec(version_dir)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping %s: %s", version_dir, exc)
                continue
            if (spec.name, spec.version) != (model_dir.name, int(version_dir.name)):
                log.warning("skipping %s: model.json says %s v%d", version_dir, spec.name,
                            spec.version)
                continue
            found[(spec.name, spec.version)] = ModelVersion(spec, version_dir)
    return found
