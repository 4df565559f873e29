"""`morgana-controller stop`, the chart's pre-delete hook, with a token bound to exactly the Role the
chart gives the hook, on a real API server. Run with the controller alive (it lets go by itself)
in tests/images/test_controller_image.py; here with none running, as when it crash-loops or was
scaled to zero: the finalizers it left must come off, or the resources hang in Terminating."""

import subprocess
import sys
from pathlib import Path

from tests.chart.helm import find, render
from tests.controller.harness import AAS_PATH, Cluster, eventually

NAMESPACE = "stopping"  # not watched by the session's controller


def test_stop_releases_the_finalizers_a_dead_controller_left(cluster: Cluster, tmp_path: Path) -> None:
    cluster.namespace(NAMESPACE)
    cluster.deployment(NAMESPACE, "morgana-controller", replicas=1)
    eventually(lambda: cluster.get(f"/api/v1/namespaces/{NAMESPACE}/pods")["items"], 15, what="a controller pod")
    path = AAS_PATH.format(ns=NAMESPACE)
    for name in ("morgana-agent", "someone-elses"):
        cluster.create(
            path,
            {
                "apiVersion": "morgana.dev/v1alpha1",
                "kind": "AgentAutoscaler",
                "metadata": {"name": name, "finalizers": ["morgana.dev/autoscaler", "example.com/keep"]},
                "spec": {
                    "targetRef": {"name": "agents"},
                    "agentName": "morgana-agent",
                    "livekit": {"url": "ws://livekit:7880", "credentialsSecretRef": {"name": "lk"}},
                },
            },
        )
    cluster.delete(f"{path}/morgana-agent")  # deleting, held by the finalizer no controller will remove

    rules = find(render(), "Role", "-controller-stop")["rules"]
    kubeconfig = cluster.service_account_kubeconfig(
        NAMESPACE, "morgana-controller-stop", rules, tmp_path / "kubeconfig"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "morgana_controller.cli",
            "stop",
            "--deployment",
            "morgana-controller",
            "--timeout",
            "20",
        ],
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(kubeconfig), "LOG_FORMAT": "console"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr

    assert cluster.replicas(NAMESPACE, "morgana-controller") == 0
    assert "controller stopping/morgana-controller stopped" in result.stderr, result.stderr
    for name in ("morgana-agent", "someone-elses"):
        assert f"took the finalizer off AgentAutoscaler stopping/{name}" in result.stderr, result.stderr
    # Only this controller's finalizer came off: the deleted one waits for the other's, the other lives on.
    for name in ("morgana-agent", "someone-elses"):
        assert cluster.get(f"{path}/{name}")["metadata"]["finalizers"] == ["example.com/keep"]
    cluster.request("PATCH", f"{path}/morgana-agent", {"metadata": {"finalizers": []}}, merge=True)
    eventually(
        lambda: cluster.request("GET", f"{path}/morgana-agent", ok=(200, 404)).status_code == 404,
        10,
        what="deleted once every finalizer is off",
    )


def test_stop_without_a_controller_deployment_still_releases(cluster: Cluster, tmp_path: Path) -> None:
    namespace = "stopping-empty"
    cluster.namespace(namespace)
    path = AAS_PATH.format(ns=namespace)
    cluster.create(
        path,
        {
            "apiVersion": "morgana.dev/v1alpha1",
            "kind": "AgentAutoscaler",
            "metadata": {"name": "left", "finalizers": ["morgana.dev/autoscaler"]},
            "spec": {
                "targetRef": {"name": "agents"},
                "agentName": "morgana-agent",
                "livekit": {"url": "ws://livekit:7880", "credentialsSecretRef": {"name": "lk"}},
            },
        },
    )
    kubeconfig = cluster.service_account_kubeconfig(
        namespace,
        "morgana-controller-stop",
        find(render(), "Role", "-controller-stop")["rules"],
        tmp_path / "kubeconfig",
    )
    result = subprocess.run(
        [sys.executable, "-m", "morgana_controller.cli", "stop", "--deployment", "morgana-controller"],
        env={"PATH": "/usr/bin:/bin", "KUBECONFIG": str(kubeconfig), "LOG_FORMAT": "console"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "no Deployment stopping-empty/morgana-controller" in result.stderr
    assert not cluster.get(f"{path}/left")["metadata"].get("finalizers")
