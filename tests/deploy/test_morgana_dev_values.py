"""deploy/values/morgana-dev.yaml rendered by the real helm, as deploy/install.sh installs it:
valid objects, the images install.sh pushes, and the dependencies' Service and Secret names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from morgana_devtools.kube_apiserver import KUBERNETES_VERSION
from tests.chart.helm import declared_env
from tests.deploy.conftest import INSTALL_SH, ROOT, VALUES, load_yaml

CHART = ROOT / "charts/morgana"
DEV_VALUES = VALUES / "morgana-dev.yaml"
KUBE_SCHEMA_VERSION = KUBERNETES_VERSION.lstrip("v").rsplit(".", 1)[0] + ".0"


@pytest.fixture(scope="module")
def objects(helm_binary: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            str(helm_binary),
            "template",
            "morgana",
            str(CHART),
            "--namespace",
            "morgana",
            "-f",
            str(DEV_VALUES),
            "--include-crds",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"helm template with morgana-dev.yaml failed:\n{result.stderr}"
    return [o for o in yaml.safe_load_all(result.stdout) if o]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def container_env(obj: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(obj)["containers"]
    return declared_env(container, objects)


def all_containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (o, c)
        for o in objects
        if o["kind"] in ("Deployment", "Job", "Pod")
        for c in pod_spec(o).get("containers", []) + pod_spec(o).get("initContainers", [])
    ]


def test_the_dev_release_renders_valid_kubernetes_objects(objects: list[dict[str, Any]]) -> None:
    crds = {}
    for crd in (o for o in objects if o["kind"] == "CustomResourceDefinition"):
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        crds[f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"] = jsonschema.Draft7Validator(
            version["schema"]["openAPIV3Schema"]
        )
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        key = f"{obj['apiVersion']}/{obj['kind']}"
        if key in crds:
            errors = [e.message for e in crds[key].iter_errors(obj)]
            assert not errors, f"{name}: {errors}"
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_SCHEMA_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            raise AssertionError(f"{name}: {error.message} at {list(error.path)}") from error
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "morgana-api"), ("Deployment", "morgana-agent"), ("Job", "morgana-migrate")} <= kinds
    # Every credential comes from the Secrets install.sh and CloudNativePG create: no chart Secret.
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_images_are_the_ones_install_sh_pushes_to_the_local_registry(objects: list[dict[str, Any]]) -> None:
    script = INSTALL_SH.read_text()
    registry = re.search(r'IMAGE_REGISTRY="\$\{IMAGE_REGISTRY:-([^}]+)\}"', script)[1]
    tag = re.search(r'IMAGE_TAG="\$\{IMAGE_TAG:-([^}]+)\}"', script)[1]
    pushed = {f"{registry}/morgana-{c}:{tag}" for c in ("api", "agent", "controller")}
    images = {c["image"] for _, c in all_containers(objects)}
    assert images <= pushed, f"rendered {sorted(images)}, install.sh pushes {sorted(pushed)}"
    assert {f"{registry}/morgana-api:{tag}", f"{registry}/morgana-agent:{tag}"} <= images
    # The tag is rebuilt in place, so it must be pulled again.
    assert {c.get("imagePullPolicy") for _, c in all_containers(objects)} == {"Always"}


def test_the_release_points_at_the_dependency_charts_services_and_secrets(objects: list[dict[str, Any]]) -> None:
    cnpg, valkey, livekit = (load_yaml(VALUES / f) for f in ("cnpg-cluster.yaml", "valkey.yaml", "livekit-server.yaml"))
    api = find(objects, "Deployment", "morgana-api")
    env = container_env(api, objects)
    assert env["ENVIRONMENT"] == "development"

    # CloudNativePG: Service <cluster>-rw, Secret <cluster>-app owned by initdb.owner.
    cluster = cnpg["fullnameOverride"]
    assert env["POSTGRES_HOST"] == f"{cluster}-rw"
    assert env["POSTGRES_PORT"] == "5432"
    assert env["POSTGRES_DB"] == cnpg["cluster"]["initdb"]["database"]
    for variable, key in (("POSTGRES_USER", "username"), ("POSTGRES_PASSWORD", "password")):
        assert env[variable]["secretKeyRef"] == {"name": f"{cluster}-app", "key": key}

    # Valkey: Service <fullname> on service.port, no password.
    assert env["REDIS_URL"] == f"redis://{valkey['fullnameOverride']}:{valkey['service']['port']}/0"
    assert valkey["auth"]["enabled"] is False and "REDIS_PASSWORD" not in env

    # LiveKit: Service <fullname> on loadBalancer.servicePort, keys from the Secret LiveKit mounts.
    assert env["LIVEKIT_URL"] == f"ws://{livekit['fullnameOverride']}:{livekit['loadBalancer']['servicePort']}"
    assert env["LIVEKIT_PUBLIC_URL"] == f"ws://localhost:{livekit['livekit']['port']}"
    for variable in ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        assert env[variable]["secretKeyRef"]["name"] == livekit["storeKeysInSecret"]["existingSecret"]
    agent_env = container_env(find(objects, "Deployment", "morgana-agent"), objects)
    assert agent_env["LIVEKIT_URL"] == env["LIVEKIT_URL"]


def test_development_sizes_fit_a_laptop(objects: list[dict[str, Any]]) -> None:
    def quantity(value: str) -> float:
        units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3}
        for unit, factor in units.items():
            if value.endswith(unit):
                return float(value[: -len(unit)]) * factor
        return float(value)

    workloads = [o for o in objects if o["kind"] == "Deployment"]
    replicas = {o["metadata"]["name"]: o["spec"].get("replicas", 1) for o in workloads}
    assert replicas["morgana-api"] == 1 and replicas["morgana-agent"] == 1
    cpu = memory = 0.0
    for obj in workloads:
        for container in pod_spec(obj)["containers"]:
            requests = container["resources"]["requests"]
            cpu += quantity(str(requests["cpu"])) * replicas[obj["metadata"]["name"]]
            memory += quantity(str(requests["memory"])) * replicas[obj["metadata"]["name"]]
    assert cpu <= 0.5 and memory <= 1 * 2**30, f"requests {cpu} CPU, {memory / 2**20:.0f} MiB"
    assert not [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    agent = pod_spec(find(objects, "Deployment", "morgana-agent"))
    drain = int(container_env(find(objects, "Deployment", "morgana-agent"), objects)["DRAIN_TIMEOUT_SECONDS"])
    assert drain < agent["terminationGracePeriodSeconds"] <= 60
