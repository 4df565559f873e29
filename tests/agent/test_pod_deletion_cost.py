"""A scale-down removes idle agent workers, never the one serving a call.

Real parts only: etcd + kube-apiserver + kube-controller-manager (a Deployment gets real Pods and
a scale-down makes its ReplicaSet delete real Pods, ranked by controller.kubernetes.io/
pod-deletion-cost), the LiveKit server, the API, and agent workers as processes. Each worker
claims one of the Deployment's Pods (POD_NAME / POD_NAMESPACE, as the chart's downward API sets
them) and talks to the API server with a service-account token bound to that pod, as the kubelet
mounts it, under the chart's own rules: a Role that may only patch pods in its namespace, and the
chart's ValidatingAdmissionPolicy, which narrows that to the deletion-cost annotation of its own pod.
"""

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from morgana.agent.pod_cost import COST_ANNOTATION, PodDeletionCost
from morgana_devtools.kube_apiserver import KubeApiServer, KubeClient
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker, ApiProcess
from morgana_devtools.services import Description, eventually, eventually_async, stays_async
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.chart.helm import render
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(240)

NAMESPACE = "voice"
ROLE = "morgana-agent-pod-deletion-cost"
SERVICE_ACCOUNT = "morgana-agent"
DEPLOYMENT = "morgana-agent"
LABELS = {"app.kubernetes.io/name": "morgana-agent"}
AGENT_NAME = "pod-cost-agent"  # only this module's workers take these calls


class Cluster(KubeClient):
    """The API server through its REST API, with the Deployment's pods and their costs."""

    def bind(self, service_account: str, namespace: str = NAMESPACE) -> None:
        self.create(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "metadata": {"name": f"{service_account}-pod-deletion-cost"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ROLE},
                "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
            },
        )

    def pod_token(self, pod: str, service_account: str = SERVICE_ACCOUNT, namespace: str = NAMESPACE) -> str:
        """A token bound to `pod`, as the kubelet mounts one into it (the policy reads its pod name)."""
        uid = self.get(f"/api/v1/namespaces/{namespace}/pods/{pod}")["metadata"]["uid"]
        bound = {"apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid}
        return self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600, "boundObjectRef": bound},
            },
        )["status"]["token"]

    def pods(self, namespace: str = NAMESPACE) -> list[dict]:
        """The Deployment's live pods (those not being deleted)."""
        response = self.http.get(
            f"/api/v1/namespaces/{namespace}/pods",
            params={"labelSelector": ",".join(f"{k}={v}" for k, v in LABELS.items())},
        )
        response.raise_for_status()
        return [p for p in response.json()["items"] if not p["metadata"].get("deletionTimestamp")]

    def costs(self, namespace: str = NAMESPACE) -> dict[str, str | None]:
        """{pod name: its deletion-cost annotation (None when unset)}."""
        return {
            p["metadata"]["name"]: (p["metadata"].get("annotations") or {}).get(COST_ANNOTATION)
            for p in self.pods(namespace)
        }

    def cost(self, pod: str, namespace: str = NAMESPACE) -> str | None:
        response = self.http.get(f"/api/v1/namespaces/{namespace}/pods/{pod}")
        response.raise_for_status()
        return (response.json()["metadata"].get("annotations") or {}).get(COST_ANNOTATION)

    def scale(self, replicas: int, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        return self.request(
            "PATCH",
            f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{DEPLOYMENT}/scale",
            {"spec": {"replicas": replicas}},
            merge=True,
            ok=ok,
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A namespace with the chart's Role for the workers (pods: patch) and its admission policy."""
    with KubeApiServer(controller_manager=True, log_dir=tmp_path_factory.mktemp("kube")) as kube:
        admin = Cluster(kube)
        admin.create("/api/v1/namespaces", {"metadata": {"name": NAMESPACE}})
        # The chart's Role rules and admission policy, for a release in this namespace whose agent
        # ServiceAccount is SERVICE_ACCOUNT.
        chart = render(sets=[f"agent.serviceAccount.name={SERVICE_ACCOUNT}"], namespace=NAMESPACE)
        (role,) = [o for o in chart if o["kind"] == "Role" and o["metadata"]["name"].endswith("-agent")]
        admin.create(
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NAMESPACE}/roles",
            {"metadata": {"name": ROLE}, "rules": role["rules"]},
        )
        for kind, plural in (
            ("ValidatingAdmissionPolicy", "validatingadmissionpolicies"),
            ("ValidatingAdmissionPolicyBinding", "validatingadmissionpolicybindings"),
        ):
            (policy,) = [o for o in chart if o["kind"] == kind]
            admin.create(f"/apis/admissionregistration.k8s.io/v1/{plural}", policy)
        admin.create(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts", {"metadata": {"name": SERVICE_ACCOUNT}})
        admin.bind(SERVICE_ACCOUNT)
        yield admin
        admin.http.close()


async def off_loop(function, *args, **kwargs):
    """A blocking call (the API server, a process) without stalling the caller's audio."""
    return await asyncio.to_thread(function, *args, **kwargs)


def test_scale_down_removes_the_idle_workers_and_the_call_goes_on(
    cluster: Cluster, agent_env: dict, voice_env: dict, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    started = time.monotonic()
    cluster.create(
        f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments",
        {
            "metadata": {"name": DEPLOYMENT, "labels": LABELS},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": LABELS},
                "template": {
                    "metadata": {"labels": LABELS},
                    "spec": {
                        "serviceAccountName": SERVICE_ACCOUNT,
                        "automountServiceAccountToken": False,
                        "containers": [{"name": "agent", "image": "registry.invalid/morgana-agent:test"}],
                    },
                },
            },
        },
    )
    eventually(
        lambda: len(cluster.pods()) == 3, 30, what=lambda: f"3 pods\n{cluster.kube.log_tail('kube-controller-manager')}"
    )
    pods = sorted(cluster.costs())
    assert all(cost is None for cost in cluster.costs().values())

    # The workers' credentials: per pod, a token bound to it, as the kubelet mounts them.
    kubeconfigs = {
        pod: cluster.kube.token_kubeconfig(cluster.pod_token(pod), tmp_path / f"kubeconfig-{pod}", namespace=NAMESPACE)
        for pod in pods
    }
    worker_view = cluster.as_token(cluster.pod_token(pods[0]))
    assert worker_view.http.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{pods[0]}").status_code == 403  # no reads
    assert worker_view.http.get(f"/api/v1/namespaces/{NAMESPACE}/pods").status_code == 403
    assert worker_view.http.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{pods[0]}").status_code == 403
    worker_view.scale(5, ok=(403,))  # may not scale
    assert worker_view.http.get("/api/v1/namespaces/default/pods/anything").status_code == 403

    def patch(pod: str, metadata: dict) -> int:
        return worker_view.http.patch(
            f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}",
            json={"metadata": metadata},
            headers={"Content-Type": "application/merge-patch+json"},
        ).status_code

    # The admission policy: its own pod's deletion cost, and nothing else. (Once the new policy is
    # in force: until then RBAC alone lets this harmless probe through.)
    eventually(
        lambda: patch(pods[1], {"annotations": {"example.com/probe": "x"}}) in (403, 422),
        10,
        what="the admission policy refusing a change to another pod",
    )
    assert patch(pods[1], {"annotations": {COST_ANNOTATION: "1"}}) in (403, 422)  # another pod
    assert patch(pods[0], {"annotations": {COST_ANNOTATION: "0"}}) == 200
    assert patch(pods[0], {"annotations": {COST_ANNOTATION: "lots"}}) in (403, 422)
    assert patch(pods[0], {"annotations": {"example.com/other": "x"}}) in (403, 422)
    assert patch(pods[0], {"labels": {"app.kubernetes.io/name": "hijacked"}}) in (403, 422)
    assert patch(pods[0], {"ownerReferences": None}) in (403, 422)
    assert set(cluster.costs().values()) == {"0", None}
    cluster.request(
        "PATCH",
        f"/api/v1/namespaces/{NAMESPACE}/pods/{pods[0]}",
        {"metadata": {"annotations": {COST_ANNOTATION: None}}},
        merge=True,
    )
    worker_view.http.close()

    # One worker per pod, and an API whose tokens dispatch this module's agent name. Its own
    # redispatch is off, as the chart sets it beside the controller: a second agent sent to a
    # caller briefly alone would make a second worker busy.
    api = ApiProcess(
        {**voice_env, "LIVEKIT_AGENT_NAME": AGENT_NAME, "LIVEKIT_REDISPATCH_SECONDS": "0"}, tmp_path / "api.log"
    )
    workers = {
        pod: AgentWorker(
            {
                **agent_env,
                "LIVEKIT_AGENT_NAME": AGENT_NAME,
                "POD_NAME": pod,
                "POD_NAMESPACE": NAMESPACE,
                "KUBECONFIG": str(kubeconfigs[pod]),
                "DRAIN_TIMEOUT_SECONDS": "60",
            },
            tmp_path / f"agent-{i}.log",
        )
        for i, pod in enumerate(pods)
    }
    fake_openai.set_transcript("Are you still there")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Are you still there?")

    def active_jobs(pod: str) -> int:
        info = httpx.get(f"http://127.0.0.1:{workers[pod].health_port}/worker", timeout=5).json()
        return info.get("active_jobs", 0)  # proto JSON leaves out zeros

    async def talk(caller: Caller, what: Description) -> None:
        spoke_until = await caller.say(utterance)
        await eventually_async(lambda: caller.first_audio_after(spoke_until) is not None, 30, what=what)

    async def scenario() -> None:
        caller = Caller(api.url)
        await caller.join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            joined = time.monotonic()
            # The worker that took the call has cost 1, the idle ones 0.
            await off_loop(
                eventually,
                lambda: sorted(cluster.costs().values()) == ["0", "0", "1"],
                10,
                what=lambda: f"costs 0, 0 and 1 (got {cluster.costs()})",
            )
            print(f"cost 1 written {time.monotonic() - joined:.2f} s after the agent joined")
            busy = next(pod for pod, cost in (await off_loop(cluster.costs)).items() if cost == "1")
            assert {pod: await off_loop(active_jobs, pod) for pod in pods} == {p: int(p == busy) for p in pods}
            await caller.silence(0.5)
            await talk(caller, what=lambda: f"the agent's answer heard\n{workers[busy].log_tail()}")

            # The autoscaler scales down to 1: the ReplicaSet deletes the two idle pods.
            assert (await off_loop(cluster.scale, 1)).status_code == 200
            await off_loop(
                eventually,
                lambda: list(cluster.costs()) == [busy],
                20,
                what=lambda: f"only the busy pod left (got {cluster.costs()})",
            )
            # (the kubelet would now stop their containers)
            await asyncio.gather(*(off_loop(workers[pod].stop) for pod in pods if pod != busy))

            # The call goes on, its pod still marked busy.
            await talk(caller, what="an answer after the scale-down")
            assert await off_loop(cluster.cost, busy) == "1"
            metrics = (await off_loop(httpx.get, f"http://127.0.0.1:{workers[busy].metrics_port}/metrics")).text
            assert "morgana_agent_pod_cost_errors_total 0.0" in metrics
        finally:
            await caller.leave()
        hung_up = time.monotonic()
        await off_loop(eventually, lambda: cluster.cost(busy) == "0", 10, what="cost 0 after the hang-up")
        print(f"cost 0 written {time.monotonic() - hung_up:.2f} s after the hang-up")

        # A second call, then SIGTERM (a rollout): the worker drains with its pod still marked
        # busy, and only when the last call ends is the cost 0 again and the worker gone.
        caller = Caller(api.url)
        await caller.join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await off_loop(eventually, lambda: cluster.cost(busy) == "1", 10, what="cost 1 in the second call")
            workers[busy].process.terminate()
            await caller.silence(1.0)
            assert workers[busy].process.poll() is None, "the worker quit during a call"
            await talk(caller, what="an answer through the drain")
            assert await off_loop(cluster.cost, busy) == "1"
        finally:
            await caller.leave()
        assert await off_loop(workers[busy].process.wait, 30) == 0
        assert await off_loop(cluster.cost, busy) == "0"

    try:
        with ThreadPoolExecutor(len(workers) + 1) as pool:
            for started_process in [pool.submit(api.start), *(pool.submit(w.start) for w in workers.values())]:
                started_process.result()
        # Each worker marks its pod idle as soon as it runs.
        eventually(
            lambda: cluster.costs() == dict.fromkeys(pods, "0"),
            10,
            what=lambda: f"every pod at cost 0 (got {cluster.costs()})",
        )
        asyncio.run(scenario())
    finally:
        fake_openai.set_transcript(None)
        for worker in workers.values():
            worker.stop()
        api.stop()
    for worker in workers.values():
        log = worker.log_path.read_text(errors="replace")
        assert "pod deletion cost: pod found" in log
        assert "could not set the pod deletion cost" not in log and "pod deletion cost loop failed" not in log
    print(f"test took {time.monotonic() - started:.1f} s")


def errors_total() -> float:
    return REGISTRY.get_sample_value("morgana_agent_pod_cost_errors_total") or 0.0


def test_failures_are_counted_and_retried_and_a_burst_is_one_write(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The annotator itself against the real API server, fed a count it can be told about."""
    cluster.create(f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts", {"metadata": {"name": "late"}})
    cluster.create(
        f"/api/v1/namespaces/{NAMESPACE}/pods",
        {
            "metadata": {"name": "solo", "labels": {"test": "solo"}},
            "spec": {
                "serviceAccountName": "late",
                "automountServiceAccountToken": False,
                "containers": [{"name": "agent", "image": "registry.invalid/morgana-agent:test"}],
            },
        },
    )
    # Not bound to the Role yet: every request is forbidden.
    token = cluster.service_account_token(NAMESPACE, "late")
    monkeypatch.setenv("KUBECONFIG", str(cluster.kube.token_kubeconfig(token, tmp_path / "kubeconfig")))
    jobs = [0]

    async def scenario() -> None:
        cost = PodDeletionCost(
            "solo", NAMESPACE, debounce=0.3, poll_interval=0.1, retry_backoff=0.2, max_retry_backoff=0.4
        )
        before = errors_total()
        task = asyncio.create_task(cost.run(lambda: jobs[0]))
        await eventually_async(lambda: errors_total() >= before + 2, 10, what="a retry after a failure")
        assert not task.done() and cost.written is None

        # Granted: the next retry succeeds, without any restart.
        await off_loop(cluster.bind, "late")
        await eventually_async(lambda: cost.written == 0, 10, what="cost 0 written once allowed")
        assert await off_loop(cluster.cost, "solo") == "0"

        # Five calls start within the debounce window: one PATCH, of the final count.
        writes = cost.writes
        for n in range(1, 6):
            jobs[0] = n
            cost.notify()
            await asyncio.sleep(0.03)
        await eventually_async(lambda: cost.written == 5, 5, what="the burst's final count written")
        await stays_async(lambda: cost.writes == writes + 1, 0.5, what="one write for the burst")
        assert await off_loop(cluster.cost, "solo") == "5"

        # The calls end just as the worker exits (its tasks are cancelled): a last write.
        jobs[0] = 0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert cost.written == 0

    asyncio.run(scenario())
    assert cluster.cost("solo") == "0"
