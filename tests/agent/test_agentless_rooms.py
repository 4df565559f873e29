"""No caller left alone with silence, without the controller: the API sends the agent again.

LiveKit drops a dispatch that finds no registered worker. A caller who joins before any worker of
the agent's name is up is told so on `morgana.status`, and gets the agent once a worker registers,
continuing their own conversation (the dispatch's call credential carried on).
"""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker, ApiProcess
from morgana_devtools.services import eventually_async
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(180)

LATE_AGENT = "morgana-agent-late"


@pytest.fixture(scope="module")
def late_api(voice_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """An API whose agent has no worker yet, looking for lonely callers often."""
    env = {
        **voice_env,
        "LIVEKIT_AGENT_NAME": LATE_AGENT,
        "LIVEKIT_REDISPATCH_SECONDS": "0.5",
        "LIVEKIT_REDISPATCH_GRACE_SECONDS": "1",
        "LIVEKIT_REDISPATCH_RETRY_SECONDS": "3",
        "LIVEKIT_NO_AGENT_NOTICE_SECONDS": "2",
    }
    with ApiProcess(env, tmp_path_factory.mktemp("late-api") / "api.log") as process:
        yield process


def test_a_caller_alone_is_told_then_gets_the_agent_once_a_worker_registers(
    late_api: ApiProcess, agent_env: dict, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    fake_openai.queue_transcripts("Is anybody there")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Is anybody there?")
    worker_env = {**agent_env, "LIVEKIT_AGENT_NAME": LATE_AGENT, "MORGANA_BACKEND_URL": late_api.url}
    workers: list[AgentWorker] = []

    async def scenario() -> Caller:
        caller = Caller(late_api.url)
        await caller.join()
        try:
            await eventually_async(lambda: caller.statuses, 15, what="the caller told that no agent came")
            assert not caller.room.remote_participants
            # A worker registers: the API sends the agent again, with the call's credential.
            workers.append(await asyncio.to_thread(AgentWorker(worker_env, tmp_path / "agent.log").start))
            await eventually_async(lambda: caller.room.remote_participants, 45, what="the agent sent to the room")
            await caller.silence(1.0)
            spoke_until = await caller.say(utterance)
            await eventually_async(lambda: caller.first_audio_after(spoke_until) is not None, 30, what="an answer")
            await eventually_async(caller.agent_texts, 15, what="the answer's transcript")
        finally:
            await caller.leave()
            for worker in workers:
                await asyncio.to_thread(worker.stop)
        return caller

    caller = asyncio.run(scenario())
    assert caller.statuses == [
        {"status": "no_agent", "message": "No voice agent is available right now. Please try again in a moment."}
    ]
    assert caller.agent_texts() == ["You said: Is anybody there"]
    assert asyncio.run(caller.history()) == [
        ("user", "Is anybody there", "voice"),
        ("assistant", "You said: Is anybody there", "voice"),
    ]
