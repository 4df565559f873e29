"""The whole voice path on a real LiveKit server: a caller speaks, the agent answers aloud."""

import asyncio

import psycopg
import pytest

from morgana.devtools.openai_server import FakeOpenAIProcess
from tests.agent.voice_client import Caller, speech_pcm, wait_for
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(180)


def agent_history(database_url: str, email: str) -> list[list[tuple[str, str]]]:
    """Each of the agent account's sessions, as (role, content) turns, oldest session first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            """SELECT s.id, m.role, m.content FROM chat_sessions s
               JOIN users u ON u.id = s.user_id
               LEFT JOIN chat_messages m ON m.session_id = s.id
               WHERE u.email = %s ORDER BY s.created_at, m.id""", (email,)).fetchall()
    sessions: dict = {}
    for session_id, role, content in rows:
        sessions.setdefault(session_id, [])
        if role:
            sessions[session_id].append((role, content))
    return list(sessions.values())


def test_a_caller_is_heard_answered_aloud_and_transcribed(
    voice_api, agent_worker, fake_openai: FakeOpenAIProcess, voice_env: dict
) -> None:
    fake_openai.queue_transcripts("What is the weather like")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "What is the weather like today?")

    async def call() -> Caller:
        caller = Caller(voice_api.url)
        await caller.join()
        try:
            # The agent is dispatched by the token: wait until it is in the room.
            assert await wait_for(lambda: len(caller.room.remote_participants) > 0, 30), "no agent joined"
            await caller.silence(1.0)
            spoke_until = await caller.say(utterance)
            assert await wait_for(lambda: caller.first_audio_after(spoke_until) is not None, 30), \
                "the agent's reply was never heard"
            await wait_for(lambda: caller.agent_texts() and caller.user_texts(), 15)
            await caller.silence(2.0)
        finally:
            await caller.leave()
        return caller

    caller = asyncio.run(call())
    assert caller.user_texts() == ["What is the weather like"]
    assert caller.agent_texts() == ["You said: What is the weather like"]
    # The caller's speech reached speech-to-text as real, non-silent audio.
    transcribed = fake_openai.audio_requests("transcriptions")
    assert transcribed and transcribed[-1]["rms"] > 0.01 and transcribed[-1]["duration"] > 0.5
    # The turn is in the agent's dedicated session for this caller, in the API's history.
    sessions = agent_history(voice_env["DATABASE_URL"], voice_env["API_USER_EMAIL"])
    assert sessions[-1] == [("user", "What is the weather like"),
                            ("assistant", "You said: What is the weather like")]
