"""deploy/ stays consistent with the server's flags, ports and the Dockerfile (no cluster here):
every Kustomize overlay of deploy/kubernetes is rendered with `kubectl kustomize`, validated
strictly against the Kubernetes schemas, checked against the server, and passes a policy
linter (checkov) but for the findings deploy/accepted-findings.yaml accepts, each with its
reason."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from rnnserve.ops.config import ENV_PREFIX, ServerConfig
from rnnserve.server import LIVENESS
from rnnserve.supervisor import STOP_MARGIN
from tests.conftest import ROOT
from tests.test_memory_and_drain import CONTAINER_LIMIT

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
SCALED = [o for o in OVERLAYS if o.endswith("scale-out")]
"""The overlays with the scale-out component: replicas, Redis and the proxy."""
ON_GPU = [o for o in OVERLAYS if o.startswith("gpu")]
ACCEPTED = DEPLOY / "accepted-findings.yaml"
CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
DRAIN_MARGIN = 5
"""Seconds the pod's grace period must leave after the longest drain the server allows."""
ALONE = {("Deployment", "rnnserve"), ("Service", "rnnserve"), ("NetworkPolicy", "rnnserve")}
SCALE_OUT = {
    ("Service", "rnnserve-headless"),
    ("PodDisruptionBudget", "rnnserve"),
    ("HorizontalPodAutoscaler", "rnnserve"),
    ("Deployment", "rnnserve-redis"),
    ("Service", "rnnserve-redis"),
    ("NetworkPolicy", "rnnserve-redis"),
    ("ConfigMap", "rnnserve-proxy"),
    ("Deployment", "rnnserve-proxy"),
    ("PodDisruptionBudget", "rnnserve-proxy"),
    ("NetworkPolicy", "rnnserve-proxy"),
}


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    """What `kubectl apply -k` would send: kubectl's own kustomize, as users run it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl (its built-in kustomize renders deploy/kubernetes) is not on PATH")
    run = subprocess.run(
        [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return tuple(doc for doc in yaml.safe_load_all(run.stdout) if doc)


@dataclass(frozen=True)
class Rendered:
    overlay: str
    docs: tuple[dict, ...]

    @property
    def scaled(self) -> bool:
        return self.overlay in SCALED

    @property
    def on_gpu(self) -> bool:
        return self.overlay in ON_GPU

    def find(self, kind: str, name: str) -> dict:
        (doc,) = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return doc

    def deployments(self) -> list[dict]:
        return [d for d in self.docs if d["kind"] == "Deployment"]

    def pod(self, name: str) -> dict:
        return self.find("Deployment", name)["spec"]["template"]

    def rnnserve_container(self) -> dict:
        (container,) = self.pod("rnnserve")["spec"]["containers"]
        return container

    def proxy_template(self) -> str:
        return self.find("ConfigMap", "rnnserve-proxy")["data"]["nginx.conf.template"]


@pytest.fixture(params=OVERLAYS)
def every(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(request.param, render(request.param))


@pytest.fixture(params=SCALED)
def scaled(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(request.param, render(request.param))


def env_values(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def seconds(command: list[str]) -> float:
    assert command[:-1] == ["sleep"], command
    return float(command[-1])


def test_the_overlays_are_the_documented_ones() -> None:
    assert OVERLAYS == ["cpu", "gpu", "gpu-scale-out", "scale-out"]
    docs = (ROOT / "docs" / "scaling-out.md").read_text()
    for overlay in OVERLAYS:
        assert f"overlays/{overlay}" in docs, overlay


def test_every_piece_is_there(every: Rendered) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in every.docs}
    assert kinds == (ALONE | SCALE_OUT if every.scaled else ALONE)


def test_replicas_match_the_server_flags_and_image(every: Rendered) -> None:
    template = every.pod("rnnserve")
    container = every.rnnserve_container()
    env = env_values(container)
    known = {ENV_PREFIX + f.name.upper() for f in fields(ServerConfig)}
    ours = {name for name in env if name.startswith(ENV_PREFIX)}
    assert ours <= known, ours - known
    # Only what RNNSERVE_STATE_STORE refers to.
    assert set(env) - ours == ({"REDIS_PASSWORD"} if every.scaled else set())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    http = int(env["RNNSERVE_HTTP_PORT"])
    assert ports == {
        "grpc": int(env["RNNSERVE_GRPC_PORT"]),
        "metrics": int(env["RNNSERVE_METRICS_PORT"]),
        **({"http": http} if http != -1 else {}),
    }
    assert (ports["grpc"], ports["metrics"]) == (ServerConfig.grpc_port, ServerConfig.metrics_port)
    # The image's HTTP port; closed behind the proxy, which routes gRPC only.
    assert http == (-1 if every.scaled else 8080)
    assert re.search(r"^EXPOSE .*\b8080\b", (ROOT / "Dockerfile").read_text(), re.M)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]  # the gRPC health service
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert template["spec"]["securityContext"]["runAsUser"] == int(uid)
    assert container["securityContext"]["runAsUser"] == int(uid)
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    # What `make docker` / `make docker-gpu` tag.
    suffix = "-gpu" if every.on_gpu else ""
    assert container["image"] == f"rnnserve:{version.group(1)}{suffix}"
    assert f"$(IMAGE):$(VERSION){suffix} " in (ROOT / "Makefile").read_text()


def test_the_client_service_leads_to_a_listening_port(every: Rendered) -> None:
    """`rnnserve` is what clients connect to: the replicas on their own, the proxy in front of
    them when scaled out; either way port 8500, each port to a named port the pods have."""
    service = every.find("Service", "rnnserve")["spec"]
    behind = every.pod("rnnserve-proxy" if every.scaled else "rnnserve")
    assert service["selector"] == behind["metadata"]["labels"]
    named = {p["name"] for c in behind["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["ports"]} <= named
    assert {p["name"]: p["port"] for p in service["ports"]} == (
        {"grpc": ServerConfig.grpc_port}
        if every.scaled
        else {"grpc": ServerConfig.grpc_port, "http": 8080}
    )


def test_probes_follow_the_health_service(every: Rendered) -> None:
    """Startup and readiness ask for "" (SERVING once the models are loaded, NOT_SERVING from
    the start of a drain); liveness asks for the entry that only a stuck process fails."""
    container = every.rnnserve_container()
    startup, ready, live = (
        container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe")
    )
    assert startup["grpc"].get("service", "") == ""
    assert ready["grpc"].get("service", "") == ""
    assert live["grpc"]["service"] == LIVENESS
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 60  # model loading
    # A busy server is not restarted (which would lose its sessions) for a slow answer.
    assert live["timeoutSeconds"] >= 5
    assert live["failureThreshold"] * live["periodSeconds"] >= 60
    assert ready["periodSeconds"] * ready["failureThreshold"] <= 15  # a drain leaves soon


def test_grace_period_covers_the_whole_drain(every: Rendered) -> None:
    """preStop, then the server's drain (RNNSERVE_SHUTDOWN_GRACE), then the supervisor kills
    workers still running at SHUTDOWN_GRACE + HANDOFF_WAIT + STOP_MARGIN: all of it must end
    before the kubelet's SIGKILL, with a margin."""
    spec = every.pod("rnnserve")["spec"]
    container = every.rnnserve_container()
    env = env_values(container)
    pre_stop = seconds(container["lifecycle"]["preStop"]["exec"]["command"])
    drain = (
        pre_stop
        + float(env["RNNSERVE_SHUTDOWN_GRACE"])
        + float(env.get("RNNSERVE_HANDOFF_WAIT") or ServerConfig.handoff_wait)
        + STOP_MARGIN
    )
    assert spec["terminationGracePeriodSeconds"] >= drain + DRAIN_MARGIN, drain
    if not every.scaled:
        return
    # The proxy: preStop, then nginx's graceful stop closes streams after worker_shutdown_timeout.
    proxy = every.pod("rnnserve-proxy")["spec"]
    (nginx,) = proxy["containers"]
    timeout = re.search(r"worker_shutdown_timeout (\d+)s;", every.proxy_template()).group(1)
    pre_stop = seconds(nginx["lifecycle"]["preStop"]["exec"]["command"])
    assert proxy["terminationGracePeriodSeconds"] >= pre_stop + int(timeout) + DRAIN_MARGIN


def test_the_memory_limit_is_the_one_the_defaults_are_sized_for(every: Rendered) -> None:
    resources = every.rnnserve_container()["resources"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"]
    assert resources["limits"]["memory"] == ("4Gi" if every.on_gpu else "1Gi")
    assert CONTAINER_LIMIT == 2**30
    reliability = (ROOT / "docs" / "reliability.md").read_text()
    assert re.search(r"1 GiB container limit of\s+`deploy/kubernetes/overlays/cpu`", reliability)
    tmp = next(v for v in every.pod("rnnserve")["spec"]["volumes"] if v["name"] == "tmp")
    assert tmp["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Mi"}  # counts in the limit


def test_every_container_is_hardened(every: Rendered) -> None:
    for deployment in every.deployments():
        name = deployment["metadata"]["name"]
        spec = deployment["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False  # none of them talks to the API
        assert spec["enableServiceLinks"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostNetwork" not in spec and "hostPID" not in spec and "hostIPC" not in spec
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, container["name"]
            assert context.get("privileged", False) is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}
            assert context["runAsNonRoot"] is True and context["runAsUser"] >= 10000
            gpu = {"nvidia.com/gpu"} if every.on_gpu and name == "rnnserve" else set()
            assert set(container["resources"]["requests"]) == {"cpu", "memory"}, name
            assert set(container["resources"]["limits"]) == {"cpu", "memory"} | gpu, name
            assert "livenessProbe" in container and "readinessProbe" in container
            # What a read-only root leaves writable: volumes, every one bounded.
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for mount in container.get("volumeMounts", []):
                volume = volumes[mount["name"]]
                if "emptyDir" in volume:
                    assert "sizeLimit" in volume["emptyDir"], mount
                else:
                    assert mount.get("readOnly") is True, mount


def test_the_gpu_overlays_get_a_gpu_and_use_it(every: Rendered) -> None:
    """One GPU, the CUDA image, the device asked for by name (a pod without a usable GPU fails
    its start rather than serving on the CPU unnoticed), one worker per GPU, and the taint
    GPU nodes carry tolerated; the CPU overlays ask for none of it."""
    container = every.rnnserve_container()
    env = env_values(container)
    tolerations = every.pod("rnnserve")["spec"].get("tolerations", [])
    if not every.on_gpu:
        assert "RNNSERVE_DEVICE" not in env and not tolerations
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        return
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env["RNNSERVE_DEVICE"] == "cuda" and env["RNNSERVE_WORKERS"] == "1"
    (workers,) = [e for e in container["env"] if e["name"] == "RNNSERVE_WORKERS"]
    assert "valueFrom" not in workers
    assert tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_images_are_pinned(every: Rendered) -> None:
    for deployment in every.deployments():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+(-gpu)?", image), image  # a patch release
            assert container["imagePullPolicy"] == "IfNotPresent", image
    if every.scaled:
        (nginx,) = every.pod("rnnserve-proxy")["spec"]["containers"]
        version = tuple(int(n) for n in nginx["image"].rsplit(":", 1)[1].split("."))
        assert version >= (1, 27, 3)  # `resolve` in an upstream's `server`, in nginx open source


def test_nothing_names_a_namespace(every: Rendered) -> None:
    for doc in every.docs:
        assert "namespace" not in doc["metadata"], doc["metadata"]
    for path in KUBERNETES.rglob("*.yaml"):
        text = path.read_text()
        assert ".default." not in text and "namespace: default" not in text, path
        assert not re.search(r"\.svc\.cluster\.local|kube-system|^namespace:", text, re.M), path
    if every.scaled:
        (nginx,) = every.pod("rnnserve-proxy")["spec"]["containers"]
        (namespace,) = [e for e in nginx["env"] if e["name"] == "POD_NAMESPACE"]
        assert namespace["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def render_like_the_image(nginx: dict, template: str) -> str:
    """What the image's entrypoint writes: envsubst of the variables NGINX_ENVSUBST_FILTER
    matches, NGINX_LOCAL_RESOLVERS from /etc/resolv.conf when asked for; nothing else."""
    env = {e["name"]: e.get("value", "<from the pod>") for e in nginx["env"]}
    if env.get("NGINX_ENTRYPOINT_LOCAL_RESOLVERS"):
        env["NGINX_LOCAL_RESOLVERS"] = "10.96.0.10"
    wanted = re.compile(env["NGINX_ENVSUBST_FILTER"])
    return re.sub(
        r"\$\{(\w+)\}|\$(\w+)",
        lambda m: (
            env[m.group(1) or m.group(2)]
            if wanted.search(m.group(1) or m.group(2)) and (m.group(1) or m.group(2)) in env
            else m.group(0)
        ),
        template,
    )


def test_the_proxy_config_renders_in_any_namespace(scaled: Rendered) -> None:
    spec = scaled.pod("rnnserve-proxy")["spec"]
    (nginx,) = spec["containers"]
    rendered = render_like_the_image(nginx, scaled.proxy_template())
    assert "${" not in rendered, rendered
    assert "hash $http_x_rnnserve_session consistent;" in rendered  # nginx's own variable
    assert re.search(
        r"server rnnserve-headless\.<from the pod>\.svc\.cluster\.local:8500 "
        r"resolve;",
        rendered,
    )
    assert re.search(r"resolver 10\.96\.0\.10 valid=\d+s;", rendered)
    # The image renders into /etc/nginx/conf.d, which must be writable; nginx reads it there.
    mounts = {m["mountPath"]: m["name"] for m in nginx["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/etc/nginx/conf.d"]]
    assert volumes[mounts["/etc/nginx/templates"]]["configMap"]["name"] == "rnnserve-proxy"
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert nginx["args"][:3] == ["nginx", "-c", "/etc/nginx/conf.d/nginx.conf"]
    listen = {int(p) for p in re.findall(r"listen (\d+);", rendered)}
    assert listen == {p["containerPort"] for p in nginx["ports"]}


def test_state_store_proxy_and_policies_point_at_each_other(scaled: Rendered) -> None:
    deployment = scaled.find("Deployment", "rnnserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    env = env_values(scaled.rnnserve_container())
    host, port = re.fullmatch(
        r"redis://:\$\(REDIS_PASSWORD\)@([^:/]+):(\d+)/\d+", env["RNNSERVE_STATE_STORE"]
    ).groups()
    redis = scaled.find("Service", host)
    assert int(port) in [p["port"] for p in redis["spec"]["ports"]]
    headless = scaled.find("Service", "rnnserve-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == labels
    nginx = scaled.proxy_template()
    assert re.search(r"server rnnserve-headless\.[\w.${}]+:8500 resolve;", nginx)
    template = (DEPLOY / "nginx" / "rnnserve.conf.template").read_text()
    for directive in (
        "hash $http_x_rnnserve_session consistent;",
        "grpc_pass grpc://rnnserve;",
        "grpc_next_upstream error timeout;",
        "grpc_read_timeout 3600s;",
    ):
        assert directive in nginx and directive in template, directive
    # HTTP/2 (gRPC) on the listening port: `http2 on;` in the cluster's nginx (>= 1.25.1); the
    # tests' template keeps `listen ... http2`, which Debian's nginx 1.22 understands.
    assert re.search(r"listen 8080;\s+http2 on;", nginx) and "http2;" not in nginx
    assert re.search(r"listen @LISTEN@ http2;", template)
    policy = scaled.find("NetworkPolicy", "rnnserve")["spec"]
    grpc = [r for r in policy["ingress"] if {p["port"] for p in r["ports"]} == {8500}]
    proxy_labels = scaled.pod("rnnserve-proxy")["metadata"]["labels"]
    assert grpc == [
        {"from": [{"podSelector": {"matchLabels": proxy_labels}}], "ports": grpc[0]["ports"]}
    ]
    assert scaled.find("PodDisruptionBudget", "rnnserve")["spec"]["selector"]["matchLabels"] == (
        labels
    )
    target = scaled.find("HorizontalPodAutoscaler", "rnnserve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "rnnserve")


def test_redis_needs_the_password_from_the_secret(scaled: Rendered) -> None:
    secret = {"name": "rnnserve-redis", "key": "password"}
    container = scaled.rnnserve_container()
    names = [e["name"] for e in container["env"]]
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == secret
    # $(VAR) expands only when VAR is defined earlier in the list.
    assert names.index("REDIS_PASSWORD") < names.index("RNNSERVE_STATE_STORE")
    spec = scaled.pod("rnnserve-redis")["spec"]
    (redis,) = spec["containers"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == secret["name"]
    assert volume["secret"]["items"] == [{"key": secret["key"], "path": "password"}]
    (mount,) = [m for m in redis["volumeMounts"] if m["name"] == volume["name"]]
    path = f"{mount['mountPath']}/password"
    # The file is root's, readable by the pod's fsGroup, which the redis user is in.
    assert volume["secret"]["defaultMode"] == 0o440
    assert spec["securityContext"]["fsGroup"] == redis["securityContext"]["runAsGroup"]
    script = redis["command"][-1]
    assert redis["command"][:2] == ["sh", "-c"] and "exec redis-server - <<EOF" in script
    assert f"requirepass $(cat {path})" in script.splitlines()
    assert (
        f'REDISCLI_AUTH="$(cat {path})" redis-cli ping'
        in redis["readinessProbe"]["exec"]["command"][-1]
    )
    assert "env" not in redis  # the password reaches Redis only as a file
    assert not [d for d in scaled.docs if d["kind"] == "Secret"]  # the user creates it
    policy = scaled.find("NetworkPolicy", "rnnserve-redis")["spec"]
    (rule,) = policy["ingress"]
    rnnserve_labels = scaled.pod("rnnserve")["metadata"]["labels"]
    assert rule["from"] == [{"podSelector": {"matchLabels": rnnserve_labels}}]


@pytest.mark.parametrize("name", ["rnnserve", "rnnserve-proxy"])
def test_replicas_spread_over_nodes_and_are_budgeted(scaled: Rendered, name: str) -> None:
    template = scaled.pod(name)
    labels = template["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in template["spec"]["topologySpreadConstraints"]}
    node = spread["kubernetes.io/hostname"]
    assert node["whenUnsatisfiable"] == "DoNotSchedule" and node["maxSkew"] == 1
    assert node["nodeTaintsPolicy"] == "Honor"  # tainted nodes are no domain to fill
    for constraint in spread.values():
        assert constraint["labelSelector"] == {"matchLabels": labels}
    budget = scaled.find("PodDisruptionBudget", name)["spec"]
    assert budget["selector"]["matchLabels"] == labels
    assert budget["maxUnavailable"] == 1 < scaled.find("Deployment", name)["spec"]["replicas"]


def test_network_policies_name_the_ports_the_pods_listen_on(every: Rendered) -> None:
    for policy in (d for d in every.docs if d["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"]["matchLabels"]
        (deployment,) = [
            d
            for d in every.deployments()
            if d["spec"]["template"]["metadata"]["labels"] == selector
        ]
        ports = {
            p["containerPort"]
            for c in deployment["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for rule in policy["spec"]["ingress"]:
            assert {p["port"] for p in rule["ports"]} <= ports, policy["metadata"]["name"]


def test_manifests_validate_against_the_kubernetes_schemas(every: Rendered) -> None:
    for doc in every.docs:
        try:
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{every.overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc}")


def test_workers_follow_the_pods_cpu_limit(every: Rendered) -> None:
    followers = [("rnnserve-proxy", "NGINX_WORKER_PROCESSES")] if every.scaled else []
    if not every.on_gpu:  # on a GPU, one worker per GPU (the test above)
        followers.append(("rnnserve", "RNNSERVE_WORKERS"))
    for name, variable in followers:
        (container,) = every.pod(name)["spec"]["containers"]
        (workers,) = [e for e in container["env"] if e["name"] == variable]
        field = workers["valueFrom"]["resourceFieldRef"]
        assert (field["resource"], field["divisor"]) == ("limits.cpu", "1")
        assert field["containerName"] == container["name"]
        assert "cpu" in container["resources"]["limits"]
    if every.scaled:
        assert "worker_processes ${NGINX_WORKER_PROCESSES};" in every.proxy_template()


@pytest.fixture(scope="module")
def checkov_failures(tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str]]:
    """(check id, Kind/name) of every check checkov fails on any overlay, as rendered."""
    if not CHECKOV.exists():
        pytest.fail(
            f"checkov is not installed ({CHECKOV} is missing): run `make install-test`, "
            "which puts it in .venv-checkov"
        )
    pinned = re.search(
        r"^CHECKOV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M
    ).group(1)
    version = subprocess.run(
        [CHECKOV, "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert version == pinned, (
        f"checkov {version}, the Makefile pins {pinned}: run `make install-test`"
    )
    rendered = tmp_path_factory.mktemp("overlays")
    for overlay in OVERLAYS:
        (rendered / f"{overlay}.yaml").write_text(yaml.safe_dump_all(render(overlay)))
    run = subprocess.run(
        [
            CHECKOV,
            "--directory",
            rendered,
            "--framework",
            "kubernetes",
            "--output",
            "json",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode in (0, 1), run.stderr[-3000:]  # 1: some check failed
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    (report,) = [r for r in reports if r["check_type"] == "kubernetes"]
    summary = report["summary"]
    assert summary["parsing_errors"] == 0, summary  # a file checkov cannot read is unchecked
    documents = sum(len(render(overlay)) for overlay in OVERLAYS)
    assert summary["resource_count"] >= documents - 6, summary  # (PDBs, HPAs: no checks)
    assert summary["passed"] > 200, summary
    failures = set()
    for failed in report["results"]["failed_checks"]:
        kind, _namespace, name = failed["resource"].split(".", 2)
        failures.add((failed["check_id"], f"{kind}/{name}"))
    return failures


def accepted_findings() -> dict[tuple[str, str], str]:
    accepted = {}
    for entry in yaml.safe_load(ACCEPTED.read_text()):
        assert set(entry) == {"check", "resources", "reason"}, entry
        assert len(entry["reason"].split()) >= 15, entry  # a reason, not a label
        for resource in entry["resources"]:
            assert (entry["check"], resource) not in accepted, (entry["check"], resource)
            accepted[entry["check"], resource] = entry["reason"]
    return accepted


def test_checkov_finds_nothing_that_is_not_accepted(checkov_failures: set) -> None:
    new = sorted(checkov_failures - set(accepted_findings()))
    assert not new, (
        "checkov fails these checks on deploy/kubernetes's overlays; fix the manifests or "
        f"accept them in {ACCEPTED.relative_to(ROOT)} with a reason: {new}"
    )


def test_every_accepted_finding_still_occurs(checkov_failures: set) -> None:
    stale = sorted(set(accepted_findings()) - checkov_failures)
    assert not stale, (
        f"checkov no longer fails these; remove them from {ACCEPTED.relative_to(ROOT)}: {stale}"
    )
