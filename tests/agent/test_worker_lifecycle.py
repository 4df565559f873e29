"""The worker as operations see it: health, metrics, capacity, drain, LiveKit restarts, a dead API."""

import asyncio
import json
import re
import signal

import httpx
import pytest

from morgana.agent.worker import PRELOAD_MODULES, full_at, load_of
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker
from morgana_devtools.services import Description, eventually, eventually_async, free_port, stays_async
from morgana_devtools.voice_client import Caller, direct_token, speech_pcm
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(240)


class _Server:
    def __init__(self, jobs: int) -> None:
        self.active_jobs = [object()] * jobs


@pytest.mark.parametrize("max_calls", [1, 2, 4, 10])
def test_a_worker_is_full_exactly_at_its_maximum_of_calls(max_calls: int) -> None:
    load, threshold = load_of(max_calls), full_at(max_calls)
    assert 0 < threshold < 1
    for calls in range(max_calls):
        assert load(_Server(calls)) < threshold
    assert load(_Server(max_calls)) >= threshold
    assert load(_Server(max_calls + 3)) == 1.0


@pytest.fixture(scope="module")
def own_livekit(tmp_path_factory: pytest.TempPathFactory):
    with LiveKitServer(
        "APIlifecycle", "lifecycle-secret-" + "7" * 32, log_path=tmp_path_factory.mktemp("lk-lifecycle") / "livekit.log"
    ) as server:
        yield server


def worker_env(agent_env: dict, livekit: LiveKitServer, agent_name: str, **extra: str) -> dict:
    return {
        **agent_env,
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "LIVEKIT_AGENT_NAME": agent_name,
        **extra,
    }


async def talk(caller: Caller, utterance, timeout: float = 30, what: Description = "the agent's answer heard") -> None:
    spoke_until = await caller.say(utterance)
    await eventually_async(lambda: caller.first_audio_after(spoke_until) is not None, timeout, what=what)


def test_ready_means_registered_in_this_run_not_in_an_earlier_one(
    own_livekit: LiveKitServer, agent_env: dict, tmp_path
) -> None:
    """`make run` appends every run to one worker log. A registration the last run logged must not
    make this run's worker look ready (and `make run` announce it) before LiveKit can dispatch to
    it: a caller joining then would wait in a room no agent is sent to."""
    log = tmp_path / "agent-worker.log"
    earlier = '{"message": "registered worker", "level": "INFO", "name": "livekit.agents"}\n'
    log.write_text(earlier)
    nowhere = worker_env(agent_env, own_livekit, "late-agent", LIVEKIT_URL=f"ws://127.0.0.1:{free_port()}")
    with pytest.raises(RuntimeError, match="not ready"):
        AgentWorker(nowhere, log).start(timeout=8)
    worker = AgentWorker(worker_env(agent_env, own_livekit, "late-agent"), log).start()
    try:
        assert "registered worker" in worker.log() and not worker.log().startswith(earlier)
        assert log.read_text().startswith(earlier)  # earlier runs' lines are kept
    finally:
        worker.stop()


def test_health_metrics_drain_and_reregistration(
    own_livekit: LiveKitServer, agent_env: dict, fake_openai: FakeOpenAIProcess, tmp_path
) -> None:
    worker = AgentWorker(
        worker_env(agent_env, own_livekit, "lifecycle-agent", DRAIN_TIMEOUT_SECONDS="60"), tmp_path / "agent.log"
    ).start()
    try:
        health = httpx.get(f"http://127.0.0.1:{worker.health_port}/", timeout=5)
        assert health.status_code == 200
        info = httpx.get(f"http://127.0.0.1:{worker.health_port}/worker", timeout=5).json()
        assert info["agent_name"] == "lifecycle-agent"
        # Its forkserver imports what every call's process needs, once for all of them.
        (preloading,) = [
            json.loads(line) for line in worker.log_path.read_text().splitlines() if '"preloading plugins"' in line
        ]
        assert set(PRELOAD_MODULES) <= set(preloading["packages"]), preloading

        # LiveKit goes away and comes back: the worker registers again by itself.
        registrations = worker.log_path.read_text().count("registered worker")
        own_livekit.restart()

        def registered_again() -> bool:
            assert worker.process.poll() is None, worker.log_tail()
            return worker.log_path.read_text().count("registered worker") > registrations

        eventually(registered_again, 60, interval=0.5, what=lambda: f"registered again\n{worker.log_tail()}")

        fake_openai.set_transcript("Are you still there")
        utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Are you still there?")

        async def call_through_a_drain() -> Caller:
            caller = Caller("")
            await caller.connect(own_livekit.url, direct_token(own_livekit, "drain-caller", "lifecycle-agent"))
            try:
                await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
                await caller.silence(1.0)
                await talk(caller, utterance, what=lambda: f"the agent's answer heard\n{worker.log_tail()}")
                async with httpx.AsyncClient(timeout=5) as http:
                    metrics = (await http.get(f"http://127.0.0.1:{worker.metrics_port}/metrics")).text
                assert "lk_agents_worker_load" in metrics
                assert "morgana_agent_active_calls 1.0" in metrics
                # The framework's series survive its reset of the metrics directory at start-up.
                assert re.search(r'^lk_agents_active_job_count\{nodename="[^"]+"\} 1\.0$', metrics, re.M), metrics
                assert "lk_agents_proc_initialize_duration_seconds_count" in metrics
                # SIGTERM mid-call: the worker stops taking jobs but the call goes on.
                worker.process.send_signal(signal.SIGTERM)
                await stays_async(lambda: worker.process.poll() is None, 2, what="the worker running during a call")
                await talk(caller, utterance, what="an answer through the drain")
                await eventually_async(
                    lambda: (
                        caller.agent_texts()[-1:] == ["You said: Are you still there"]
                        and len(caller.agent_texts()) == 2
                    ),
                    15,
                    what=lambda: f"the second answer's transcript (got {caller.agent_texts()})",
                )
            finally:
                await caller.leave()
            return caller

        caller = asyncio.run(call_through_a_drain())
        assert caller.agent_texts()[-1] == "You said: Are you still there"
        # With the call over, the drained worker exits cleanly.
        assert worker.process.wait(timeout=60) == 0
    finally:
        worker.stop()
        fake_openai.set_transcript(None)


def test_an_unreachable_api_gets_an_apology_not_a_dead_call(
    own_livekit: LiveKitServer, agent_env: dict, fake_openai: FakeOpenAIProcess, tmp_path
) -> None:
    dead_api = f"http://127.0.0.1:{free_port()}"
    env = worker_env(agent_env, own_livekit, "no-api-agent", MORGANA_BACKEND_URL=dead_api)
    worker = AgentWorker(env, tmp_path / "agent.log").start()
    # No comma: its pause would send the speech to speech-to-text as two requests
    # (STT_VAD_MIN_SILENCE_SECONDS), one turn heard as two transcripts.
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Hello anyone home?")

    async def call() -> Caller:
        caller = Caller("")
        await caller.connect(own_livekit.url, direct_token(own_livekit, "lonely-caller", "no-api-agent"))
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            await talk(caller, utterance)
            await eventually_async(lambda: caller.agent_texts(), 15, what="the apology's transcript")
            # Still connected, still answering (with the same apology) on the next turn.
            await talk(caller, utterance)
            await eventually_async(lambda: len(caller.agent_texts()) >= 2, 15, what="the second apology's transcript")
        finally:
            await caller.leave()
        return caller

    try:
        caller = asyncio.run(call())
    finally:
        worker.stop()
    apology = "Sorry, I'm having trouble thinking right now. Please say that again in a moment."
    assert caller.agent_texts()[:2] == [apology, apology]


def test_a_crashed_call_does_not_take_the_worker_down(
    own_livekit: LiveKitServer, agent_env: dict, fake_openai: FakeOpenAIProcess, tmp_path
) -> None:
    import psutil

    worker = AgentWorker(worker_env(agent_env, own_livekit, "crash-agent"), tmp_path / "agent.log").start()
    fake_openai.set_transcript("Still here")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Are you still here?")

    def serving_processes() -> list[psutil.Process]:
        """Job processes in a call: the worker's children connected to the LiveKit server."""
        found = []
        for child in psutil.Process(worker.process.pid).children(recursive=True):
            try:
                if any(c.raddr and c.raddr.port == own_livekit.port for c in child.net_connections()):
                    found.append(child)
            except psutil.NoSuchProcess:
                pass
        return found

    async def crash_then_call_again() -> Caller:
        doomed = Caller("")
        await doomed.connect(own_livekit.url, direct_token(own_livekit, "doomed-caller", "crash-agent"))
        await eventually_async(lambda: len(doomed.room.remote_participants) > 0, 30, what="an agent joined")
        await doomed.silence(1.0)
        await talk(doomed, utterance)
        serving = serving_processes()
        assert len(serving) == 1
        serving[0].kill()  # the call's process dies as in a segfault or an OOM kill
        await stays_async(lambda: worker.process.poll() is None, 3, what="the worker running after its call died")
        await doomed.leave()

        caller = Caller("")
        await caller.connect(own_livekit.url, direct_token(own_livekit, "next-caller", "crash-agent"))
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            await talk(caller, utterance, what=lambda: f"the agent's answer heard\n{worker.log_tail()}")
            await eventually_async(lambda: caller.agent_texts(), 15, what="the answer's transcript")
        finally:
            await caller.leave()
        return caller

    try:
        caller = asyncio.run(crash_then_call_again())
        assert "You said: Still here" in caller.agent_texts()
    finally:
        worker.stop()
        fake_openai.set_transcript(None)


def test_a_full_worker_takes_no_more_calls_until_one_ends(
    own_livekit: LiveKitServer, agent_env: dict, tmp_path
) -> None:
    worker = AgentWorker(
        worker_env(agent_env, own_livekit, "small-agent", MAX_CONCURRENT_CALLS="2"), tmp_path / "agent.log"
    ).start()

    async def join(name: str) -> Caller:
        caller = Caller("")
        await caller.connect(own_livekit.url, direct_token(own_livekit, name, "small-agent"))
        return caller

    def agent_in(caller: Caller) -> bool:
        return len(caller.room.remote_participants) > 0

    def worker_load() -> float:
        return httpx.get(f"http://127.0.0.1:{worker.health_port}/worker", timeout=5).json()["worker_load"]

    async def scenario() -> None:
        first, second = await join("cap-1"), await join("cap-2")
        await eventually_async(
            lambda: agent_in(first) and agent_in(second),
            30,
            what=lambda: f"an agent in both calls\n{worker.log_tail()}",
        )
        assert worker_load() == 1.0
        third = await join("cap-3")
        await stays_async(lambda: not agent_in(third), 8, what="a full worker taking no third call")
        await third.leave()
        await first.leave()
        # The hung-up call frees its slot, and at the next load report (every 2.5 s) the worker
        # is available again. LiveKit does not queue a job that found every worker full, so
        # only rooms created from then on get the agent (the autoscaler re-dispatches others).
        await eventually_async(
            lambda: "below capacity, marking as available" in worker.log_tail(200),
            15,
            what="the worker available again",
        )
        fourth = await join("cap-4")
        await eventually_async(
            lambda: agent_in(fourth), 30, what=lambda: f"an agent in the fourth call\n{worker.log_tail()}"
        )
        await fourth.leave()
        await second.leave()

    try:
        asyncio.run(scenario())
    finally:
        worker.stop()


def test_livekit_restarted_during_a_call_the_worker_registers_again_and_takes_the_next_call(
    own_livekit: LiveKitServer, agent_env: dict, fake_openai: FakeOpenAIProcess, tmp_path
) -> None:
    """Fault drill: the LiveKit server restarts while a call is up. The call is lost with it (its
    room lived in that server), but the worker needs no restart: it registers again by itself and
    the next caller is answered."""
    worker = AgentWorker(worker_env(agent_env, own_livekit, "restart-drill-agent"), tmp_path / "agent.log").start()
    fake_openai.set_transcript("Still here")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Are you still there?")
    try:

        async def call(identity: str, restart_midway: bool) -> Caller:
            caller = Caller("")
            await caller.connect(own_livekit.url, direct_token(own_livekit, identity, "restart-drill-agent"))
            try:
                await eventually_async(
                    lambda: len(caller.room.remote_participants) > 0,
                    30,
                    what=lambda: f"an agent joined\n{worker.log_tail()}",
                )
                await caller.silence(1.0)
                await talk(caller, utterance, what=lambda: f"the agent's answer heard\n{worker.log_tail()}")
                await eventually_async(lambda: caller.agent_texts(), 10, what="the answer's transcript")
                if restart_midway:
                    registrations = worker.log_path.read_text().count("registered worker")
                    await asyncio.to_thread(own_livekit.restart)
                    await eventually_async(
                        lambda: worker.log_path.read_text().count("registered worker") > registrations,
                        60,
                        what=lambda: f"registered again\n{worker.log_tail()}",
                    )
            finally:
                await caller.leave()
            return caller

        asyncio.run(call("before-restart", restart_midway=True))
        assert worker.process.poll() is None, "the worker died with LiveKit"
        after = asyncio.run(call("after-restart", restart_midway=False))
        assert after.agent_texts() == ["You said: Still here"], worker.log_tail()
        assert worker.process.poll() is None
    finally:
        worker.stop()
        fake_openai.set_transcript(None)
