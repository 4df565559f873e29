"""Tests for `KubeApiServer`: real etcd + kube-apiserver, driven over plain REST (httpx) and helm.

Nothing is skipped: if the binaries can't be found or built, the fixture errors.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from morgana_devtools.kube_apiserver import KubeApiServer, ensure_binaries
from morgana_devtools.services import eventually


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    with KubeApiServer(log_dir=tmp_path_factory.mktemp("kube-logs")) as server:
        yield server


@pytest.fixture
def client(kube: KubeApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=kube.url,
        headers={"Authorization": f"Bearer {kube.token}"},
        verify=ssl.create_default_context(cafile=kube.ca_file),
        timeout=30,
    ) as c:
        yield c


def ok(response: httpx.Response) -> dict:
    assert response.is_success, (
        f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
    )
    return response.json()


@pytest.fixture
def namespace(client: httpx.Client) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    ok(client.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))
    return name


def test_core_and_apps_objects_round_trip(client: httpx.Client, namespace: str) -> None:
    assert ok(client.get(f"/api/v1/namespaces/{namespace}"))["status"]["phase"] == "Active"

    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"greeting": "hi"}}
    ok(client.post(f"/api/v1/namespaces/{namespace}/configmaps", json=cm))
    assert ok(client.get(f"/api/v1/namespaces/{namespace}/configmaps/settings"))["data"] == {"greeting": "hi"}

    labels = {"app": "web"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
            },
        },
    }
    ok(client.post(f"/apis/apps/v1/namespaces/{namespace}/deployments", json=deployment))
    got = ok(client.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/web"))
    assert got["spec"]["replicas"] == 2
    assert got["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"
    # The API server validates: a Deployment whose selector doesn't match its pods is refused.
    bad = json.loads(json.dumps(deployment))
    bad["metadata"]["name"] = "bad"
    bad["spec"]["selector"]["matchLabels"] = {"app": "other"}
    assert client.post(f"/apis/apps/v1/namespaces/{namespace}/deployments", json=bad).status_code == 422


def test_crd_becomes_established_and_serves_custom_objects(client: httpx.Client, namespace: str) -> None:
    group, plural = "morgana.test", f"widgets{uuid.uuid4().hex[:6]}"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": plural[:-1], "kind": plural.capitalize()[:-1]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}},
                        }
                    },
                }
            ],
        },
    }
    ok(client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd))

    def conditions() -> dict[str, str]:
        status = ok(client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{group}"))
        return {c["type"]: c["status"] for c in (status.get("status") or {}).get("conditions") or []}

    eventually(
        lambda: conditions().get("Established") == "True",
        30,
        interval=0.2,
        what=lambda: f"CRD Established (conditions: {conditions()})",
    )

    path = f"/apis/{group}/v1/namespaces/{namespace}/{plural}"
    obj = {
        "apiVersion": f"{group}/v1",
        "kind": crd["spec"]["names"]["kind"],
        "metadata": {"name": "w1"},
        "spec": {"size": 3},
    }
    # Discovery of the new resource can lag Established by a moment.
    response = eventually(
        lambda: (r := client.post(path, json=obj)).status_code != 404 and r,
        30,
        interval=0.2,
        what=f"POST {path} answered (not 404)",
    )
    ok(response)
    assert ok(client.get(f"{path}/w1"))["spec"] == {"size": 3}
    # The schema is enforced.
    bad = {**obj, "metadata": {"name": "w2"}, "spec": {"size": "big"}}
    assert client.post(path, json=bad).status_code == 422


def test_unauthenticated_and_unauthorized_requests_are_refused(kube: KubeApiServer, client: httpx.Client) -> None:
    verify = ssl.create_default_context(cafile=kube.ca_file)
    anonymous = httpx.get(kube.url + "/api/v1/namespaces", verify=verify)
    assert anonymous.status_code in (401, 403), anonymous.text
    wrong_token = httpx.get(kube.url + "/api/v1/namespaces", verify=verify, headers={"Authorization": "Bearer nope"})
    assert wrong_token.status_code == 401
    # RBAC is enforced: an authenticated user with no bindings is forbidden (via impersonation).
    nobody = client.get("/api/v1/namespaces", headers={"Impersonate-User": "nobody"})
    assert nobody.status_code == 403, nobody.text


def test_helm_talks_to_the_server(kube: KubeApiServer, tmp_path: Path) -> None:
    helm = ensure_binaries()["helm"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "KUBECONFIG"))},
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }

    def run(*args: str) -> str:
        result = subprocess.run(
            [str(helm), "--kubeconfig", str(kube.kubeconfig), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert run("version", "--short").startswith("v3.")
    assert json.loads(run("list", "-A", "-o", "json")) == []
