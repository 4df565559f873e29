"""The node tier: a real single-node cluster (morgana_devtools.kube_node) whose pods really run,
with the images built from images/*/Dockerfile. Every test here carries the `node` marker.

`installed`: the chart installed as its README tells an operator to, once for the tier: every
credential in an existing Secret (made with `openssl rand -hex`), the images built here, and
Postgres, Valkey and LiveKit running in the same cluster as pods of their own
(morgana_devtools.cluster_services). Only the model is outside: the OpenAI-protocol stand-in runs
on this machine, and the pods reach it at the node's address as they would reach a provider.
Nothing marks a Job or Pod done: the migration hook Job, the API, agent and controller pods and
the `helm test` Pod all run."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from morgana_devtools import cluster_services
from morgana_devtools.kube_apiserver import KubeApiServer, KubeClient
from morgana_devtools.kube_node import KubeNode, host_address
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import eventually
from tests.chart.helm import CHART, helm
from tests.conftest import OPENAI_KEY
from tests.images.conftest import images, openssl_hex  # noqa: F401 (the session's built images)
from tests.images.containers import IMAGE_TAG, BuiltImages


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/node/" in str(item.path):
            item.add_marker(pytest.mark.node)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KubeApiServer, KubeNode]]:
    if os.geteuid() != 0:
        # A kubelet manages cgroups, mounts and network namespaces. Under CI a missing
        # prerequisite is a failure, not a skip.
        message = "the node tier needs root"
        pytest.fail(message) if os.environ.get("CI") == "true" else pytest.skip(message)
    logs = tmp_path_factory.mktemp("node-logs")
    with (
        KubeApiServer(controller_manager=True, advertise_address=host_address(), log_dir=logs) as kube,
        KubeNode(kube) as node,
    ):
        yield kube, node


@pytest.fixture(scope="session")
def kube(cluster: tuple[KubeApiServer, KubeNode]) -> KubeClient:
    return KubeClient(cluster[0])


@pytest.fixture(scope="session")
def node(cluster: tuple[KubeApiServer, KubeNode]) -> KubeNode:
    return cluster[1]


@pytest.fixture(scope="session")
def node_image(images: BuiltImages, node: KubeNode) -> Callable[[str], str]:  # noqa: F811
    """`node_image("api")`: that built image's reference, loaded into the node's containerd once
    (pods use imagePullPolicy: Never)."""
    loaded: set[str] = set()

    def load(component: str) -> str:
        ref = images.refs[component]
        if ref not in loaded:
            node.load_image(ref)
            loaded.add(ref)
        return ref

    return load


NAMESPACE = "voice"
RELEASE = "morgana"
DATABASE = "morgana"
AGENT_NAME = "morgana-agent"
# The autoscaler's settings for this tier: one call per worker, so that each caller needs a worker
# of its own, and short windows, so that scale-down and redispatch happen within a test.
AUTOSCALER = {
    "agent.maxConcurrentCalls": "1",
    "controller.autoscaler.minReplicas": "1",
    "controller.autoscaler.maxReplicas": "3",
    "controller.autoscaler.headroom": "1",
    "controller.autoscaler.scaleDownStabilizationSeconds": "15",
    "controller.autoscaler.pollIntervalSeconds": "1",
    "controller.autoscaler.redispatch.graceSeconds": "3",
}


@dataclass
class Installed:
    """The release on the node, and how this machine reaches its parts."""

    kube: KubeApiServer
    client: KubeClient
    node: KubeNode
    model: FakeOpenAIProcess
    api_url: str
    livekit_url: str  # the LiveKit Service, as handed to callers with their token
    livekit_key: str
    livekit_secret: str
    database_url: str  # the Postgres Service

    def helm(self, *args: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
        return helm(*args, "--namespace", NAMESPACE, kubeconfig=self.kube.kubeconfig, check=False, timeout=timeout)

    def pods(self, component: str) -> list[dict]:
        """The release's pods of `component` that are not being deleted."""
        selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component={component}"
        items = self.client.get(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}")["items"]
        return [pod for pod in items if not pod["metadata"].get("deletionTimestamp")]

    def pod(self, name: str) -> dict | None:
        response = self.client.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/{name}", ok=(200, 404))
        return response.json() if response.status_code == 200 else None

    def deployment(self, component: str) -> dict:
        return self.client.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{RELEASE}-{component}")


def ready(pod: dict) -> bool:
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions") or []}
    return conditions.get("Ready") == "True"


def create_secrets(client: KubeClient, credentials: dict[str, dict[str, str]]) -> None:
    for name, data in credentials.items():
        client.request(
            "POST",
            f"/api/v1/namespaces/{NAMESPACE}/secrets",
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
            ok=(201, 409),
        )


def start_cluster_services(client: KubeClient, node: KubeNode, postgres_secret: str, livekit_secret: str) -> None:
    """Postgres, Valkey and LiveKit as pods, from images built here; returns once all are Ready."""
    built = cluster_services.build_service_images()
    for ref in built.refs():
        node.load_image(ref)
    for item in cluster_services.objects(
        NAMESPACE,
        built,
        postgres_secret=postgres_secret,
        postgres_database=DATABASE,
        livekit_secret=livekit_secret,
    ):
        path = item.pop("_path")
        client.request("POST", path, item, ok=(201, 409))

    def available(name: str) -> bool:
        status = client.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}").get("status", {})
        return status.get("readyReplicas") == 1

    for name in ("postgres", "valkey", "livekit"):
        eventually(lambda name=name: available(name), 120, interval=1, what=f"{name} Ready")


@pytest.fixture(scope="session")
def installed(
    cluster: tuple[KubeApiServer, KubeNode], kube: KubeClient, node_image: Callable[[str], str]
) -> Iterator[Installed]:
    api_server, node = cluster
    kube.namespace(NAMESPACE)
    credentials = {
        "morgana-db-app": {"username": "postgres", "password": openssl_hex(16)},
        "morgana-livekit": {"api-key": "APInode", "api-secret": openssl_hex(32)},
        "morgana-secrets": {
            "jwt-secret": openssl_hex(32),
            "openai-api-key": OPENAI_KEY,
            "agent-password": openssl_hex(16),
        },
    }
    create_secrets(kube, credentials)
    start_cluster_services(kube, node, "morgana-db-app", "morgana-livekit")
    livekit_ip = kube.get(f"/api/v1/namespaces/{NAMESPACE}/services/livekit")["spec"]["clusterIP"]
    postgres_ip = kube.get(f"/api/v1/namespaces/{NAMESPACE}/services/postgres")["spec"]["clusterIP"]
    model = FakeOpenAIProcess(api_key=OPENAI_KEY, host=node.address)
    model.start()
    try:
        for component in ("api", "agent", "controller"):
            node_image(component)
        sets = {
            "image.registry": "localhost",
            "image.tag": IMAGE_TAG,
            "image.pullPolicy": "Never",
            "postgres.host": "postgres",
            "postgres.database": DATABASE,
            "postgres.existingSecret": "morgana-db-app",
            "postgres.secretKeys.username": "username",
            "redis.host": "valkey",
            "livekit.url": f"ws://livekit:{cluster_services.LIVEKIT_PORT}",
            # Callers on this machine reach LiveKit at its Service's cluster IP (there is no DNS
            # for cluster names here), as browsers would at an Ingress.
            "livekit.publicUrl": f"ws://{livekit_ip}:{cluster_services.LIVEKIT_PORT}",
            "livekit.existingSecret": "morgana-livekit",
            "llm.baseUrl": model.base_url,
            "llm.existingSecret": "morgana-secrets",
            "auth.existingSecret": "morgana-secrets",
            "agentUser.existingSecret": "morgana-secrets",
            # A small node: two cores for everything, so each worker asks for a tenth of one.
            "agent.resources.requests.cpu": "100m",
            "agent.resources.requests.memory": "256Mi",
            # Drains are watched here: a grace period that a test can outlast if it must.
            "agent.drainTimeoutSeconds": "120",
            "agent.terminationGracePeriodSeconds": "150",
            **AUTOSCALER,
        }
        args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
        result = helm(
            "install",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "6m",
            *args,
            kubeconfig=api_server.kubeconfig,
            check=False,
            timeout=480,
        )
        assert result.returncode == 0, result.stdout + result.stderr + node.log_tail("kubelet")
        service = kube.get(f"/api/v1/namespaces/{NAMESPACE}/services/{RELEASE}-api")
        port = service["spec"]["ports"][0]["port"]
        password = credentials["morgana-db-app"]["password"]
        yield Installed(
            kube=api_server,
            client=kube,
            node=node,
            model=model,
            api_url=f"http://{service['spec']['clusterIP']}:{port}",
            livekit_url=f"ws://{livekit_ip}:{cluster_services.LIVEKIT_PORT}",
            livekit_key=credentials["morgana-livekit"]["api-key"],
            livekit_secret=credentials["morgana-livekit"]["api-secret"],
            database_url=f"postgresql://postgres:{password}@{postgres_ip}:5432/{DATABASE}",
        )
        helm(
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "3m",
            kubeconfig=api_server.kubeconfig,
            check=False,
            timeout=240,
        )
    finally:
        model.stop()
