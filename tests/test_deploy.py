"""`make deploy-check` and what it catches: the manifests of deploy/k8s rendered by
`kubectl kustomize`, validated offline against the Kubernetes 1.32 schemas, their
container arguments compared with what serving.tritonserver builds.

No cluster runs here: the rendered objects are checked, not deployed (a mutated copy
stands for a broken manifest).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from deploy import check

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_objects() -> list[dict[str, Any]]:
    return check.render(check.kubectl(), ["overlays/gpu"])


def _deployment_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [item for item in objects if item["kind"] == "Deployment"]
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_deploy_check_passes_for_every_rendering(summary) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "deploy.check"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = [line for line in result.stdout.splitlines() if not line.startswith(" ")]
    assert len(verdicts) == len(check.renderings()) and all(v.startswith("ok") for v in verdicts)
    summary("make deploy-check", "\n".join(verdicts))


def test_the_pod_runs_the_flags_model_repository_server_builds(
    gpu_objects: list[dict[str, Any]],
) -> None:
    from serving.tritonserver import ServerSettings, server_flags

    report = check.check_rendering("gpu", gpu_objects, check.KUBERNETES_VERSION)
    assert report.problems == []
    (serving,) = report.serving
    settings = ServerSettings(host="0.0.0.0", grpc_port=8001, http_port=8000, metrics_port=8002)
    repository = "secret://image-edit-object-store/repository"
    assert serving.flags == server_flags(repository, settings, check.ADMIN_KEY_STANDIN)


def _problems(objects: list[dict[str, Any]]) -> list[str]:
    return check.check_rendering("mutated", objects, check.KUBERNETES_VERSION).problems


def test_a_port_that_differs_from_the_arguments_is_caught(
    gpu_objects: list[dict[str, Any]],
) -> None:
    objects = copy.deepcopy(gpu_objects)
    container = _deployment_container(objects)
    grpc = next(port for port in container["ports"] if port["name"] == "grpc")
    grpc["containerPort"] = 9001
    assert any("--grpc-port=8001 (declared: --grpc-port=9001)" in p for p in _problems(objects))


def test_bare_tritonserver_and_unknown_arguments_are_caught(
    gpu_objects: list[dict[str, Any]],
) -> None:
    objects = copy.deepcopy(gpu_objects)
    _deployment_container(objects)["args"] = ["tritonserver", "--model-repository=/models"]
    assert any("runs tritonserver itself" in p for p in _problems(objects))
    objects = copy.deepcopy(gpu_objects)
    _deployment_container(objects)["args"].append("--model-control-mode=poll")
    assert any("refuses these arguments" in p for p in _problems(objects))


def test_a_grace_period_shorter_than_the_drain_is_caught(
    gpu_objects: list[dict[str, Any]],
) -> None:
    objects = copy.deepcopy(gpu_objects)
    (deployment,) = [item for item in objects if item["kind"] == "Deployment"]
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 60
    assert any("must exceed preStop 5 + --grace 60" in p for p in _problems(objects))


def test_schema_errors_secrets_and_probes_are_caught(gpu_objects: list[dict[str, Any]]) -> None:
    objects = copy.deepcopy(gpu_objects)
    container = _deployment_container(objects)
    container["readinessProbe"]["httpGet"]["path"] = "/v2/health/live"
    container["readinessProbe"]["periodSecond"] = 5  # a typo: strict schemas refuse it
    container["env"] = [e for e in container["env"] if e["name"] != "AWS_SECRET_ACCESS_KEY"]
    problems = _problems(objects)
    assert any("periodSecond" in p for p in problems)
    assert any("readinessProbe must be GET /v2/health/ready" in p for p in problems)
    assert any("AWS_SECRET_ACCESS_KEY must come from a Secret" in p for p in problems)


def test_an_autoscaler_metric_without_an_adapter_rule_is_caught(
    gpu_objects: list[dict[str, Any]],
) -> None:
    objects = copy.deepcopy(gpu_objects)
    (autoscaler,) = [item for item in objects if item["kind"] == "HorizontalPodAutoscaler"]
    autoscaler["spec"]["metrics"][0]["pods"]["metric"]["name"] = "avg_time_queue_us"
    assert any("are not prometheus-adapter rules" in p for p in _problems(objects))
