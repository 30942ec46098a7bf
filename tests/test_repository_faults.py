"""A repository cannot be poisoned: each bad entry is skipped alone, reported once, never served,
and health per model follows what is actually served."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import EXPORTED, running
from tests.test_lifecycle import wait_for


def add_version(repo: Path, name: str, version: int, edit=None, source: str = "echo") -> Path:
    """A copy of a shipped model as `name` v`version`, its model.json passed through `edit`."""
    target = repo / name / str(version)
    shutil.copytree(EXPORTED / source / "1", target)
    doc = json.loads((target / "model.json").read_text())
    doc.update(name=name, version=version)
    if edit is not None:
        doc = edit(doc)
    (target / "model.json").write_text(json.dumps(doc))
    return target


def health(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                .status
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def extra_state(doc: dict) -> dict:
    doc["states"] = [*doc["states"], {"input": "h9", "output": "h9_out", "size": 4}]
    return doc


def wrong_outputs(doc: dict) -> dict:
    doc["output"]["size"] = 3
    return doc


def bad_golden(target: Path) -> None:
    with np.load(target / "golden.npz") as data:
        arrays = dict(data)
    arrays["expected_y"] = arrays["expected_y"] + 0.5
    np.savez(target / "golden.npz", **arrays)


@pytest.mark.parametrize(
    "break_it, reason",
    [
        (lambda repo: add_version(repo, "echo", 2, extra_state), "graph inputs"),
        (lambda repo: add_version(repo, "echo", 2, wrong_outputs), "values per row"),
        (lambda repo: bad_golden(add_version(repo, "echo", 2)), "disagrees with golden.npz"),
    ],
)
def test_a_version_that_disagrees_with_its_graph_never_becomes_the_latest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, break_it, reason: str
) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "echo", 1)
    caplog.set_level(logging.ERROR, "rnnserve.engine.registry")
    with running(repository=repo, repository_poll=0.05) as srv, srv.client() as client:
        break_it(repo)
        wait_for(lambda: any(reason in r.getMessage() for r in caplog.records))
        add_version(repo, "echo", 3)  # a good version after the bad one still loads
        wait_for(lambda: client.get_model("echo").version == 3)
        assert list(client.get_model("echo").versions) == [1, 3]
        assert client.predict("echo", np.ones((1, 2, 1))).y.shape == (1, 2, 2)
    reports = [r for r in caplog.records if reason in r.getMessage()]
    assert len(reports) == 1, "a bad entry is reported once, not on every scan"


def malformed_entries(repo: Path) -> None:
    (repo / "listdoc" / "1").mkdir(parents=True)
    shutil.copy(EXPORTED / "echo" / "1" / "model.onnx", repo / "listdoc" / "1")
    (repo / "listdoc" / "1" / "model.json").write_text("[]")
    add_version(repo, "huge", 1, lambda d: {**d, "version": 1e999})
    shutil.copytree(EXPORTED / "echo" / "1", repo / "echo" / "²")
    shutil.copytree(EXPORTED / "echo" / "1", repo / "echo" / "01")
    (repo / "nojson" / "1").mkdir(parents=True)
    shutil.copy(EXPORTED / "echo" / "1" / "model.onnx", repo / "nojson" / "1")
    (repo / "binary" / "1").mkdir(parents=True)
    (repo / "binary" / "1" / "model.json").write_bytes(b"\xff\xfe{")
    shutil.copy(EXPORTED / "echo" / "1" / "model.onnx", repo / "binary" / "1")
    add_version(repo, "notonnx", 1)
    (repo / "notonnx" / "1" / "model.onnx").write_bytes(b"not onnx")
    (repo / "loose").mkdir()
    shutil.copy(EXPORTED / "echo" / "1" / "model.onnx", repo / "loose" / "exported.onnx")
    shutil.copy(EXPORTED / "echo" / "1" / "model.onnx", repo / "my model.onnx")


def test_malformed_entries_block_neither_start_nor_later_scans(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    add_version(repo, "echo", 1)
    add_version(repo, "gone", 1)
    malformed_entries(repo)
    caplog.set_level(logging.ERROR, "rnnserve.engine.registry")
    with running(repository=repo, repository_poll=0.05) as srv, srv.client() as client:
        assert sorted(m.name for m in client.list_models()) == ["echo", "gone"]
        skipped = " ".join(r.getMessage() for r in caplog.records)
        for entry in (
            "listdoc",
            "huge",
            "²",
            "01",
            "nojson",
            "binary",
            "notonnx",
            "loose",
            "my model.onnx",
        ):
            assert entry in skipped, entry
        # Graphs without a model.json are named, with the command that makes one.
        assert "run `rnnserve import`" in skipped
        assert f"{repo / 'my model.onnx'} --name my_model" in skipped
        assert f"{repo / 'loose' / 'exported.onnx'} --name loose" in skipped
        assert f"{repo / 'nojson' / '1' / 'model.onnx'} --name NAME" in skipped
        assert health(srv.address, "gone") == "SERVING"
        assert health(srv.address, "fresh") == "NOT_FOUND"
        add_version(repo, "fresh", 1, source="forecast")
        shutil.rmtree(repo / "gone")
        wait_for(lambda: sorted(m.name for m in client.list_models()) == ["echo", "fresh"])
        wait_for(lambda: health(srv.address, "fresh") == "SERVING")
        assert health(srv.address, "gone") == "SERVICE_UNKNOWN"
        assert client.predict("fresh", np.ones((1, 3, 1))).y.shape == (1, 3, 1)
        count = len(caplog.records)
        srv.call(srv.server.sync_models())
        assert len(caplog.records) == count, "unchanged bad entries are not reported again"
