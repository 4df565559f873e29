"""Real parts for the controller: Kubernetes (etcd, kube-apiserver, kube-controller-manager), LiveKit,
the real agent worker, and the controller itself as a process with a least-privilege token.

Nothing is skipped: a part that cannot start fails the run.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from morgana_devtools.kube_apiserver import KubeApiServer
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.processes import AgentWorker
from tests.controller.harness import Cluster, ControllerProcess, Crowd, Kubelet, chart_rules

NAMESPACE = "voice"
SERVICE_ACCOUNT = "morgana-controller"
SECRET = "livekit-credentials"
AGENT_NAME = "controller-test-agent"
LIVEKIT_KEY = "APIcontrollertest"
LIVEKIT_SECRET = "controller-test-secret-" + "5" * 32


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    with KubeApiServer(controller_manager=True, log_dir=tmp_path_factory.mktemp("kube")) as server:
        yield server


@pytest.fixture(scope="session")
def livekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    with LiveKitServer(
        LIVEKIT_KEY,
        LIVEKIT_SECRET,
        log_path=tmp_path_factory.mktemp("livekit") / "livekit.log",
        config={"room": {"departure_timeout": 1, "empty_timeout": 5}},
    ) as server:
        yield server


@pytest.fixture(scope="session")
def cluster(kube: KubeApiServer, livekit: LiveKitServer) -> Cluster:
    """The CRDs from the chart, a namespace with the controller's peering object, and the LiveKit
    credentials Secret in it."""
    cluster = Cluster(kube)
    cluster.install_crds()
    cluster.namespace(NAMESPACE)
    cluster.peering(NAMESPACE)
    cluster.livekit_secret(NAMESPACE, SECRET, livekit)
    return cluster


@pytest.fixture(scope="session")
def controller_kubeconfig(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token for a ServiceAccount bound to exactly the RBAC that morgana_controller documents."""
    return cluster.service_account_kubeconfig(
        NAMESPACE, SERVICE_ACCOUNT, chart_rules(), tmp_path_factory.mktemp("sa") / "kubeconfig"
    )


def controller_env(kubeconfig: Path, pod: str, priority: int) -> dict[str, str]:
    return {
        "KUBECONFIG": str(kubeconfig),
        "WATCH_NAMESPACE": NAMESPACE,
        "POD_NAME": pod,
        "PEERING_PRIORITY": str(priority),
        "PEERING_LIFETIME_SECONDS": "10",
        "LIVEKIT_TIMEOUT_SECONDS": "1",
    }


@pytest.fixture(scope="session")
def controller(controller_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProcess]:
    process = ControllerProcess(
        controller_env(controller_kubeconfig, "controller-a", 100),
        tmp_path_factory.mktemp("controller") / "controller-a.log",
    ).start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def kubelet(cluster: Cluster) -> Iterator[Kubelet]:
    kubelet = Kubelet(cluster, NAMESPACE)
    yield kubelet
    kubelet.stop()


@pytest.fixture(scope="session")
def agent_worker(livekit: LiveKitServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentWorker]:
    """The real voice worker, registered as AGENT_NAME: it joins the rooms it is dispatched to.
    No API behind it: a call starts all the same (the chat session is retried at the first turn)."""
    env = {
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "LIVEKIT_AGENT_NAME": AGENT_NAME,
        "MORGANA_BACKEND_URL": "http://127.0.0.1:9",
        "API_USER_PASSWORD": "unused-password",
        "MAX_CONCURRENT_CALLS": "4",
        "LOG_LEVEL": "INFO",
    }
    worker = AgentWorker(env, tmp_path_factory.mktemp("agent") / "agent.log").start()
    yield worker
    worker.stop()


@pytest.fixture
def crowd(livekit: LiveKitServer) -> Iterator[Crowd]:
    crowd = Crowd(livekit)
    yield crowd
    crowd.close()
