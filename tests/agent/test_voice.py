"""The whole voice path on a real LiveKit server: a caller speaks, the agent answers aloud."""

import asyncio
import time

import pytest

from morgana.agent.worker import INPUT_SAMPLE_RATE
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import eventually_async
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.agent.history import agent_sessions
from tests.conftest import OPENAI_KEY

pytestmark = pytest.mark.timeout(180)


def test_a_caller_is_heard_answered_aloud_and_transcribed(
    voice_api, agent_worker, fake_openai: FakeOpenAIProcess, voice_env: dict
) -> None:
    fake_openai.queue_transcripts("What is the weather like")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "What is the weather like today?")
    agents_own = len(agent_sessions(voice_env))

    async def call() -> Caller:
        caller = Caller(voice_api.url)
        await caller.join()
        try:
            # The agent is dispatched by the token: wait until it is in the room.
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            spoke_until = await caller.say(utterance)
            await eventually_async(
                lambda: caller.first_audio_after(spoke_until) is not None, 30, what="the agent's reply heard"
            )
            await eventually_async(lambda: caller.agent_texts() and caller.user_texts(), 15, what="both transcripts")
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
    # Taken from the room at the 16 kHz that the VAD, the turn detector and speech-to-text use.
    assert transcribed[-1]["sample_rate"] == INPUT_SAMPLE_RATE
    # The turn is in the caller's own conversation, marked as spoken, and not in the agent's account.
    assert asyncio.run(caller.history()) == [
        ("user", "What is the weather like", "voice"),
        ("assistant", "You said: What is the weather like", "voice"),
    ]
    assert len(agent_sessions(voice_env)) == agents_own


def test_two_rooms_at_once_continue_two_conversations(voice_api, agent_worker, fake_openai: FakeOpenAIProcess) -> None:
    fake_openai.queue_transcripts("Caller one here", "Caller two here")
    # No comma: its pause would send the speech to speech-to-text as two requests
    # (STT_VAD_MIN_SILENCE_SECONDS), each answered with the next queued transcript.
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Hello is anybody there?")

    async def one_call(caller: Caller, delay: float) -> None:
        await caller.join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0 + delay)
            spoke_until = await caller.say(utterance)
            await eventually_async(
                lambda: caller.first_audio_after(spoke_until) is not None, 30, what="the agent's reply heard"
            )
            await eventually_async(lambda: caller.agent_texts() and caller.user_texts(), 15, what="both transcripts")
        finally:
            await caller.leave()

    async def both() -> tuple[Caller, Caller]:
        first, second = Caller(voice_api.url), Caller(voice_api.url)
        await asyncio.gather(one_call(first, 0.0), one_call(second, 0.7))
        return first, second

    callers = asyncio.run(both())
    heard = {caller.user_texts()[0] for caller in callers}
    assert heard == {"Caller one here", "Caller two here"}
    for caller in callers:
        assert caller.agent_texts() == [f"You said: {caller.user_texts()[0]}"]
    for caller in callers:
        text = caller.user_texts()[0]
        assert asyncio.run(caller.history()) == [("user", text, "voice"), ("assistant", f"You said: {text}", "voice")]


def test_barge_in_stops_the_reply_and_closes_the_api_stream(
    voice_api, agent_worker, fake_openai: FakeOpenAIProcess
) -> None:
    long_reply = " ".join(f"This is sentence number {n} of a very long answer." for n in range(40))
    fake_openai.queue_scenario(reply=long_reply, delay_ms=120)
    fake_openai.queue_transcripts("Tell me everything", "Stop please")
    question = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Tell me everything you know.")
    # No comma: its pause would send the speech to speech-to-text as two requests
    # (STT_VAD_MIN_SILENCE_SECONDS), each answered with the next queued transcript.
    interruption = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Stop please stop talking now.")

    async def call() -> tuple[Caller, float]:
        caller = Caller(voice_api.url)
        await caller.join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            spoke_until = await caller.say(question, trailing_silence_s=0.2)
            await eventually_async(
                lambda: caller.first_audio_after(spoke_until) is not None, 30, what="the long answer heard"
            )
            await caller.silence(1.5)  # let the long answer play for a moment
            interrupted_at = await caller.say(interruption, trailing_silence_s=0.2)
            await caller.silence(12.0)
        finally:
            await caller.leave()
        return caller, interrupted_at

    caller, interrupted_at = asyncio.run(call())
    chats = [r for r in fake_openai.requests() if r["messages"][-1]["content"] in ("Tell me everything", "Stop please")]
    first = next(r for r in chats if r["messages"][-1]["content"] == "Tell me everything")
    # The agent closed its API stream, and the API cancelled the model call in turn.
    assert first["outcome"] == "client_disconnected", first
    assert first["tokens_sent"] < len(long_reply.split())
    assert any(r["messages"][-1]["content"] == "Stop please" for r in chats)
    assert "You said: Stop please" in caller.agent_texts()
    # Playback of the long answer stopped: a few seconds after the interruption all is quiet.
    loud = [t for t, level in caller.heard if level > 300 and t > interrupted_at + 8.0]
    assert loud == []


def test_a_failing_api_gets_an_apology_and_the_call_goes_on(
    voice_api, agent_worker, fake_openai: FakeOpenAIProcess, agent_env: dict
) -> None:
    # Both the first try and the one retry fail upstream.
    fake_openai.queue_scenario(status=503)
    fake_openai.queue_scenario(status=503)
    fake_openai.queue_transcripts("First try", "Second try")
    utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Can you hear me?")

    async def call() -> Caller:
        caller = Caller(voice_api.url)
        await caller.join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            spoke_until = await caller.say(utterance)
            await eventually_async(
                lambda: caller.first_audio_after(spoke_until) is not None, 30, what="the apology heard"
            )
            await eventually_async(lambda: len(caller.agent_texts()) >= 1, 15, what="the apology's transcript")
            spoke_until = await caller.say(utterance)
            await eventually_async(lambda: len(caller.agent_texts()) >= 2, 30, what="the second reply's transcript")
        finally:
            await caller.leave()
        return caller

    caller = asyncio.run(call())
    apology = "Sorry, I'm having trouble thinking right now. Please say that again in a moment."
    assert caller.agent_texts() == [apology, "You said: Second try"]


def test_deleting_a_session_closes_its_voice_room(voice_api, agent_worker) -> None:
    """Its caller and its agent are sent away at once: a token handed out for the session is of
    no more use once the session is gone."""
    import httpx
    from livekit import rtc

    from tests.conftest import bearer, new_session, register

    async def call() -> rtc.ConnectionState:
        with httpx.Client(base_url=voice_api.url, timeout=20) as http:
            user_token = register(http)["token"]["access_token"]
            session = new_session(http, user_token)
            grant = http.post(  # noqa: ASYNC212 (before the call starts: nothing else runs on the loop yet)
                "/api/v1/livekit/token", headers=bearer(session["token"]["access_token"])
            ).json()
            caller = Caller(voice_api.url)
            await caller.connect(grant["serverUrl"], grant["participantToken"])
            try:
                await eventually_async(
                    lambda: len(caller.room.remote_participants) > 0,
                    30,
                    what=lambda: f"an agent joined\n{agent_worker.log_tail()}",
                )
                deleted = await asyncio.to_thread(
                    http.delete, f"/api/v1/auth/sessions/{session['session_id']}", headers=bearer(user_token)
                )
                assert deleted.status_code == 204
                await eventually_async(
                    lambda: caller.room.connection_state == rtc.ConnectionState.CONN_DISCONNECTED,
                    10,
                    what="the caller sent away",
                )
                return caller.room.connection_state
            finally:
                await caller.leave()

    assert asyncio.run(call()) == rtc.ConnectionState.CONN_DISCONNECTED


def test_a_call_that_outlasts_its_token_still_counts_against_the_cap(livekit, voice_env: dict) -> None:
    """LIVEKIT_MAX_ROOMS_PER_USER counts a room from its token's grant until the token expires,
    and after that for as long as LiveKit lists someone in it (calls outlive their tokens)."""
    import secrets

    from livekit import api, rtc

    from morgana.api.config import ApiSettings
    from morgana.api.services.livekit import VoiceRooms

    settings = ApiSettings(
        _env_file=None,
        environment="test",
        jwt_secret_key=voice_env["JWT_SECRET_KEY"],
        openai_api_key="unused",
        livekit_url=livekit.url,
        livekit_api_key=livekit.api_key,
        livekit_api_secret=livekit.api_secret,
        livekit_max_rooms_per_user=1,
    )
    now = [1_000_000.0]
    rooms = VoiceRooms(settings, clock=lambda: now[0])
    user, first, second = 4242, f"cap-{secrets.token_hex(4)}-a", f"cap-{secrets.token_hex(4)}-b"

    async def scenario() -> None:
        assert await rooms.admit(user, first)
        assert not await rooms.admit(user, second)  # a token for `first` is still valid
        token = (
            api.AccessToken(livekit.api_key, livekit.api_secret)
            .with_identity("cap-caller")
            .with_grants(api.VideoGrants(room_join=True, room=first))
            .to_jwt()
        )
        room = rtc.Room()
        await room.connect(livekit.url, token)
        try:
            now[0] += settings.livekit_token_ttl_minutes * 60 + 1  # the token expired; the call goes on
            assert not await rooms.admit(user, second)
        finally:
            await room.disconnect()
        # Admitted once LiveKit has seen the caller leave (a refusal records nothing: asking again is free).
        await eventually_async(lambda: rooms.admit(user, second), 10, what="a second room admitted")

    asyncio.run(scenario())


def test_text_typed_during_a_call_is_answered_aloud_and_in_text(
    voice_api, agent_worker, fake_openai: FakeOpenAIProcess
) -> None:
    """LiveKit's chat text stream (`lk.chat`, what the agents playground's chat box sends)."""

    async def call() -> tuple[Caller, float]:
        caller = Caller(voice_api.url)
        await caller.join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            typed_at = time.monotonic()
            await caller.room.local_participant.send_text("Typed while calling", topic="lk.chat")
            await eventually_async(lambda: caller.first_audio_after(typed_at) is not None, 30, what="a spoken reply")
            await eventually_async(caller.agent_texts, 15, what="the reply's text")
            await caller.silence(1.0)
        finally:
            await caller.leave()
        return caller, typed_at

    caller, _ = asyncio.run(call())
    assert caller.agent_texts() == ["You said: Typed while calling"]
    assert asyncio.run(caller.history()) == [
        ("user", "Typed while calling", "voice"),
        ("assistant", "You said: Typed while calling", "voice"),
    ]
