"""deploy/ stays consistent with the server's flags, ports and the Dockerfile (no cluster here)."""

from __future__ import annotations

import re
from dataclasses import fields

import kubernetes_validate
import pytest
import yaml

from rnnserve.config import ENV_PREFIX, ServerConfig
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCS = [doc for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict:
    (doc,) = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_every_piece_is_there() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in DOCS}
    assert {("Deployment", "rnnserve"), ("Service", "rnnserve-headless"),
            ("PodDisruptionBudget", "rnnserve"), ("HorizontalPodAutoscaler", "rnnserve"),
            ("Deployment", "rnnserve-redis"), ("Service", "rnnserve-redis"),
            ("ConfigMap", "rnnserve-proxy"), ("Deployment", "rnnserve-proxy"),
            ("Service", "rnnserve")} <= kinds


def test_replicas_match_the_server_flags_and_image() -> None:
    pod = find("Deployment", "rnnserve")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    known = {ENV_PREFIX + f.name.upper() for f in fields(ServerConfig)}
    assert set(env) <= known, set(env) - known
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(env["RNNSERVE_GRPC_PORT"]),
                     "metrics": int(env["RNNSERVE_METRICS_PORT"])}
    assert ports == {"grpc": ServerConfig.grpc_port, "metrics": ServerConfig.metrics_port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"]  # the gRPC health service
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["RNNSERVE_SHUTDOWN_GRACE"]) + pre_stop
    uid = re.search(r"--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert pod["spec"]["securityContext"]["runAsUser"] == int(uid)


def test_state_store_proxy_and_policies_point_at_each_other() -> None:
    deployment = find("Deployment", "rnnserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    env = {e["name"]: e.get("value")
           for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    host, port = re.match(r"redis://([^:/]+):(\d+)/\d+$", env["RNNSERVE_STATE_STORE"]).groups()
    redis = find("Service", host)
    assert int(port) in [p["port"] for p in redis["spec"]["ports"]]
    headless = find("Service", "rnnserve-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"] == labels
    nginx = find("ConfigMap", "rnnserve-proxy")["data"]["nginx.conf"]
    assert "hash $http_x_rnnserve_session consistent;" in nginx
    assert re.search(r"server rnnserve-headless\.[\w.]+:8500 resolve;", nginx)
    template = (DEPLOY / "nginx" / "rnnserve.conf.template").read_text()
    for directive in ("hash $http_x_rnnserve_session consistent;", "grpc_pass grpc://rnnserve;",
                      "grpc_next_upstream error timeout;", "http2;"):
        assert directive in nginx and directive in template, directive
    assert find("PodDisruptionBudget", "rnnserve")["spec"]["selector"]["matchLabels"] == labels
    target = find("HorizontalPodAutoscaler", "rnnserve")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "rnnserve")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifests_validate_against_the_kubernetes_schemas(doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_workers_follow_the_pods_cpu_limit() -> None:
    (container,) = find("Deployment", "rnnserve")["spec"]["template"]["spec"]["containers"]
    (workers,) = [e for e in container["env"] if e["name"] == "RNNSERVE_WORKERS"]
    field = workers["valueFrom"]["resourceFieldRef"]
    assert (field["resource"], field["divisor"]) == ("limits.cpu", "1")
    assert field["containerName"] == container["name"]
    assert "cpu" in container["resources"]["limits"]
