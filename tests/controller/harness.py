"""Real parts for the controller's tests and benchmark: the API server over REST, the controller as
a process, LiveKit callers held open on a thread, and a stand-in kubelet that marks Pods Ready.

Nothing here imitates the controller's dependencies: Kubernetes is etcd + kube-apiserver +
kube-controller-manager (`morgana_devtools.kube_apiserver`), LiveKit is livekit-server, callers
are LiveKit rtc SDK participants. The only stand-in is `Kubelet`: there are no nodes, so it
reports the Deployment's Pods Running and Ready, as a kubelet would once their containers start.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import yaml
from livekit import api, rtc

from morgana_devtools.kube_apiserver import KubeClient
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.processes import ChildProcess
from morgana_devtools.services import eventually, free_port
from tests.chart.helm import find, render

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "charts" / "morgana" / "crds"
AAS_PATH = "/apis/morgana.dev/v1alpha1/namespaces/{ns}/agentautoscalers"


def chart_rules(*, clusterwide: bool = False) -> list[dict]:
    """The controller's RBAC rules as the chart grants them (their single source), without the
    Secret's resourceNames (each test names its own). Cluster-wide, the peering object is the
    cluster-scoped ClusterKopfPeering, as the controller's docstring says."""
    role = find(render(), "Role", "-controller")
    rules = [{k: v for k, v in rule.items() if k != "resourceNames"} for rule in role["rules"]]
    if clusterwide:
        for rule in rules:
            rule["resources"] = ["clusterkopfpeerings" if r == "kopfpeerings" else r for r in rule["resources"]]
    return rules


class Cluster(KubeClient):
    """The API server through its REST API, with what the controller's tests set up and read."""

    # --- setup -------------------------------------------------------------------------------

    def install_crds(self) -> None:
        for path in sorted(CRDS.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd, ok=(201, 409))
            name = crd["metadata"]["name"]
            eventually(lambda name=name: self._established(name), 30, what=f"CRD {name} established")

    def _established(self, crd: str) -> bool:
        status = self.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}").get("status") or {}
        return any(c["type"] == "Established" and c["status"] == "True" for c in status.get("conditions") or [])

    def service_account_kubeconfig(
        self, namespace: str, name: str, rules: list[dict], path: Path, *, clusterwide: bool = False
    ) -> Path:
        """A ServiceAccount bound to exactly `rules`, and a kubeconfig with a token minted for it."""
        self.create(f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}})
        if clusterwide:
            role_path, binding_path, kind = (
                "/apis/rbac.authorization.k8s.io/v1/clusterroles",
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
                "ClusterRole",
            )
        else:
            role_path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles"
            binding_path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings"
            kind = "Role"
        self.create(role_path, {"metadata": {"name": name}, "rules": rules})
        self.create(
            binding_path,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        )
        token = self.service_account_token(namespace, name)
        return self.kube.token_kubeconfig(token, path, user=name, namespace=namespace)

    def peering(self, namespace: str | None, name: str = "morgana-controller") -> None:
        """The kopf peering object, as the chart creates it (the documented RBAC may not create it)."""
        kind, path = (
            ("KopfPeering", f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings")
            if namespace
            else ("ClusterKopfPeering", "/apis/kopf.dev/v1/clusterkopfpeerings")
        )
        self.request(
            "POST", path, {"apiVersion": "kopf.dev/v1", "kind": kind, "metadata": {"name": name}}, ok=(201, 409)
        )

    def livekit_secret(self, namespace: str, name: str, livekit: LiveKitServer) -> None:
        self.create(
            f"/api/v1/namespaces/{namespace}/secrets",
            {"metadata": {"name": name}, "stringData": {"api-key": livekit.api_key, "api-secret": livekit.api_secret}},
        )

    def deployment(self, namespace: str, name: str, replicas: int = 1) -> None:
        labels = {"app": name}
        self.create(
            f"/apis/apps/v1/namespaces/{namespace}/deployments",
            {
                "metadata": {"name": name},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "agent", "image": "morgana-agent:test"}]},
                    },
                },
            },
        )

    def autoscaler(self, namespace: str, name: str, spec: dict) -> dict:
        return self.create(
            AAS_PATH.format(ns=namespace),
            {"apiVersion": "morgana.dev/v1alpha1", "kind": "AgentAutoscaler", "metadata": {"name": name}, "spec": spec},
        )

    # --- reading -----------------------------------------------------------------------------

    def replicas(self, namespace: str, deployment: str) -> int:
        return self.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}")["spec"]["replicas"]

    def aas(self, namespace: str, name: str) -> dict:
        return self.get(f"{AAS_PATH.format(ns=namespace)}/{name}")

    def condition(self, namespace: str, name: str, type_: str) -> dict:
        conditions = self.aas(namespace, name).get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == type_), {})

    def events(self, namespace: str, name: str, reason: str | None = None) -> list[dict]:
        items = self.get(f"/api/v1/namespaces/{namespace}/events")["items"]
        return [
            e
            for e in items
            if e["involvedObject"].get("kind") == "AgentAutoscaler"
            and e["involvedObject"].get("name") == name
            and (reason is None or e["reason"] == reason)
        ]

    def events_when(
        self, namespace: str, name: str, reason: str, check: Callable[[list[dict]], Any] = bool, timeout: float = 10
    ) -> list[dict]:
        """The Events of `reason` once `check(events)` holds: kopf posts Events from a queue, a moment
        after the action they report."""
        return eventually(
            lambda: events if check(events := self.events(namespace, name, reason)) else [],
            timeout,
            interval=0.2,
            what=f"{reason} Events of {name}",
        )


class ControllerProcess(ChildProcess):
    """`python -m morgana_controller.cli`, ready once kopf's liveness endpoint answers."""

    name = "controller"
    ready_timeout = 60.0

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "WATCH_", "PEERING_"))}
        super().__init__(
            [sys.executable, "-m", "morgana_controller.cli"],
            {
                **clean,
                "LOG_FORMAT": "console",
                "LOG_LEVEL": "INFO",
                **env,
                "HEALTH_PORT": str(self.health_port),
                "METRICS_PORT": str(self.metrics_port),
            },
            log_path,
        )

    def start(self, timeout: float | None = None) -> ControllerProcess:
        # ChildProcess merges os.environ back in; keep a LiveKit or namespace setting of ours out.
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("LIVEKIT_", "WATCH_", "PEERING_"))}
        try:
            for attempt in range(3):
                try:
                    return super().start(timeout)
                except RuntimeError as exc:
                    # A free port can be taken by someone else between picking and binding it.
                    if "address already in use" not in str(exc).lower() or attempt == 2:
                        raise
                    self.health_port, self.metrics_port = free_port(), free_port()
                    self.env.update(HEALTH_PORT=str(self.health_port), METRICS_PORT=str(self.metrics_port))
            raise AssertionError("unreachable")
        finally:
            os.environ.update(saved)

    def ready(self) -> bool:
        return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1).status_code == 200

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None if absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', sample))
        if sample.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None


class Crowd:
    """Callers as LiveKit participants (rtc SDK), kept connected by an event loop on a thread."""

    def __init__(self, livekit: LiveKitServer) -> None:
        self.livekit = livekit
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="crowd", daemon=True)
        self.thread.start()
        self.rooms: dict[str, list[rtc.Room]] = {}

    def _run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def token(self, room: str, identity: str, agent_name: str | None = None) -> str:
        token = (
            api.AccessToken(self.livekit.api_key, self.livekit.api_secret)
            .with_identity(identity)
            .with_grants(api.VideoGrants(room_join=True, room=room))
        )
        if agent_name:
            token = token.with_room_config(api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=agent_name)]))
        return token.to_jwt()

    def join(self, room: str, identity: str | None = None, agent_name: str | None = None) -> None:
        """A caller joins `room` (with no agent dispatch in its token unless `agent_name`)."""
        identity = identity or f"caller-{room}-{len(self.rooms.get(room, []))}"

        async def connect() -> rtc.Room:
            participant = rtc.Room()
            await participant.connect(
                self.livekit.url, self.token(room, identity, agent_name), rtc.RoomOptions(auto_subscribe=False)
            )
            return participant

        self.rooms.setdefault(room, []).append(self._run(connect()))

    def join_many(self, rooms: Iterable[str]) -> None:
        names = list(rooms)

        async def connect_all() -> list[rtc.Room]:
            async def one(room: str) -> rtc.Room:
                participant = rtc.Room()
                await participant.connect(
                    self.livekit.url, self.token(room, f"caller-{room}"), rtc.RoomOptions(auto_subscribe=False)
                )
                return participant

            return list(await asyncio.gather(*(one(room) for room in names)))

        for room, participant in zip(names, self._run(connect_all(), timeout=60), strict=True):
            self.rooms.setdefault(room, []).append(participant)

    def agents_in(self, room: str) -> list[str]:
        """Identities of the agents in `room`, as its first caller sees them."""
        participant = self.rooms[room][0]
        return [
            p.identity
            for p in participant.remote_participants.values()
            if p.kind == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
        ]

    def leave(self, rooms: Iterable[str] | None = None) -> None:
        names = list(self.rooms) if rooms is None else list(rooms)
        leaving = [p for name in names for p in self.rooms.pop(name, [])]

        async def disconnect_all() -> None:
            await asyncio.gather(*(p.disconnect() for p in leaving), return_exceptions=True)

        if leaving:
            self._run(disconnect_all(), timeout=60)

    def close(self) -> None:
        try:
            self.leave()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


class Kubelet:
    """Marks the Pods of chosen Deployments Running and Ready (there are no nodes to run them)."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.serving: set[str] = set()  # app labels whose Pods start
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._sync()
            except (httpx.HTTPError, AssertionError):
                pass

    def _sync(self) -> None:
        pods = self.cluster.get(f"/api/v1/namespaces/{self.namespace}/pods")["items"]
        for pod in pods:
            app = pod["metadata"].get("labels", {}).get("app")
            ready = any(
                c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", [])
            )
            if app in self.serving and not ready and not pod["metadata"].get("deletionTimestamp"):
                now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                self.cluster.request(
                    "PATCH",
                    f"/api/v1/namespaces/{self.namespace}/pods/{pod['metadata']['name']}/status",
                    {
                        "status": {
                            "phase": "Running",
                            "conditions": [
                                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                            ],
                        }
                    },
                    merge=True,
                    ok=(200, 404, 409),
                )

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
