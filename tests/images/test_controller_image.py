"""The controller image as the chart runs it, and `helm uninstall` while it runs.

A real API server (etcd, kube-apiserver, kube-controller-manager with the Job controller), the
chart installed by helm with the images built here, and PodmanKubelet running the controller's
pod and the uninstall hook's pod as containers of the controller image, in-cluster, with tokens
for the chart's own ServiceAccounts and RBAC. The controller serves the release's AgentAutoscaler
and holds its finalizer, as in a cluster; uninstalling must leave nothing behind but the CRDs,
and the namespace must then delete.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from morgana_devtools.kube_apiserver import KubeApiServer, KubeClient
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.services import eventually
from tests.chart.helm import CHART, helm
from tests.images.conftest import openssl_hex
from tests.images.containers import IMAGE_TAG, BuiltImages, image_config, run_in_image
from tests.images.kubelet import PodmanKubelet

NAMESPACE = "voice"
RELEASE = "morgana"
AAS = f"/apis/morgana.dev/v1alpha1/namespaces/{NAMESPACE}/agentautoscalers"


def test_the_image_holds_the_controller_and_nothing_else(images: BuiltImages) -> None:
    ref = images.refs["controller"]
    config = image_config(ref)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["morgana-controller"] and not config.get("Cmd")
    assert {"8080/tcp", "9102/tcp"} <= set(config["ExposedPorts"])
    for module, why in (
        ("pytest", "test dependencies"),
        ("sqlalchemy", "the API's database stack"),
        ("fastapi", "the API's web framework"),
        ("livekit.agents", "the voice worker's framework"),
        ("onnxruntime", "the voice worker's VAD runtime"),
    ):
        leaked = run_in_image(ref, "python", "-c", f"import {module}")
        assert leaked.returncode != 0, f"{why} ({module}) leaked into the controller image"


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[KubeApiServer]:
    with KubeApiServer(
        log_dir=tmp_path / "kube", controller_manager=True, extra_controllers=("job-controller",)
    ) as server:
        yield server


def component(pod: dict) -> str:
    return pod["metadata"].get("labels", {}).get("app.kubernetes.io/component", "")


def names(client: KubeClient, path: str) -> set[str]:
    return {item["metadata"]["name"] for item in client.get(path)["items"]}


def test_uninstall_with_the_controller_running_stops_it_first_and_leaves_nothing(
    images: BuiltImages, kube: KubeApiServer, images_livekit: LiveKitServer, tmp_path: Path
) -> None:
    client = KubeClient(kube)
    client.namespace(NAMESPACE)
    credentials = {
        "morgana-db-app": {"username": "morgana", "password": openssl_hex(16)},
        "morgana-livekit": {"api-key": images_livekit.api_key, "api-secret": images_livekit.api_secret},
        "morgana-secrets": {
            "jwt-secret": openssl_hex(32),
            "openai-api-key": "sk-unused",
            "agent-password": openssl_hex(16),
        },
    }
    for name, data in credentials.items():
        client.create(
            f"/api/v1/namespaces/{NAMESPACE}/secrets",
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
        )
    # Only the controller and the uninstall hook run here; the API and agent pods stay Pending.
    kubelet = PodmanKubelet(kube, lambda pod: component(pod) in ("controller", "controller-stop"), tmp_path / "pods")
    kubelet.start()
    try:
        helm(
            "install",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--timeout",
            "2m",
            "--set",
            "image.registry=localhost",
            "--set",
            f"image.tag={IMAGE_TAG}",
            "--set",
            "image.pullPolicy=Never",
            "--set",
            f"livekit.url={images_livekit.url}",
            "--set",
            "livekit.existingSecret=morgana-livekit",
            "--set",
            "postgres.existingSecret=morgana-db-app",
            "--set",
            "auth.existingSecret=morgana-secrets",
            "--set",
            "llm.existingSecret=morgana-secrets",
            "--set",
            "agentUser.existingSecret=morgana-secrets",
            "--set",
            "api.migration.enabled=false",
            "--set",
            "tests.enabled=false",
            "--set",
            "controller.autoscaler.pollIntervalSeconds=1",
            kubeconfig=kube.kubeconfig,
        )

        def serving() -> bool:
            assert not kubelet.errors, kubelet.errors
            autoscaler = client.request("GET", f"{AAS}/morgana-agent", ok=(200, 404)).json()
            ready = [c for c in (autoscaler.get("status") or {}).get("conditions", []) if c["type"] == "Ready"]
            return bool(
                ready
                and ready[0]["status"] == "True"
                and "morgana.dev/autoscaler" in autoscaler["metadata"].get("finalizers", [])
            )

        eventually(serving, 60, interval=0.5, what=f"the controller serving its AgentAutoscaler:\n{kubelet.logs()}")
        peering = client.get(f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings/morgana-controller")
        assert peering["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert any(peer.startswith("morgana-controller-") for peer in peering.get("status") or {}), peering

        uninstall = helm(
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "2m",
            kubeconfig=kube.kubeconfig,
            check=False,
        )
        assert uninstall.returncode == 0, f"{uninstall.stderr}\n{kubelet.logs()}"

        # The hook stopped the controller while its RBAC still existed, and it let go by itself.
        controller, hook = kubelet.container("controller"), kubelet.container("controller-stop")
        assert controller.exit_code() == 0, controller.logs()[-6000:]
        assert "finalizer left in place" not in controller.logs(), controller.logs()[-6000:]
        assert hook.exit_code() == 0, hook.logs()[-6000:]
        assert "morgana-controller stopped" in hook.logs(), hook.logs()
        assert "took the finalizer off" not in hook.logs(), hook.logs()
        assert not kubelet.errors, kubelet.errors

        ns = f"/namespaces/{NAMESPACE}"
        left = {
            "agentautoscalers": names(client, f"/apis/morgana.dev/v1alpha1{ns}/agentautoscalers"),
            "kopfpeerings": names(client, f"/apis/kopf.dev/v1{ns}/kopfpeerings"),
            "deployments": names(client, f"/apis/apps/v1{ns}/deployments"),
            "jobs": names(client, f"/apis/batch/v1{ns}/jobs"),
            "services": names(client, f"/api/v1{ns}/services"),
            "roles": names(client, f"/apis/rbac.authorization.k8s.io/v1{ns}/roles"),
            "rolebindings": names(client, f"/apis/rbac.authorization.k8s.io/v1{ns}/rolebindings"),
            "serviceaccounts": names(client, f"/api/v1{ns}/serviceaccounts") - {"default"},
            "configmaps": names(client, f"/api/v1{ns}/configmaps") - {"kube-root-ca.crt"},
            "secrets": names(client, f"/api/v1{ns}/secrets") - set(credentials),
            "poddisruptionbudgets": names(client, f"/apis/policy/v1{ns}/poddisruptionbudgets"),
        }
        assert not any(left.values()), left
        eventually(lambda: not names(client, f"/api/v1{ns}/pods"), 30, what="every pod gone")
        # Nothing holds the namespace up any more.
        client.delete(f"/api/v1/namespaces/{NAMESPACE}")
        eventually(
            lambda: client.request("GET", f"/api/v1/namespaces/{NAMESPACE}", ok=(200, 404)).status_code == 404,
            60,
            what="the namespace deleted",
        )
    finally:
        kubelet.stop()
