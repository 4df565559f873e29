"""The controller against real parts: a Kubernetes API server with its controller manager, LiveKit,
real LiveKit callers, the real agent worker, and the controller as a process whose token has
exactly the RBAC documented in morgana_controller (namespaced mode).
"""

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import yaml
from livekit import api

from morgana_devtools.kube_apiserver import KubeApiServer
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.services import eventually, stays
from tests.controller.conftest import AGENT_NAME, NAMESPACE, SECRET, controller_env
from tests.controller.harness import (
    AAS_PATH,
    CRDS,
    Cluster,
    ControllerProcess,
    Crowd,
    Kubelet,
    chart_rules,
    metric_value,
)

pytestmark = pytest.mark.timeout(120)

METRICS = (
    "observed_rooms",
    "observed_participants",
    "agentless_rooms",
    "desired_replicas",
    "current_replicas",
    "decision_duration_seconds",
    "scale_events_total",
    "errors_total",
    "redispatches_total",
    "livekit_reachable",
)


def spec(livekit: LiveKitServer, target: str, **overrides: object) -> dict:
    return {
        "targetRef": {"name": target},
        "livekit": {"url": livekit.url, "credentialsSecretRef": {"name": SECRET}},
        "agentName": AGENT_NAME,
        **overrides,
    }


@pytest.fixture
def autoscalers(cluster: Cluster, controller: ControllerProcess) -> Iterator[Callable[..., str]]:
    """Creates AgentAutoscalers (each with a fresh Deployment); deletes them after the test and checks
    that the controller lets them go (it holds a finalizer while it scales them)."""
    created: list[str] = []

    def create(name: str, body: dict, replicas: int = 1, deployment: bool = True) -> str:
        if deployment:
            cluster.deployment(NAMESPACE, body["targetRef"]["name"], replicas)
        cluster.autoscaler(NAMESPACE, name, body)
        created.append(name)
        return name

    yield create
    for name in created:
        cluster.delete(f"{AAS_PATH.format(ns=NAMESPACE)}/{name}")
    for name in created:
        eventually(
            lambda n=name: (
                cluster.request("GET", f"{AAS_PATH.format(ns=NAMESPACE)}/{n}", ok=(200, 404)).status_code == 404
            ),
            15,
            what=f"AgentAutoscaler {name} deleted (finalizer released)",
        )


def ready(cluster: Cluster, name: str) -> dict:
    return cluster.condition(NAMESPACE, name, "Ready")


def test_the_crd_validates_defaults_and_prints_columns(cluster: Cluster, livekit: LiveKitServer) -> None:
    crd = yaml.safe_load((CRDS / "agentautoscalers.morgana.dev.yaml").read_text())
    assert crd["spec"]["names"]["shortNames"] == ["aas"]
    path = AAS_PATH.format(ns=NAMESPACE)

    def refused(name: str, body: dict) -> str:
        response = cluster.request(
            "POST",
            path,
            {"apiVersion": "morgana.dev/v1alpha1", "kind": "AgentAutoscaler", "metadata": {"name": name}, "spec": body},
            ok=(422,),
        )
        return response.json()["message"]

    assert "minReplicas must not exceed maxReplicas" in refused(
        "bounds", spec(livekit, "x", minReplicas=5, maxReplicas=2)
    )
    assert "pollIntervalSeconds" in refused("poll", spec(livekit, "x", pollIntervalSeconds=0))
    assert "roomsPerWorker" in refused("rpw", spec(livekit, "x", roomsPerWorker=0))
    assert "livekit.url" in refused(
        "url", {**spec(livekit, "x"), "livekit": {"url": "livekit:7880", "credentialsSecretRef": {"name": SECRET}}}
    )
    assert "agentName" in refused("agent", {k: v for k, v in spec(livekit, "x").items() if k != "agentName"})

    # Defaults are filled in by the API server (a dry run stores nothing and wakes no controller).
    stored = cluster.request(
        "POST",
        path,
        {
            "apiVersion": "morgana.dev/v1alpha1",
            "kind": "AgentAutoscaler",
            "metadata": {"name": "defaults"},
            "spec": spec(livekit, "x"),
        },
        params={"dryRun": "All"},
    ).json()["spec"]
    assert {
        k: stored[k]
        for k in (
            "roomsPerWorker",
            "minReplicas",
            "maxReplicas",
            "headroom",
            "scaleDownStabilizationSeconds",
            "pollIntervalSeconds",
            "redispatch",
        )
    } == {
        "roomsPerWorker": 4,
        "minReplicas": 1,
        "maxReplicas": 10,
        "headroom": 1,
        "scaleDownStabilizationSeconds": 120,
        "pollIntervalSeconds": 5,
        "redispatch": {"enabled": True, "graceSeconds": 10},
    }
    assert stored["livekit"]["credentialsSecretRef"] == {
        "name": SECRET,
        "apiKeyKey": "api-key",
        "apiSecretKey": "api-secret",
    }

    # `kubectl get aas` asks for a Table: these are its columns.
    table = cluster.request("GET", path, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}).json()
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Target",
        "Rooms",
        "Participants",
        "Desired",
        "Current",
        "Ready",
        "Age",
    ]


def test_replicas_follow_rooms_up_within_a_poll_and_down_after_stabilisation(
    cluster: Cluster, livekit: LiveKitServer, controller: ControllerProcess, autoscalers, crowd: Crowd
) -> None:
    name = autoscalers(
        "follow",
        spec(
            livekit,
            "follow-agents",
            roomsPerWorker=2,
            maxReplicas=6,
            headroom=1,
            pollIntervalSeconds=1,
            scaleDownStabilizationSeconds=6,
            redispatch={"enabled": False},
        ),
    )
    eventually(lambda: ready(cluster, name).get("status") == "True", 15, what="Ready")
    assert cluster.replicas(NAMESPACE, "follow-agents") == 1

    crowd.join_many(f"follow-{i}" for i in range(5))  # 5 calls + 1 free slot at 2 per worker: 3
    joined = time.monotonic()
    eventually(lambda: cluster.replicas(NAMESPACE, "follow-agents") == 3, 5, interval=0.05, what="3 replicas")
    assert time.monotonic() - joined < 1 + 1.5, "not within one poll interval (1 s) and some slack"
    crowd.join("follow-3", identity="second-caller")  # a second caller in a room is not a second call
    crowd.join_many(f"follow-{i}" for i in range(5, 9))  # 9 calls + 1: 5
    eventually(lambda: cluster.replicas(NAMESPACE, "follow-agents") == 5, 4, interval=0.05, what="5 replicas")

    status = eventually(lambda: (s := cluster.aas(NAMESPACE, name)["status"])["observedRooms"] == 9 and s, 5)
    assert (status["observedParticipants"], status["agentlessRooms"]) == (10, 9)
    assert status["desiredReplicas"] == 5
    # Current is what the Deployment has (status.replicas): it follows once the pods exist.
    eventually(lambda: cluster.aas(NAMESPACE, name)["status"]["currentReplicas"] == 5, 5, what="5 current")
    assert status["lastScaleReason"].startswith("Deployment follow-agents 3 -> 5: 9 rooms at 2 per worker")
    assert status["observedGeneration"] == cluster.aas(NAMESPACE, name)["metadata"]["generation"]
    ups = [
        e["message"]
        for e in cluster.events_when(
            NAMESPACE, name, "ScaledUp", lambda events: any("-> 5: 9 rooms" in e["message"] for e in events)
        )
    ]
    # (A tick may land while the callers are still connecting: 1 -> 2 -> 3 is as right as 1 -> 3.)
    assert any("-> 3:" in m for m in ups) and any("-> 5: 9 rooms" in m for m in ups), ups
    metrics = controller.metrics()
    labels = {"namespace": NAMESPACE, "autoscaler": name}
    assert metric_value(metrics, "morgana_controller_observed_rooms", **labels) == 9
    assert metric_value(metrics, "morgana_controller_observed_participants", **labels) == 10
    assert metric_value(metrics, "morgana_controller_desired_replicas", **labels) == 5
    assert metric_value(metrics, "morgana_controller_scale_events_total", **labels, direction="up") == len(ups)
    assert metric_value(metrics, "morgana_controller_decision_duration_seconds_count", **labels) > 0

    crowd.leave()  # every call ends
    stays(
        lambda: cluster.replicas(NAMESPACE, "follow-agents") == 5,
        6 - 1,
        interval=0.2,
        what="5 replicas through the 6 s window",
    )
    # Down to the highest need of the window, in one step (unless a tick caught the callers half
    # gone: then a second step, a full window after the first).
    eventually(lambda: cluster.replicas(NAMESPACE, "follow-agents") == 1, 2 * 6 + 3, what="back to 1 replica")
    downs = [
        e["message"]
        for e in cluster.events_when(
            NAMESPACE, name, "ScaledDown", lambda events: any("-> 1: 0 rooms" in e["message"] for e in events)
        )
    ]
    assert downs and downs[-1].startswith("Deployment follow-agents ") and "-> 1: 0 rooms" in downs[-1], downs
    assert (len(downs) == 1 and "5 -> 1" in downs[0]) or len(downs) == 2, downs
    # The controller manager acted on it: the Deployment's Pods went from 5 to 1.
    eventually(
        lambda: (
            len(
                [
                    p
                    for p in cluster.get(f"/api/v1/namespaces/{NAMESPACE}/pods")["items"]
                    if p["metadata"]["labels"].get("app") == "follow-agents"
                    and not p["metadata"].get("deletionTimestamp")
                ]
            )
            == 1
        ),
        10,
        what="1 Pod left",
    )


def test_livekit_outage_holds_replicas_then_recovers_by_itself(
    cluster: Cluster, livekit: LiveKitServer, controller: ControllerProcess, autoscalers, crowd: Crowd
) -> None:
    window = 6
    name = autoscalers(
        "outage",
        spec(
            livekit,
            "outage-agents",
            roomsPerWorker=2,
            pollIntervalSeconds=1,
            scaleDownStabilizationSeconds=window,
            redispatch={"enabled": False},
        ),
    )
    crowd.join_many(f"outage-{i}" for i in range(5))
    eventually(lambda: cluster.replicas(NAMESPACE, "outage-agents") == 3, 5, what="3 replicas")
    labels = {"namespace": NAMESPACE, "autoscaler": name}
    errors_before = metric_value(controller.metrics(), "morgana_controller_errors_total", **labels, kind="livekit") or 0

    # The calls end and LiveKit goes down right after (callers hang up first, so that their
    # connections close cleanly and LiveKit can bind its ports again on restart).
    crowd.leave()
    livekit.stop()
    stopped = time.monotonic()
    try:
        reachable = eventually(
            lambda: (c := cluster.condition(NAMESPACE, name, "LiveKitReachable")).get("status") == "False" and c,
            6,
            what="LiveKitReachable=False",
        )
        assert reachable["reason"] == "Unreachable" and livekit.url in reachable["message"]
        assert ready(cluster, name)["reason"] == "LiveKitUnreachable"
        assert "holding 3 replicas" in ready(cluster, name)["message"]
        # Held well past the window, which would otherwise let the replicas drop to the 1 that
        # "no rooms" needs: the controller cannot see the rooms, so it keeps what runs.
        stays(
            lambda: cluster.replicas(NAMESPACE, "outage-agents") == 3,
            stopped + window + 3 - time.monotonic(),
            interval=0.25,
            what="3 replicas held through the outage",
        )
        metrics = controller.metrics()
        assert metric_value(metrics, "morgana_controller_livekit_reachable", **labels) == 0
        assert metric_value(metrics, "morgana_controller_errors_total", **labels, kind="livekit") > errors_before
        assert cluster.events_when(NAMESPACE, name, "LiveKitUnreachable")[0]["type"] == "Warning"
        assert controller.alive()
    finally:
        restarting = time.monotonic()
        restart_on_the_same_ports(livekit)

    eventually(
        lambda: cluster.condition(NAMESPACE, name, "LiveKitReachable").get("status") == "True",
        10,
        what="LiveKitReachable=True again",
    )
    eventually(lambda: ready(cluster, name).get("status") == "True", 5, what="Ready again")
    assert metric_value(controller.metrics(), "morgana_controller_livekit_reachable", **labels) == 1
    assert cluster.events_when(NAMESPACE, name, "LiveKitReachable")
    # No rooms now: down to 1, but only a full window after the outage.
    eventually(lambda: cluster.replicas(NAMESPACE, "outage-agents") == 1, window + 5, what="down after recovery")
    assert time.monotonic() - restarting >= window - 1.5


def restart_on_the_same_ports(livekit: LiveKitServer, attempts: int = 10) -> None:
    """Start LiveKit again on its old ports; another process may hold one of them for a moment
    (a free port is only free until someone else binds it)."""
    for attempt in range(attempts):
        try:
            livekit.start()
            return
        except RuntimeError as exc:
            if "address already in use" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(2)


def test_an_agentless_room_gets_an_agent_once_there_is_capacity(
    cluster: Cluster,
    livekit: LiveKitServer,
    controller: ControllerProcess,
    autoscalers,
    crowd: Crowd,
    kubelet: Kubelet,
    agent_worker,
) -> None:
    name = autoscalers(
        "dispatch",
        spec(
            livekit,
            "dispatch-agents",
            roomsPerWorker=2,
            minReplicas=1,
            maxReplicas=1,
            headroom=0,
            pollIntervalSeconds=1,
            redispatch={"graceSeconds": 1},
        ),
    )
    labels = {"namespace": NAMESPACE, "autoscaler": name}
    # A caller whose token dispatched no agent (as when every worker was full): alone in the room.
    crowd.join("lonely")
    eventually(
        lambda: cluster.aas(NAMESPACE, name).get("status", {}).get("agentlessRooms") == 1, 5, what="agentless room seen"
    )
    # Past the 1 s grace, but the Deployment has no ready worker: no dispatch yet.
    stays(
        lambda: (
            not metric_value(controller.metrics(), "morgana_controller_redispatches_total", **labels)
            and crowd.agents_in("lonely") == []
        ),
        3,
        interval=0.25,
        what="no redispatch, no agent",
    )
    assert asyncio.run(dispatches("lonely", livekit)) == []

    kubelet.serving.add("dispatch-agents")  # the worker Pod starts and becomes Ready
    eventually(lambda: crowd.agents_in("lonely"), 20, interval=0.2, what="the real agent joined the room")
    eventually(lambda: cluster.aas(NAMESPACE, name)["status"]["agentlessRooms"] == 0, 5, what="no agentless room")
    # More ticks: the room is served, nothing more is sent.
    stays(
        lambda: metric_value(controller.metrics(), "morgana_controller_redispatches_total", **labels) == 1,
        2,
        interval=0.25,
        what="one redispatch, no more",
    )
    sent = asyncio.run(dispatches("lonely", livekit))
    assert [d.agent_name for d in sent] == [AGENT_NAME]
    events = cluster.events_when(NAMESPACE, name, "Redispatched")
    assert len(events) == 1 and "'lonely'" in events[0]["message"]


async def dispatches(room: str, livekit: LiveKitServer) -> list:
    """Dispatches of our agent to `room` (LiveKit also lists its automatic one, with no agent name)."""
    async with api.LiveKitAPI(livekit.http_url, livekit.api_key, livekit.api_secret) as lkapi:
        return [d for d in await lkapi.agent_dispatch.list_dispatch(room) if d.agent_name == AGENT_NAME]


def test_a_bad_resource_gets_a_clear_condition_and_the_controller_carries_on(
    cluster: Cluster, livekit: LiveKitServer, controller: ControllerProcess, autoscalers
) -> None:
    no_secret = autoscalers(
        "no-secret",
        {
            **spec(livekit, "no-secret-agents"),
            "livekit": {"url": livekit.url, "credentialsSecretRef": {"name": "late-credentials"}},
            "pollIntervalSeconds": 1,
        },
    )
    no_target = autoscalers("no-target", spec(livekit, "never-created", pollIntervalSeconds=1), deployment=False)
    condition = eventually(
        lambda: ready(cluster, no_secret).get("status") == "False" and ready(cluster, no_secret), 10, what="Ready=False"
    )
    assert condition["reason"] == "SecretNotFound" and "'late-credentials'" in condition["message"], condition
    assert cluster.condition(NAMESPACE, no_secret, "LiveKitReachable")["status"] == "Unknown"
    assert cluster.events_when(NAMESPACE, no_secret, "SecretNotFound")[0]["type"] == "Warning"
    condition = eventually(
        lambda: ready(cluster, no_target).get("status") == "False" and ready(cluster, no_target), 10, what="Ready=False"
    )
    assert condition["reason"] == "TargetNotFound" and "'never-created'" in condition["message"], condition

    # A few more ticks: one Event per problem, not one per tick; the process lives.
    stays(
        lambda: len(cluster.events(NAMESPACE, no_secret, "SecretNotFound")) == 1 and controller.alive(),
        2,
        interval=0.25,
        what="one SecretNotFound Event, the controller alive",
    )
    assert (
        metric_value(
            controller.metrics(),
            "morgana_controller_errors_total",
            namespace=NAMESPACE,
            autoscaler=no_secret,
            kind="credentials",
        )
        >= 2
    )

    # Fixing the cause is enough: the next tick finds the Secret.
    cluster.create(
        f"/api/v1/namespaces/{NAMESPACE}/secrets",
        {
            "metadata": {"name": "late-credentials"},
            "stringData": {"api-key": livekit.api_key, "api-secret": livekit.api_secret},
        },
    )
    eventually(lambda: ready(cluster, no_secret).get("status") == "True", 5, what="Ready=True once the Secret exists")


def test_metrics_endpoint_names_every_controller_metric(
    cluster: Cluster, livekit: LiveKitServer, controller: ControllerProcess, autoscalers
) -> None:
    name = autoscalers("metrics", spec(livekit, "metrics-agents", pollIntervalSeconds=1))
    eventually(lambda: ready(cluster, name).get("status") == "True", 10, what="Ready")
    text = controller.metrics()
    for metric in METRICS:
        assert f"# TYPE morgana_controller_{metric} " in text, metric
    labels = {"namespace": NAMESPACE, "autoscaler": name}
    # The worker pods the Deployment has: there once the ReplicaSet made its pod.
    eventually(
        lambda: metric_value(controller.metrics(), "morgana_controller_current_replicas", **labels) == 1,
        10,
        what="current_replicas 1",
    )
    assert metric_value(text, "morgana_controller_livekit_reachable", **labels) == 1


def test_a_second_replica_with_priority_takes_over_and_only_one_scales(
    cluster: Cluster,
    livekit: LiveKitServer,
    controller: ControllerProcess,
    controller_kubeconfig,
    autoscalers,
    crowd: Crowd,
    tmp_path,
) -> None:
    name = autoscalers(
        "peering",
        spec(
            livekit,
            "peering-agents",
            roomsPerWorker=1,
            headroom=0,
            maxReplicas=8,
            pollIntervalSeconds=1,
            scaleDownStabilizationSeconds=60,
            redispatch={"enabled": False},
        ),
    )
    eventually(lambda: ready(cluster, name).get("status") == "True", 10, what="Ready")
    resumed_before = controller.log().count("Resuming operations after the pause")
    second = ControllerProcess(
        controller_env(controller_kubeconfig, "controller-b", 200), tmp_path / "controller-b.log"
    ).start()
    try:
        eventually(lambda: "Pausing operations in favour of" in controller.log(), 15, what="controller-a paused")
        peers = cluster.get(f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/kopfpeerings/morgana-controller")["status"]
        assert {"controller-a", "controller-b"} <= set(peers), peers
        crowd.join_many(["peering-1", "peering-2"])
        eventually(lambda: cluster.replicas(NAMESPACE, "peering-agents") == 2, 10, what="2 replicas")
        scaled_by = {e.get("reportingInstance") for e in cluster.events_when(NAMESPACE, name, "ScaledUp")}
        assert scaled_by == {"controller-b"}, scaled_by
        assert (
            metric_value(
                controller.metrics(), "morgana_controller_desired_replicas", namespace=NAMESPACE, autoscaler=name
            )
            is None
        )  # the paused replica exports nothing for it
    finally:
        second.stop()

    # The leader left cleanly: the other replica resumes at once and scales on its own.
    eventually(
        lambda: controller.log().count("Resuming operations after the pause") > resumed_before,
        10,
        what="controller-a resumed",
    )
    crowd.join("peering-3")
    eventually(lambda: cluster.replicas(NAMESPACE, "peering-agents") == 3, 10, what="3 replicas")
    ups = [
        (e.get("reportingInstance"), e["message"])
        for e in cluster.events_when(
            NAMESPACE, name, "ScaledUp", lambda events: any("2 -> 3" in e["message"] for e in events)
        )
    ]
    assert ("controller-a", next(m for _, m in ups if "2 -> 3" in m)) in ups, ups
    assert sum(1 for _, m in ups if "-> 2:" in m) == 1, ups  # the first scale-up was made once, by one replica


def test_cluster_wide_mode_serves_every_namespace_with_its_documented_rbac(livekit: LiveKitServer, tmp_path) -> None:
    """WATCH_NAMESPACE empty: a ClusterRole with the documented cluster-wide rules suffices, and the
    replicas peer through a ClusterKopfPeering. (Its own API server: two controllers of different
    modes do not see each other's peering, so they must not share a cluster.)"""
    with KubeApiServer(log_dir=tmp_path / "kube") as kube:
        cluster = Cluster(kube)
        cluster.install_crds()
        for namespace in ("morgana-system", "team-a"):
            cluster.namespace(namespace)
        cluster.peering(None)
        kubeconfig = cluster.service_account_kubeconfig(
            "morgana-system",
            "morgana-controller",
            chart_rules(clusterwide=True),
            tmp_path / "kubeconfig",
            clusterwide=True,
        )
        cluster.livekit_secret("team-a", SECRET, livekit)
        cluster.deployment("team-a", "agents", replicas=0)
        env = {**controller_env(kubeconfig, "controller-cw", 100), "WATCH_NAMESPACE": ""}
        with ControllerProcess(env, tmp_path / "controller.log") as process:
            cluster.autoscaler("team-a", "agents", spec(livekit, "agents", minReplicas=2, pollIntervalSeconds=1))
            eventually(lambda: cluster.replicas("team-a", "agents") == 2, 15, what="scaled to minReplicas")
            eventually(lambda: cluster.condition("team-a", "agents", "Ready").get("status") == "True", 10, what="Ready")
            assert cluster.events_when("team-a", "agents", "ScaledUp")
            peers = cluster.get("/apis/kopf.dev/v1/clusterkopfpeerings/morgana-controller").get("status") or {}
            assert "controller-cw" in peers, peers
            # A status 403, not the digits of the API server's port (127.0.0.1:40327 once failed this).
            log = process.log()
            assert "Forbidden" not in log and not re.search(r"\b403\b", log), log[-3000:]


def test_the_controller_waits_for_the_peering_object_it_may_not_create(cluster: Cluster, tmp_path) -> None:
    """Helm creates the chart's KopfPeering a moment after the controller's pod may have started:
    the controller waits for it, so that its first keep-alive is not lost (kopf retries only a
    lifetime later), and is a peer at once."""
    namespace = "late-peering"
    cluster.namespace(namespace)
    kubeconfig = cluster.service_account_kubeconfig(
        namespace, "morgana-controller", chart_rules(), tmp_path / "kubeconfig"
    )
    timer = threading.Timer(3.0, cluster.peering, args=(namespace,))
    timer.start()
    env = {**controller_env(kubeconfig, "controller-late", 100), "WATCH_NAMESPACE": namespace}
    with ControllerProcess(env, tmp_path / "controller.log") as process:
        assert "does not exist yet and is not ours to create: waiting for it" in process.log()
        peers = eventually(
            lambda: cluster.get(f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings/morgana-controller").get(
                "status"
            ),
            5,
            what="a keep-alive",
        )
        assert "controller-late" in peers, peers
    timer.join()


def test_a_misconfigured_controller_exits_saying_why(kube: KubeApiServer, cluster: Cluster, tmp_path) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(kube.kubeconfig),
        "WATCH_NAMESPACE": "no-such-namespace",
        "HEALTH_PORT": "0",
        "METRICS_PORT": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "morgana_controller.cli"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "WATCH_NAMESPACE names namespace no-such-namespace, which does not exist" in result.stderr
    env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
    result = subprocess.run(
        [sys.executable, "-m", "morgana_controller.cli"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "no Kubernetes credentials" in result.stderr, result.stderr[-3000:]


def test_autoscaler_dashboard_names_what_the_running_controller_exposes(
    cluster: Cluster, livekit: LiveKitServer, controller: ControllerProcess, autoscalers, crowd: Crowd
) -> None:
    """Every metric of charts/morgana/dashboards/morgana-autoscaler.json is on this controller's
    /metrics, and the labels its panels use are on the series a scale-up produced."""
    from tests.chart.test_dashboards import assert_dashboard_uses_only, exposed

    name = autoscalers(
        "dashboard",
        spec(
            livekit,
            "dashboard-agents",
            roomsPerWorker=1,
            headroom=1,
            pollIntervalSeconds=1,
            redispatch={"enabled": False},
        ),
    )
    eventually(lambda: ready(cluster, name).get("status") == "True", 10, what="Ready")
    crowd.join("dashboard-0")  # 1 call + 1 free slot: 2 workers
    eventually(lambda: cluster.replicas(NAMESPACE, "dashboard-agents") == 2, 5, what="2 replicas")
    checked = assert_dashboard_uses_only("morgana-autoscaler.json", exposed(controller.metrics()), "the controller")
    assert {
        "morgana_controller_scale_events_total",
        "morgana_controller_desired_replicas",
        "morgana_controller_decision_duration_seconds_bucket",
    } <= checked
    crowd.leave()


def test_an_agent_killed_mid_call_is_replaced_through_redispatch_and_the_caller_hears_it(
    cluster: Cluster,
    livekit: LiveKitServer,
    controller: ControllerProcess,
    autoscalers,
    kubelet: Kubelet,
    agent_env: dict,
    fake_openai,
    tmp_path,
) -> None:
    """Fault drill: the worker serving a call is killed outright (SIGKILL: no drain). Its agent
    leaves the room; within the controller's poll and the redispatch grace another worker is
    dispatched there, and the caller, still in the room, is answered by it."""
    from morgana_devtools.processes import AgentWorker
    from morgana_devtools.services import eventually_async
    from morgana_devtools.voice_client import Caller, direct_token, speech_pcm
    from tests.conftest import OPENAI_KEY

    agent_name = "drill-agent"
    name = autoscalers(
        "kill-drill",
        spec(
            livekit,
            "kill-drill-agents",
            agentName=agent_name,
            roomsPerWorker=2,
            minReplicas=2,
            maxReplicas=2,
            headroom=0,
            pollIntervalSeconds=1,
            redispatch={"enabled": True, "graceSeconds": 2},
        ),
        replicas=2,
    )
    kubelet.serving.add("kill-drill-agents")
    # This module's LiveKit, explicitly: the session's agent_env may have been made for another one.
    env = {
        **agent_env,
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "LIVEKIT_AGENT_NAME": agent_name,
    }
    workers = [AgentWorker(env, tmp_path / f"agent-{n}.log").start() for n in range(2)]
    fake_openai.set_transcript("Anyone there")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Is anyone there?")

    def jobs(worker: AgentWorker) -> int:
        return int(httpx.get(f"http://127.0.0.1:{worker.health_port}/worker", timeout=5).json().get("active_jobs", 0))

    async def call() -> None:
        caller = Caller("")
        await caller.connect(livekit.url, direct_token(livekit, "kill-drill-caller", agent_name))
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            spoke = await caller.say(utterance)
            await eventually_async(lambda: caller.first_audio_after(spoke) is not None, 30, what="the answer heard")
            (serving,) = [w for w in workers if await asyncio.to_thread(jobs, w)]
            first_agent = set(caller.room.remote_participants)
            # As a container is killed: the worker and every process it started (its calls').
            import psutil

            main = psutil.Process(serving.process.pid)  # type: ignore[union-attr]
            for process in [main, *main.children(recursive=True)]:
                process.kill()
            killed = time.monotonic()
            # LiveKit lets a participant whose connection vanished go after its ping timeout (about
            # 20 s); from then on the room is agentless, which is the controller's to mend.
            await eventually_async(
                lambda: not set(caller.room.remote_participants) & first_agent,
                40,
                what="the killed worker's agent gone from the room",
            )
            left = time.monotonic()
            await eventually_async(
                lambda: len(caller.room.remote_participants) > 0, 30, what="an agent back in the room"
            )
            timings.update(left=left - killed, replaced=time.monotonic() - left)
            answered = len(caller.agent_texts())  # (the killed agent's transcript may never have come)
            spoke = await caller.say(utterance)
            await eventually_async(
                lambda: caller.first_audio_after(spoke) is not None, 30, what="the new agent's answer heard"
            )
            await eventually_async(
                lambda: len(caller.agent_texts()) > answered, 10, what="the new agent's answer transcribed"
            )
        finally:
            await caller.leave()

    timings: dict[str, float] = {}
    try:
        asyncio.run(call())
        labels = {"namespace": NAMESPACE, "autoscaler": name}
        assert metric_value(controller.metrics(), "morgana_controller_redispatches_total", **labels) >= 1
        # Within a poll (1 s) after the grace (2 s), and the seconds a worker takes to accept the job,
        # start its process and connect (about 1 s here; a loaded machine may need more).
        assert timings["replaced"] <= 1 + 2 + 3, timings
        print(
            f"\nkill drill: LiveKit let the dead agent go {timings['left']:.1f} s after the kill; a new agent "
            f"joined {timings['replaced']:.1f} s later (poll 1 s, grace 2 s)"
        )
    finally:
        for worker in workers:
            worker.stop()
        fake_openai.set_transcript(None)
