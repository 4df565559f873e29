"""Preemptive generation (PREEMPTIVE_GENERATION=true) on the real LiveKit server, with real speech.

The worker asks the API for a reply as soon as it has a final transcript, before the end of the
turn is decided. A caller who pauses mid-sentence and goes on gets that early reply dropped
unheard; the agent takes its turn back from the conversation, so the caller's history holds the
whole sentence once, answered once. With PREEMPTIVE_TTS=true the early reply's speech is
synthesised before the turn ends too, and still never heard.
"""

import asyncio
from collections.abc import Iterator

import pytest

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker, ApiProcess
from morgana_devtools.services import eventually_async
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.agent.pauses import FINISHED, pause_mid_sentence
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(180)

AGENT_NAME = "morgana-agent-preemptive"
TOOK_BACK = "took back a reply the caller never heard"


@pytest.fixture(scope="module")
def preemptive_api(voice_env: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """An API whose LiveKit tokens send the preemptive worker (its agentless-room check off: the
    main voice API's check does not look at this agent's rooms either)."""
    env = {**voice_env, "LIVEKIT_AGENT_NAME": AGENT_NAME, "LIVEKIT_REDISPATCH_SECONDS": "0"}
    with ApiProcess(env, tmp_path_factory.mktemp("preemptive-api") / "api.log") as process:
        yield process


@pytest.fixture(scope="module", params=["false", "true"], ids=["speech-after-the-turn", "preemptive-tts"])
def preemptive_worker(
    request: pytest.FixtureRequest,
    agent_env: dict,
    preemptive_api: ApiProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[AgentWorker]:
    env = {
        **agent_env,
        "LIVEKIT_AGENT_NAME": AGENT_NAME,
        "MORGANA_BACKEND_URL": preemptive_api.url,
        "PREEMPTIVE_GENERATION": "true",
        "PREEMPTIVE_TTS": request.param,
    }
    worker = AgentWorker(env, tmp_path_factory.mktemp("agent-preemptive") / "agent.log").start()
    yield worker
    worker.stop()


def test_an_early_reply_the_caller_talked_over_is_never_heard_nor_kept(
    preemptive_api: ApiProcess, preemptive_worker: AgentWorker, fake_openai: FakeOpenAIProcess
) -> None:
    fragment, whole = "Book me a flight to um", "Book me a flight to um Paris next Monday"
    fake_openai.queue_transcripts(fragment, "Paris next Monday")

    async def join() -> Caller:
        caller = Caller(preemptive_api.url)
        await caller.join()
        return caller

    caller, paused_at, ended_at = pause_mid_sentence(join, fake_openai)

    chats = [r["messages"] for r in fake_openai.requests() if "messages" in r]
    # The worker did ask for a reply to the fragment while the caller paused (and the model gave it).
    assert any(messages[-1]["content"] == fragment for messages in chats)
    # The caller heard nothing in the pause, and one reply, to the whole sentence.
    assert [t for t, level in caller.heard if paused_at <= t < ended_at and level > 300] == []
    assert caller.agent_texts() == [f"You said: {whole}"]
    # The early turn was taken back before the whole one was sent: the model saw no trace of it...
    final = next(messages for messages in chats if messages[-1]["content"] == whole)
    assert [m["role"] for m in final] == ["system", "user"]
    # ...and the conversation holds the sentence once, answered once.
    assert asyncio.run(caller.history()) == [("user", whole, "voice"), ("assistant", f"You said: {whole}", "voice")]
    assert TOOK_BACK in preemptive_worker.log()
    # Speech for the early reply is made before the turn ends only with PREEMPTIVE_TTS.
    spoken = [r["input"] for r in fake_openai.audio_requests("speech")]
    assert (f"You said: {fragment}" in spoken) == (preemptive_worker.env["PREEMPTIVE_TTS"] == "true")


def test_an_early_reply_the_caller_waits_for_is_spoken_and_kept_once(
    preemptive_api: ApiProcess, preemptive_worker: AgentWorker, fake_openai: FakeOpenAIProcess
) -> None:
    fake_openai.queue_transcripts("What time is it")
    taken_back_before = preemptive_worker.log().count(TOOK_BACK)
    question = speech_pcm(fake_openai.root_url, OPENAI_KEY, FINISHED)

    async def call() -> Caller:
        caller = Caller(preemptive_api.url)
        await caller.join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            spoke_until = await caller.say(question, trailing_silence_s=0.5)
            await eventually_async(lambda: caller.first_audio_after(spoke_until) is not None, 30, what="a reply")
            await eventually_async(caller.agent_texts, 15, what="the reply's transcript")
            await caller.silence(2.0)
        finally:
            await caller.leave()
        return caller

    caller = asyncio.run(call())
    assert caller.agent_texts() == ["You said: What time is it"]
    assert asyncio.run(caller.history()) == [
        ("user", "What time is it", "voice"),
        ("assistant", "You said: What time is it", "voice"),
    ]
    # The early reply was the one spoken: nothing was taken back.
    assert preemptive_worker.log().count(TOOK_BACK) == taken_back_before
