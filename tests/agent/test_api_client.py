"""The agent's view of the API, against the real API: sessions, streamed replies, failures."""

import asyncio
import uuid

import pytest
from livekit.agents import llm

from morgana.agent.api_client import ApiError, MorganaApi
from morgana.agent.llm import newest_user_text
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import free_port
from tests.conftest import STRONG_PASSWORD, register


@pytest.fixture
def account(client) -> str:
    return register(client)["email"]


def run(coro):
    return asyncio.run(coro)


def test_sessions_and_streamed_replies(api, account: str, fake_openai: FakeOpenAIProcess) -> None:
    fake_openai.set_scenario(delay_ms=30)  # tokens that arrive together may share an event

    async def scenario() -> list[str]:
        client = MorganaApi(api.url, account, STRONG_PASSWORD)
        try:
            first, second = await client.create_session(), await client.create_session()
            assert first.session_id != second.session_id
            return [part async for part in client.stream_reply(first, "hello there")]
        finally:
            await client.aclose()

    parts = run(scenario())
    assert "".join(parts) == "You said: hello there"
    assert len(parts) > 1


def test_a_turn_taken_back_mid_reply_ends_quietly_and_is_not_stored(
    api, account: str, fake_openai: FakeOpenAIProcess
) -> None:
    fake_openai.queue_scenario(tokens=20, delay_ms=50)
    early, heard = str(uuid.uuid4()), str(uuid.uuid4())

    async def scenario() -> tuple[list[str], int, int, int]:
        client = MorganaApi(api.url, account, STRONG_PASSWORD)
        try:
            session = await client.create_session()
            parts: list[str] = []
            withdrawn_mid_reply = -1
            async for part in client.stream_reply(session, "an early reply", turn_id=early):
                parts.append(part)
                if withdrawn_mid_reply < 0:
                    withdrawn_mid_reply = await client.withdraw_turn(session, early)
            withdrawn_after = await client.withdraw_turn(session, early)
            [_ async for _ in client.stream_reply(session, "a reply heard", turn_id=heard)]
            return parts, withdrawn_mid_reply, withdrawn_after, await client.withdraw_turn(session, heard)
        finally:
            await client.aclose()

    parts, withdrawn_mid_reply, withdrawn_after, withdrawn_stored = run(scenario())
    # The reply streamed on to its end, then stopped without an error (no ApiError, no apology)...
    assert len(parts) > 10 and withdrawn_mid_reply == 0
    # ...and was never stored: nothing to delete afterwards.
    assert withdrawn_after == 0
    # A stored turn is taken back whole: the caller's words and the reply.
    assert withdrawn_stored == 2


def test_an_expired_user_token_is_renewed_by_logging_in_again(api, account: str) -> None:
    async def scenario() -> str:
        client = MorganaApi(api.url, account, STRONG_PASSWORD)
        try:
            await client.login()
            client._user_token = "expired.or.revoked"
            return (await client.create_session()).session_id
        finally:
            await client.aclose()

    assert run(scenario())


def test_failures_become_api_errors_that_say_whether_to_retry(
    api, account: str, fake_openai: FakeOpenAIProcess
) -> None:
    async def scenario() -> tuple[ApiError, ApiError, ApiError]:
        client = MorganaApi(api.url, account, STRONG_PASSWORD)
        dead = MorganaApi(f"http://127.0.0.1:{free_port()}", account, STRONG_PASSWORD, timeout=2)
        wrong = MorganaApi(api.url, account, "Wrong_Passw0rd!")
        try:
            session = await client.create_session()
            fake_openai.queue_scenario(status=503)
            with pytest.raises(ApiError) as upstream:
                [part async for part in client.stream_reply(session, "fail please")]
            with pytest.raises(ApiError) as unreachable:
                await dead.create_session()
            with pytest.raises(ApiError) as refused:
                await wrong.create_session()
            return upstream.value, unreachable.value, refused.value
        finally:
            for c in (client, dead, wrong):
                await c.aclose()

    upstream, unreachable, refused = run(scenario())
    assert "llm_unavailable" in str(upstream) and upstream.retryable
    assert unreachable.status is None and unreachable.retryable
    assert refused.status == 401 and not refused.retryable


def test_only_the_callers_newest_words_are_sent() -> None:
    ctx = llm.ChatContext()
    ctx.add_message(role="system", content="instructions")
    ctx.add_message(role="user", content="first question")
    ctx.add_message(role="assistant", content="first answer")
    ctx.add_message(role="user", content="second")
    ctx.add_message(role="user", content="question")
    assert newest_user_text(ctx) == "second\nquestion"
    assert newest_user_text(llm.ChatContext()) == ""
