"""The node itself: a pod of a Morgana image runs under the chart's kind of security context,
its Service answers from this machine and, by DNS name, from another pod; `kubectl exec` and
`logs` work through the kubelet; and deleting the pod delivers SIGTERM to its process."""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import ClassVar

import httpx
import pytest

from morgana_devtools.kube_apiserver import KubeApiServer, KubeClient, cached_binary
from morgana_devtools.kube_node import KubeNode
from morgana_devtools.services import eventually, free_port

NAMESPACE = "smoke"
# A small server on 8080 that names its pod, and on SIGTERM tells the test (over HTTP to this
# machine) that it is stopping, then exits: the graceful path a draining worker takes.
SERVER = """
import http.server, os, signal, sys, urllib.request
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = os.environ["POD_NAME"].encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
def stop(signum, frame):
    urllib.request.urlopen(os.environ["REPORT_URL"] + "/stopping/" + os.environ["POD_NAME"], data=b"", timeout=5)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("serving on 8080", flush=True)
http.server.HTTPServer(("", 8080), Handler).serve_forever()
"""


class _Reports(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        _Reports.received.append(self.path)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def reports(node: KubeNode) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer((node.address, free_port()), _Reports)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://{node.address}:{server.server_port}"
    server.shutdown()


def pod(name: str, image: str, report_url: str) -> dict:
    return {
        "metadata": {"name": name, "labels": {"app": "smoke"}},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "server",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", SERVER],
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "REPORT_URL", "value": report_url},
                    ],
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
                    "securityContext": {
                        "readOnlyRootFilesystem": True,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def answer(url: str) -> str | None:
    """The body of a 200 answer to a GET of `url`, or None while there is none (rules not yet in
    place, a pod not yet serving)."""
    try:
        response = httpx.get(url, timeout=3)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 and response.text else None


def kubectl(kube: KubeApiServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cached_binary("kubectl")), "--kubeconfig", str(kube.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.timeout(900)  # the first test starts the node and loads the images into it
def test_a_pod_runs_its_service_answers_and_it_stops_on_sigterm(
    cluster: tuple[KubeApiServer, KubeNode], kube: KubeClient, node_image: Callable[[str], str], reports: str
) -> None:
    api_server, _ = cluster
    image = node_image("api")
    kube.namespace(NAMESPACE)
    for name in ("smoke-a", "smoke-b"):
        kube.create(f"/api/v1/namespaces/{NAMESPACE}/pods", pod(name, image, reports))
    service = kube.create(
        f"/api/v1/namespaces/{NAMESPACE}/services",
        {
            "metadata": {"name": "smoke"},
            "spec": {"selector": {"app": "smoke"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )

    def ready(name: str) -> bool:
        status = kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{name}").get("status", {})
        return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])

    def describe() -> str:
        return kubectl(api_server, "-n", NAMESPACE, "describe", "pods").stdout[-4000:]

    for name in ("smoke-a", "smoke-b"):
        eventually(
            lambda name=name: ready(name), 120, interval=0.5, what=lambda name=name: f"{name} Ready\n{describe()}"
        )

    # From this machine, through kube-proxy's rules for the ClusterIP: both pods take traffic.
    cluster_ip = service["spec"]["clusterIP"]
    seen: set[str | None] = set()
    eventually(
        lambda: seen.add(answer(f"http://{cluster_ip}/")) or len(seen - {None}) == 2,
        60,
        what=lambda: f"both pods answering on {cluster_ip}: {seen}",
    )
    assert seen - {None} == {"smoke-a", "smoke-b"}

    # From a pod, by the Service's DNS name (CoreDNS), through `kubectl exec` (kubelet auth).
    fetch = (
        "import urllib.request; print(urllib.request.urlopen('http://smoke.smoke.svc.cluster.local/').read().decode())"
    )
    exec_result = kubectl(api_server, "-n", NAMESPACE, "exec", "smoke-a", "--", "python", "-c", fetch)
    assert exec_result.returncode == 0, exec_result.stderr
    assert exec_result.stdout.strip() in {"smoke-a", "smoke-b"}
    logs = kubectl(api_server, "-n", NAMESPACE, "logs", "smoke-b")
    assert "serving on 8080" in logs.stdout, logs.stderr

    # Deleting a pod: the kubelet sends its process SIGTERM, which it handles before exiting.
    kube.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/smoke-a")
    eventually(lambda: "/stopping/smoke-a" in _Reports.received, 30, what="smoke-a reported SIGTERM")
    eventually(
        lambda: kube.request("GET", f"/api/v1/namespaces/{NAMESPACE}/pods/smoke-a", ok=(200, 404)).status_code == 404,
        30,
        what="smoke-a gone",
    )
    eventually(
        lambda: answer(f"http://{cluster_ip}/") == "smoke-b",
        30,
        what="the Service left with smoke-b",
    )
