"""The node tier: a real single-node cluster (morgana_devtools.kube_node) whose pods really run,
with the images built from images/*/Dockerfile. Every test here carries the `node` marker."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from morgana_devtools.kube_apiserver import KubeApiServer, KubeClient
from morgana_devtools.kube_node import KubeNode, host_address
from tests.images.conftest import images  # noqa: F401 (the session's built images)
from tests.images.containers import BuiltImages


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
