"""Scenarios 3 to 6 of the node tier: calls through the in-cluster agents, the controller scaling
them from room load, a rolling upgrade and two drills, all on the pods of one operator's install.

Callers are LiveKit clients on this machine (morgana_devtools.voice_client): each registers with
the API, gets its LiveKit token there and joins at the address the API hands out; an agent pod
takes the job, hears real speech and answers aloud. A call is *cut* when its agent leaves the room
while the caller is still in it: every test counts those, and prints the count.

One call per worker (conftest.AUTOSCALER), so the autoscaler wants `calls + 1` workers (headroom
1), between 1 and 3; scale-down waits 15 s of lower need.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from morgana_devtools.kube_apiserver import cached_binary
from morgana_devtools.services import eventually, eventually_async
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.chart.helm import CHART
from tests.conftest import OPENAI_KEY
from tests.images.containers import IMAGE_TAG
from tests.node.conftest import NAMESPACE, RELEASE, Installed, ready

pytestmark = pytest.mark.timeout(600)

TRANSCRIPT = "Are you still there"
ANSWER = f"You said: {TRANSCRIPT}"


def pod_name(pod: dict) -> str:
    return str(pod["metadata"]["name"])


def agent_pods(installed: Installed, *, terminating: bool = True) -> list[dict]:
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=agent"
    items = installed.client.get(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}")["items"]
    return [p for p in items if terminating or not p["metadata"].get("deletionTimestamp")]


def active_jobs(pod: dict) -> int:
    """The calls a worker is serving, from its own health endpoint (at the pod's address)."""
    ip = pod["status"].get("podIP")
    if not ip:
        return 0
    try:
        return int(httpx.get(f"http://{ip}:8081/worker", timeout=3).json().get("active_jobs", 0))
    except (httpx.HTTPError, ValueError):
        return 0


def serving(installed: Installed) -> dict[str, int]:
    """{pod: calls} for every agent pod serving at least one call (terminating ones included)."""
    return {pod_name(p): n for p in agent_pods(installed) if (n := active_jobs(p))}


def settled(installed: Installed, replicas: int) -> bool:
    """The autoscaler asks for `replicas` workers and exactly that many run, all Ready."""
    spec = installed.deployment("agent")["spec"].get("replicas")
    pods = agent_pods(installed, terminating=False)
    return spec == replicas and len(pods) == replicas and all(ready(p) for p in pods)


def wait_settled(installed: Installed, replicas: int, timeout: float = 150) -> list[str]:
    eventually(
        lambda: settled(installed, replicas),
        timeout,
        interval=1,
        what=lambda: (
            f"{replicas} agent workers, all Ready\n"
            + "\n".join(f"{pod_name(p)} ready={ready(p)}" for p in agent_pods(installed))
        ),
    )
    return sorted(pod_name(p) for p in agent_pods(installed, terminating=False))


async def settled_async(installed: Installed, replicas: int, timeout: float = 150) -> list[str]:
    return await asyncio.to_thread(wait_settled, installed, replicas, timeout)


@dataclass
class Call:
    """One caller in one room, talking to whichever agent pod took the call."""

    installed: Installed
    utterance: np.ndarray
    caller: Caller = field(init=False)
    answered: int = 0
    agent: str = ""

    def __post_init__(self) -> None:
        self.caller = Caller(self.installed.api_url)

    async def start(self) -> Call:
        await self.caller.join()
        await eventually_async(lambda: self.caller.room.remote_participants, 90, what="an agent joined the call")
        (self.agent,) = self.caller.room.remote_participants
        await self.caller.silence(1.0)
        await self.exchange()
        return self

    async def exchange(self) -> None:
        """Say the utterance and hear an answer: the call is alive."""
        spoke = await self.caller.say(self.utterance)
        await eventually_async(
            lambda: self.caller.first_audio_after(spoke) is not None, 45, what="the agent's answer heard"
        )
        self.answered += 1

    @property
    def cut(self) -> bool:
        return self.agent in self.caller.left_while_connected

    async def end(self) -> None:
        await self.caller.leave()


async def keep_talking(calls: list[Call], until: Callable[[], Awaitable[object]]) -> object:
    """Keep every call exchanging, one after another, until `until()` returns; its result."""
    done = asyncio.Event()

    async def talk() -> None:
        while not done.is_set():
            for call in calls:
                await call.exchange()

    talker = asyncio.create_task(talk())
    try:
        return await until()
    finally:
        done.set()
        await talker  # a failed exchange fails the test here


@pytest.fixture
def utterance(installed: Installed) -> Iterator[np.ndarray]:
    installed.model.set_transcript(TRANSCRIPT)
    yield speech_pcm(installed.model.root_url, OPENAI_KEY, "Are you still there?")
    installed.model.set_transcript(None)


def report(what: str, calls: list[Call]) -> None:
    cut = sum(call.cut for call in calls)
    print(
        f"\n{what}: {cut} of {len(calls)} calls cut, "
        f"{sum(call.answered for call in calls)} answers heard ({', '.join(str(c.answered) for c in calls)})"
    )
    assert cut == 0, [(call.agent, call.caller.left_while_connected) for call in calls]


def test_a_caller_is_answered_by_an_agent_pod_and_the_turn_is_in_the_history(installed: Installed) -> None:
    installed.model.queue_transcripts("What is the weather like")
    utterance = speech_pcm(installed.model.root_url, OPENAI_KEY, "What is the weather like today?")

    async def call() -> tuple[Caller, dict[str, int]]:
        call = await Call(installed, utterance).start()
        try:
            await eventually_async(
                lambda: call.caller.agent_texts() and call.caller.user_texts(), 15, what="both transcripts"
            )
            pods = await asyncio.to_thread(serving, installed)
        finally:
            await call.end()
        return call.caller, pods

    caller, pods = asyncio.run(call())
    # A worker in an agent pod of the release took the call.
    assert len(pods) == 1 and set(pods) <= {pod_name(p) for p in agent_pods(installed)}, pods
    assert caller.user_texts() == ["What is the weather like"]
    assert caller.agent_texts() == ["You said: What is the weather like"]
    # The caller's speech reached speech-to-text as real audio, through LiveKit's pod.
    transcribed = installed.model.audio_requests("transcriptions")
    assert transcribed and transcribed[-1]["rms"] > 0.01 and transcribed[-1]["duration"] > 0.5
    # The call continued the caller's own conversation: the turn is in their history, as spoken.
    assert asyncio.run(caller.history()) == [
        ("user", "What is the weather like", "voice"),
        ("assistant", "You said: What is the weather like", "voice"),
    ]


def test_callers_scale_the_agents_up_and_scale_down_removes_idle_pods_only(
    installed: Installed, utterance: np.ndarray
) -> None:
    """Callers arrive: new pods start, register with LiveKit and take calls. One leaves: after the
    stabilisation window the autoscaler removes a worker, and the ReplicaSet picks an idle one (its
    pod-deletion-cost is 0; the busy worker's is 1) while the other call goes on."""
    first = wait_settled(installed, 1)

    async def scenario() -> list[Call]:
        a = await Call(installed, utterance).start()
        (a_pod,) = await asyncio.to_thread(serving, installed)
        assert [a_pod] == first  # the one worker there took the first call
        await settled_async(installed, 2)  # 1 call + 1 free slot
        b = await Call(installed, utterance).start()
        await settled_async(installed, 3)
        b_pod = next(pod for pod in await asyncio.to_thread(serving, installed) if pod != a_pod)
        assert b_pod not in first  # a worker that started for the load took the second call
        before = set(await settled_async(installed, 3))

        await a.end()
        # B keeps talking while the autoscaler, after its window, goes from 3 workers to 2.
        after = set(await keep_talking([b], lambda: settled_async(installed, 2, timeout=120)))  # type: ignore[arg-type]
        removed = before - after
        assert len(removed) == 1 and b_pod in after, (before, after)
        await b.exchange()
        await b.end()
        await settled_async(installed, 1, timeout=120)
        return [a, b]

    report("scale-down", asyncio.run(scenario()))


def test_an_upgrade_during_live_calls_finishes_each_call_on_its_old_pod(
    installed: Installed, utterance: np.ndarray
) -> None:
    """`helm upgrade` to a new agent image tag while two calls are live: new workers start first
    (maxSurge 1, maxUnavailable 0), each old one drains on SIGTERM, keeping its call to the end,
    and a call placed after the upgrade lands on a new pod."""
    new_tag = f"{IMAGE_TAG}-upgrade"
    image_ref = "localhost/morgana-agent"
    installed.node.ctr("images", "tag", "--force", f"{image_ref}:{IMAGE_TAG}", f"{image_ref}:{new_tag}")
    wait_settled(installed, 1)

    def image(pod: dict) -> str:
        return str(pod["spec"]["containers"][0]["image"])

    migrations = installed.client.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{RELEASE}-migrate")

    def upgrade() -> None:
        result = installed.helm(
            "upgrade", RELEASE, CHART, "--reuse-values", "--set", f"agent.image.tag={new_tag}",
            "--wait", "--timeout", "5m", timeout=360,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr

    async def scenario() -> list[Call]:
        a = await Call(installed, utterance).start()
        b = await Call(installed, utterance).start()
        await settled_async(installed, 3)
        old = await asyncio.to_thread(serving, installed)
        assert len(old) == 2, old
        await keep_talking([a, b], lambda: asyncio.to_thread(upgrade))
        # Rolled out: every worker the Deployment counts runs the new image; the two old ones
        # are terminating, each still serving its call.
        current = await asyncio.to_thread(agent_pods, installed, terminating=False)
        assert current and all(image(p).endswith(f":{new_tag}") for p in current), [image(p) for p in current]
        pods = await asyncio.to_thread(agent_pods, installed)
        draining = {pod_name(p) for p in pods if p["metadata"].get("deletionTimestamp")}
        assert set(old) <= draining, (old, draining)
        for call in (a, b):
            await call.exchange()
        c = await Call(installed, utterance).start()
        new_serving = set(await asyncio.to_thread(serving, installed)) - set(old)
        assert new_serving and new_serving <= {pod_name(p) for p in current}, new_serving
        for call in (a, b, c):
            await call.end()
        # The calls over, the old workers exit (well before their grace period) and are gone.
        await eventually_async(
            lambda: not set(old) & {pod_name(p) for p in agent_pods(installed)}, 90, what="the old pods gone"
        )
        return [a, b, c]

    calls = asyncio.run(scenario())
    # The pre-upgrade hook ran a fresh migration Job to completion.
    job = installed.client.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{RELEASE}-migrate")
    assert job["metadata"]["uid"] != migrations["metadata"]["uid"] and job["status"].get("succeeded") == 1
    report("rolling upgrade", calls)


def test_an_agent_pod_deleted_mid_call_drains_it_within_its_grace_period(
    installed: Installed, utterance: np.ndarray
) -> None:
    wait_settled(installed, 1)
    timings: dict[str, float] = {}

    async def scenario() -> list[Call]:
        call = await Call(installed, utterance).start()
        (pod,) = await asyncio.to_thread(serving, installed)
        installed.client.delete(f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}")
        deleted = time.monotonic()
        grace = installed.pod(pod)["spec"]["terminationGracePeriodSeconds"]  # type: ignore[index]
        # Terminating, the worker keeps its call: two more exchanges, on the same agent.
        for _ in range(2):
            await call.exchange()
        assert installed.pod(pod) is not None, "the pod went before its call ended"
        timings["kept"] = time.monotonic() - deleted
        await call.end()
        ended = time.monotonic()
        await eventually_async(lambda: installed.pod(pod) is None, grace, what=f"{pod} gone after its call")
        timings.update(exit=time.monotonic() - ended, grace=grace, total=time.monotonic() - deleted)
        assert timings["total"] < grace, timings
        return [call]

    calls = asyncio.run(scenario())
    print(
        f"\ndrain on delete: the call went on {timings['kept']:.1f} s after the delete; the pod exited "
        f"{timings['exit']:.1f} s after the call ended ({timings['total']:.0f} s of a {timings['grace']:.0f} s grace)"
    )
    report("pod deleted mid-call", calls)


def test_an_agent_killed_mid_call_leaves_a_room_the_controller_redispatches(
    installed: Installed, utterance: np.ndarray
) -> None:
    """SIGKILL to the worker serving a call (its container's init: every process of the container
    dies, nothing drains). LiveKit lets the dead agent go; the controller sees an agentless room
    with a caller and dispatches the agent there again, and another worker answers the caller."""
    wait_settled(installed, 1)
    (controller,) = installed.pods("controller")
    metrics_url = f"http://{controller['status']['podIP']}:9102/metrics"

    def redispatches() -> float:
        text = httpx.get(metrics_url, timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("morgana_controller_redispatches_total{")
        )

    before = redispatches()
    timings: dict[str, float] = {}

    async def scenario() -> tuple[Call, str, str, list[tuple[str, str, str]]]:
        call = await Call(installed, utterance).start()
        (pod,) = await asyncio.to_thread(serving, installed)
        answered_before = call.answered
        container = installed.pod(pod)["status"]["containerStatuses"][0]["containerID"]  # type: ignore[index]
        installed.node.ctr("tasks", "kill", "--signal", "SIGKILL", container.split("://", 1)[1])
        killed = time.monotonic()
        first_agent = call.agent
        await eventually_async(lambda: first_agent in call.caller.left_while_connected, 60, what="the dead agent gone")
        timings["left"] = time.monotonic() - killed
        await eventually_async(lambda: call.caller.room.remote_participants, 60, what="an agent back in the room")
        timings["replaced"] = time.monotonic() - killed - timings["left"]
        (call.agent,) = call.caller.room.remote_participants
        await call.exchange()
        await call.exchange()
        (new_pod,) = await asyncio.to_thread(serving, installed)
        await call.end()
        # The controller's dispatch carried the caller's call credential on: the new agent went on
        # with the caller's own conversation. The caller was silent when the worker died, so its
        # history then held exactly the answers heard; a new agent without the credential would
        # have added nothing to it.
        history = await call.caller.history()
        spoken = [turn for turn in history if turn[0] == "assistant" and turn[2] == "voice"]
        assert len(spoken) > answered_before, (answered_before, call.answered, history)
        return call, pod, new_pod, spoken

    call, pod, new_pod, _ = asyncio.run(scenario())
    assert redispatches() >= before + 1
    assert call.answered >= 2 and not call.cut
    restarted = installed.pod(pod)
    assert restarted is not None and restarted["status"]["containerStatuses"][0]["restartCount"] >= 1
    print(
        f"\nkill drill: LiveKit let the dead agent go {timings['left']:.1f} s after the kill; a new agent "
        f"joined {timings['replaced']:.1f} s later, on {'another pod' if new_pod != pod else 'the restarted pod'}"
    )


def test_uninstall_runs_the_stop_hook_and_leaves_nothing_of_the_release(installed: Installed) -> None:
    """Last of the tier: `helm uninstall` with the controller running. The pre-delete hook (a Job of
    the controller image) scales the controller to 0 while its RBAC still exists; the controller
    takes its finalizer off the AgentAutoscaler on its way out, so nothing stays Terminating; then
    the release's objects go and the namespace deletes. Helm leaves only the hook objects it never
    owns: the finished migration Job (until its TTL) and the `helm test` Pod."""
    (controller,) = installed.pods("controller")
    ns = f"/namespaces/{NAMESPACE}"
    # Before: the controller serves the release's AgentAutoscaler, holding its finalizer, as the
    # active peer of the KopfPeering the chart made.
    autoscaler = installed.client.get(f"/apis/morgana.dev/v1alpha1{ns}/agentautoscalers/{RELEASE}-agent")
    conditions = {c["type"]: c["status"] for c in autoscaler["status"]["conditions"]}
    assert conditions["Ready"] == "True" and "morgana.dev/autoscaler" in autoscaler["metadata"]["finalizers"]
    peering = installed.client.get(f"/apis/kopf.dev/v1{ns}/kopfpeerings/{RELEASE}-controller")
    assert peering["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert any(peer.startswith(f"{RELEASE}-controller-") for peer in peering.get("status") or {}), peering
    kubectl = [str(cached_binary("kubectl")), "--kubeconfig", str(installed.kube.kubeconfig), "-n", NAMESPACE]
    # The controller's whole log, to its exit: the pod is gone once the uninstall returns.
    logs = subprocess.Popen([*kubectl, "logs", "-f", pod_name(controller)], stdout=subprocess.PIPE, text=True)
    result = installed.helm("uninstall", RELEASE, "--wait", "--timeout", "3m", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    controller_log, _ = logs.communicate(timeout=60)
    assert "finalizer left in place" not in controller_log, controller_log[-6000:]

    def names(path: str) -> set[str]:
        return {item["metadata"]["name"] for item in installed.client.get(path)["items"]}

    cluster_services = {"postgres", "valkey", "livekit"}
    left = {
        "agentautoscalers": names(f"/apis/morgana.dev/v1alpha1{ns}/agentautoscalers"),
        "kopfpeerings": names(f"/apis/kopf.dev/v1{ns}/kopfpeerings"),
        "deployments": names(f"/apis/apps/v1{ns}/deployments") - cluster_services,
        "jobs": names(f"/apis/batch/v1{ns}/jobs") - {f"{RELEASE}-migrate"},
        "services": names(f"/api/v1{ns}/services") - cluster_services,
        "roles": names(f"/apis/rbac.authorization.k8s.io/v1{ns}/roles"),
        "rolebindings": names(f"/apis/rbac.authorization.k8s.io/v1{ns}/rolebindings"),
        "serviceaccounts": names(f"/api/v1{ns}/serviceaccounts") - {"default"},
        "configmaps": names(f"/api/v1{ns}/configmaps") - {"kube-root-ca.crt"},
        "secrets": names(f"/api/v1{ns}/secrets") - {"morgana-db-app", "morgana-livekit", "morgana-secrets"},
        "poddisruptionbudgets": names(f"/apis/policy/v1{ns}/poddisruptionbudgets"),
    }
    assert not any(left.values()), left
    selector = "labelSelector=app.kubernetes.io/component+in+(api,agent,controller,controller-stop)"
    eventually(lambda: not names(f"/api/v1{ns}/pods?{selector}"), 60, what="every pod of the release gone")
    # Nothing of Morgana's holds the namespace up.
    installed.client.delete(f"/api/v1/namespaces/{NAMESPACE}")
    eventually(
        lambda: installed.client.request("GET", f"/api/v1/namespaces/{NAMESPACE}", ok=(200, 404)).status_code == 404,
        120,
        what="the namespace deleted",
    )
