"""The CPU image under plain `docker run`: every worker serves, Docker's health follows a moved
port and TLS, answers are exact, `docker stop` drains cleanly, sessions move between
containers through a real Redis, a read-only root works, and a broken setup says so in one
line (make test-container)."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from bench.cluster import Redis
from rnnserve.client import Client, RnnServeError
from tests.conftest import EXPORTED, self_signed, spec
from tests.container.conftest import Container, docker

pytestmark = pytest.mark.container


def reference(model: str, x: np.ndarray) -> np.ndarray:
    """The model's output from ONNX Runtime in this process, from zero states."""
    (version,) = (EXPORTED / model).iterdir()
    session = ort.InferenceSession(str(version / "model.onnx"))
    feeds = {
        "x": x,
        **{s.input: np.zeros((len(x), s.size), np.float32) for s in spec(model).states},
    }
    return session.run(["y"], feeds)[0]


def bits(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, shape).astype(np.float32)


def metric(container: Container, name: str) -> float:
    import urllib.request

    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{container.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def test_plain_docker_run_serves_with_every_worker_and_stops_cleanly(
    image: str, containers
) -> None:
    server = Container(image)  # no --init, no extra flags
    containers.append(server)
    server.wait_serving()
    deadline = time.monotonic() + 60
    while metric(server, "rnnserve_workers") < 2:
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.2)
    time.sleep(2)  # a worker that ends itself at start would be restarted within this
    assert metric(server, "rnnserve_worker_restarts") == 0
    assert any("with 2 workers" in m for m in server.messages())

    # Exact over the wire: whole sequences, streamed steps on connections of their own (the
    # kernel spreads them over both workers) and ONNX Runtime in this process agree.
    xs = bits(1, (6, 24, 2))
    with Client(server.address) as client:
        whole = client.predict("binary_add", xs).y
    np.testing.assert_allclose(whole, reference("binary_add", xs), rtol=0, atol=1e-5)
    for row in range(len(xs)):
        with Client(server.address) as client, client.stream() as stream:
            stream.open("binary_add")
            streamed = np.concatenate([stream.step(xs[row, :7]), stream.step(xs[row, 7:])])
        np.testing.assert_array_equal(streamed, whole[row])

    # The image opens the KServe v2 HTTP door too (here on a moved port): the same answer.
    body = {
        "inputs": [
            {"name": "x", "shape": [1, 24, 2], "datatype": "FP32", "data": xs[0].ravel().tolist()}
        ]
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v2/models/binary_add/infer",
        data=json.dumps(body).encode(),
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        y = json.loads(reply.read())["outputs"][0]
    np.testing.assert_array_equal(np.asarray(y["data"], np.float32).reshape(y["shape"]), whole[:1])

    # The engine's own HEALTHCHECK, on the moved port; the liveness entry for Kubernetes.
    assert server.port != 8500
    server.wait_health("healthy")
    assert (
        docker("exec", server.name, "rnnserve", "health", "--service", "liveness").stdout.strip()
        == "SERVING"
    )

    # PID 1 reaps what the kernel hands it.
    docker("exec", server.name, "sh", "-c", "sleep 0.2 & exit 0")
    time.sleep(1.5)
    top = docker("top", server.name, "-o", "pid,stat,args").stdout.splitlines()[1:]
    assert not [line for line in top if line.split()[1].startswith("Z")], top

    # docker stop with its default timeout (10 s) while streams are open and a Predict runs:
    # the Predict is answered, the container exits 0 within the timeout.
    big = bits(2, (512, 2000, 2))
    answer: dict[str, object] = {}

    def predict() -> None:
        with Client(server.address) as client:
            started = time.monotonic()
            try:
                answer["y"] = client.predict("binary_add", big).y
            except RnnServeError as exc:
                answer["error"] = exc
            answer["took"] = time.monotonic() - started

    with Client(server.address) as client:
        streams = [client.stream() for _ in range(4)]
        for stream in streams:
            stream.__enter__()
            stream.open("echo")
            stream.step([[1.0]])
        running = threading.Thread(target=predict)
        running.start()
        time.sleep(0.3)
        code, took = server.stop()
        running.join(30)
        for stream in streams:
            with pytest.raises(RnnServeError) as ended:
                stream.step([[1.0]])
            assert ended.value.code.name in ("UNAVAILABLE", "CANCELLED")
    print(
        f"docker stop with 4 open streams and a Predict of {answer.get('took', 0):.1f} s "
        f"running: {took:.1f} s, exit code {code}"
    )
    assert "error" not in answer, answer.get("error")
    assert answer["took"] > 0.3, "the Predict ended before the stop: make it larger"
    np.testing.assert_allclose(answer["y"], reference("binary_add", big), rtol=0, atol=1e-5)
    assert code == 0, server.logs()[-3000:]
    assert took < 10, f"docker stop took {took:.1f} s: SIGKILLed at its 10 s timeout"
    assert "worst exit status 0" in server.logs()


def continue_in_a_second_container(
    image: str, containers: list, store: dict[str, str], *flags: str
) -> None:
    """Sessions stepped in one container, `docker stop` (which parks them all), then stepped
    on in a second container on the same store: exactly what one uninterrupted run gives."""
    first = Container(image, *flags, env=store)
    containers.append(first)
    first.wait_serving()
    xs = bits(3, (5, 16, 2))
    with Client(first.address) as client:
        ids = [client.open_session("binary_add").session_id for _ in xs]
        heads = [client.step(i, x[:9]) for i, x in zip(ids, xs)]
    code, _ = first.stop()
    assert code == 0
    parked = sum(int(m.split()[1]) for m in first.messages() if m.startswith("parked "))
    assert parked == len(xs), first.messages()  # each worker parks its own
    second = Container(image, *flags, env=store)
    containers.append(second)
    second.wait_serving()
    with Client(second.address) as client:
        tails = [client.step(i, x[9:]) for i, x in zip(ids, xs)]
    got = np.stack([np.concatenate(pair) for pair in zip(heads, tails)])
    np.testing.assert_allclose(got, reference("binary_add", xs), rtol=0, atol=1e-5)


def test_sessions_parked_by_one_container_resume_exactly_in_another(image: str, containers) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    redis = Redis()
    try:
        continue_in_a_second_container(image, containers, {"RNNSERVE_STATE_STORE": redis.url})
    finally:
        redis.stop()


def test_sessions_kept_in_a_volume_continue_in_the_next_container(image: str, containers) -> None:
    """The SQLite state store on a named volume, under a read-only root."""
    volume = f"rnnserve-test-{time.time_ns()}"
    docker("volume", "create", volume)
    try:
        continue_in_a_second_container(
            image,
            containers,
            {"RNNSERVE_STATE_STORE": "sqlite:///var/lib/rnnserve/sessions.db"},
            *("--read-only", "--tmpfs", "/tmp", "-v", f"{volume}:/var/lib/rnnserve"),
        )
    finally:
        for container in containers:  # the volume is in use while they exist
            docker("rm", "-f", container.name, check=False)
        docker("volume", "rm", "-f", volume, check=False)


def test_read_only_root_with_a_tmpfs_serves_and_without_one_says_what_to_mount(
    image: str, containers
) -> None:
    server = Container(image, "--read-only", "--tmpfs", "/tmp")
    containers.append(server)
    server.wait_serving()
    with Client(server.address) as client:
        assert client.predict("echo", np.ones((2, 3, 1), np.float32)).y.shape == (2, 3, 2)
    assert "Failed to persist" not in server.logs()  # ONNX Runtime found a writable cache

    bare = Container(image, "--read-only")
    containers.append(bare)
    state = wait_exit(bare)
    assert state["ExitCode"] == 2
    (line,) = [m for m in bare.messages() if "cannot serve" in m]
    assert "mount one at /tmp" in line and "Traceback" not in bare.logs()


def wait_exit(container: Container, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while (state := container.state())["Running"]:
        assert time.monotonic() < deadline, container.logs()[-3000:]
        time.sleep(0.3)
    return state


def test_tls_and_docker_health(image: str, containers, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "localhost")
    for path in (tmp_path, cert, key):  # the server runs as uid 10001
        path.chmod(0o755 if path.is_dir() else 0o644)
    server = Container(
        image,
        "-v",
        f"{tmp_path}:/certs:ro",
        env={"RNNSERVE_TLS_CERT": "/certs/cert.pem", "RNNSERVE_TLS_KEY": "/certs/key.pem"},
    )
    containers.append(server)
    server.wait_serving(credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
    with Client(f"localhost:{server.port}", tls_ca=cert) as client:
        assert client.predict("echo", np.ones((1, 2, 1), np.float32)).y.shape == (1, 2, 2)
    server.wait_health("healthy")  # the image's probe speaks TLS by the server's settings


@pytest.mark.parametrize(
    "setup", ["missing TLS file", "empty model volume", "unreadable model volume"]
)
def test_a_broken_setup_stops_the_container_with_one_line(
    setup: str, image: str, tmp_path: Path
) -> None:
    volume = tmp_path / "models"
    volume.mkdir()
    flags = {
        "missing TLS file": [
            "-e",
            "RNNSERVE_TLS_CERT=/certs/cert.pem",
            "-e",
            "RNNSERVE_TLS_KEY=/certs/key.pem",
        ],
        "empty model volume": ["-v", f"{volume}:/srv/rnnserve/exported:ro"],
        "unreadable model volume": ["-v", f"{volume}:/srv/rnnserve/exported:ro"],
    }[setup]
    if setup == "unreadable model volume":
        shutil.copytree(EXPORTED / "echo", volume / "echo")
        volume.chmod(0o700)  # root's, and the server runs as uid 10001
    started = time.monotonic()
    done = docker(
        "run",
        "--rm",
        "--network",
        "host",
        *flags,
        image,
        "--grpc-port",
        "0",
        "--metrics-port",
        "-1",
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Traceback" not in done.stdout
    assert re.search(r"--tls-cert|--repository", line)


def test_the_image_holds_the_installed_package_and_the_models_only(image: str) -> None:
    script = (
        "import rnnserve, sys; print(rnnserve.__file__); "
        "import importlib.util as u; print(u.find_spec('pip'), u.find_spec('setuptools'))"
    )
    shown = docker("run", "--rm", "--entrypoint", "python", image, "-c", script).stdout.split("\n")
    assert shown[0].startswith("/opt/rnnserve/lib/python3.11/site-packages/rnnserve/")
    assert shown[1] == "None None"  # no pip, no setuptools in the serving environment
    listing = docker(
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "ls -A /srv/rnnserve; ls -d $HOME; ls -A /opt",
    ).stdout.split()
    assert listing == ["exported", "/home/rnnserve", "rnnserve"]
    found = docker(
        "run",
        "--rm",
        "--user",
        "0",
        "--entrypoint",
        "sh",
        image,
        "-c",
        "find /opt /srv /home -path '*/site-packages/*' "
        "! -path '*/site-packages/rnnserve*' -prune -o \\( -name setup.py "
        "-o -name Makefile -o -name '*.egg-info' "
        "-o -name training -o -name '__editable__*' \\) -print; cat "
        "/opt/rnnserve/lib/python3.11/site-packages/rnnserve-*/direct_url.json",
    ).stdout
    assert found.startswith("{") and '"editable"' not in found, found  # from the wheel only
