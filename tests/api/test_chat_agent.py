"""The chat agent on the real LangGraph graph and ChatOpenAI, against the local model server."""

import asyncio
import gc
from collections.abc import AsyncGenerator

import pytest
from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from morgana.api.config import ApiSettings
from morgana.api.services.chat import ChatAgent, ReplyContext, _in_own_task, _Usage
from morgana.api.services.utterance import Utterance
from morgana_devtools.openai_server import FakeOpenAIProcess
from tests.conftest import OPENAI_KEY


def test_an_open_stream_does_not_hold_the_chunks_it_has_passed_on(fake_openai: FakeOpenAIProcess) -> None:
    """What an open stream holds must not grow with its reply (LangChain's `astream` keeps every
    chunk until the end: about 2.3 KiB per token, for as long as the stream is open)."""
    fake_openai.set_scenario(tokens=60, delay_ms=20)  # paced: one token per read, none merged
    settings = ApiSettings(openai_api_key=OPENAI_KEY, openai_base_url=fake_openai.base_url, jwt_secret_key="x" * 40)

    async def run() -> tuple[int | None, str]:
        agent = ChatAgent(settings)
        pieces: list[str] = []
        held = None
        try:
            async for piece in agent.stream([Utterance("user", "hi")]):
                pieces.append(piece)
                if held is None and len("".join(pieces).split()) >= 50:
                    gc.collect()
                    held = sum(isinstance(o, (ChatGenerationChunk, AIMessageChunk)) for o in gc.get_objects())
        finally:
            await agent.aclose()
        return held, "".join(pieces)

    held, text = asyncio.run(run())
    assert len(text.split()) == 60
    assert held is not None and held < 10, f"{held} chunks held 50 tokens into the reply"


def test_a_coalesced_reply_comes_in_fewer_pieces_the_first_never_held(fake_openai: FakeOpenAIProcess) -> None:
    """Tokens arriving one read at a time, 5 ms apart: with a 50 ms window the same text comes in
    far fewer pieces, and the first piece is sent as it came (held, it would carry ~10 tokens)."""
    fake_openai.set_scenario(tokens=40, delay_ms=5)
    settings = ApiSettings(
        openai_api_key=OPENAI_KEY,
        openai_base_url=fake_openai.base_url,
        jwt_secret_key="x" * 40,
        chat_stream_coalesce_seconds=0.05,
    )

    async def run() -> tuple[list[str], list[str]]:
        agent = ChatAgent(settings)
        try:
            as_they_come = [piece async for piece in agent.stream([Utterance("user", "hi")])]
            coalesced = [piece async for piece in agent.stream([Utterance("user", "hi")], coalesce=True)]
        finally:
            await agent.aclose()
        return as_they_come, coalesced

    as_they_come, coalesced = asyncio.run(run())
    assert "".join(coalesced) == "".join(as_they_come)
    assert len("".join(coalesced).split()) == 40
    assert len(coalesced[0].split()) <= 3, coalesced[0]  # a busy machine may read two tokens at once
    assert len(coalesced) < len(as_they_come) / 2, (len(coalesced), len(as_they_come))


def test_a_reply_that_arrives_in_one_burst_starts_with_its_first_token_alone(fake_openai: FakeOpenAIProcess) -> None:
    """200 tokens with no delay (a fast model; mostly one network read): the first piece is the
    first token alone, not the whole burst merged (model_stream passes the first text on first)."""
    fake_openai.set_scenario(tokens=200, delay_ms=0)
    settings = ApiSettings(openai_api_key=OPENAI_KEY, openai_base_url=fake_openai.base_url, jwt_secret_key="x" * 40)

    async def run() -> list[str]:
        agent = ChatAgent(settings)
        try:
            return [piece async for piece in agent.stream([Utterance("user", "hi")])]
        finally:
            await agent.aclose()

    pieces = asyncio.run(run())
    assert len("".join(pieces).split()) == 200
    assert len(pieces[0].split()) == 1, pieces[0][:80]
    assert len(pieces) < 20, len(pieces)  # the rest still comes merged, not token by token


def test_the_graph_reads_no_more_of_a_burst_until_its_first_text_is_taken(fake_openai: FakeOpenAIProcess) -> None:
    """The node, LangGraph and the reader are separate tasks: unless the node waits for the first
    text to be taken (`ReplyContext.first_text_sent`), it parses the rest of a burst before the
    reader can send the first text (0.7 ms of a 200-token burst in the API)."""
    fake_openai.set_scenario(tokens=200, delay_ms=0)
    settings = ApiSettings(openai_api_key=OPENAI_KEY, openai_base_url=fake_openai.base_url, jwt_secret_key="x" * 40)

    async def run() -> tuple[str, bool, str]:
        agent = ChatAgent(settings)
        context = ReplyContext(asyncio.get_running_loop().create_future())
        chunks = agent._text_chunks([Utterance("user", "hi")], context, _Usage())
        try:
            first = await anext(chunks)
            rest = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait([rest], timeout=0.3)
            context.text_sent()
            texts = [first, await rest, *[text async for text in chunks]]
        finally:
            await chunks.aclose()
            await agent.aclose()
        return first, not done, "".join(texts)

    first, waited, text = asyncio.run(run())
    assert len(first.split()) == 1
    assert waited, "the rest of the burst came before the first text was taken"
    assert len(text.split()) == 200


async def _pieces(source: AsyncGenerator[str, None], window: float) -> list[str]:
    return [piece async for piece in _in_own_task(source, window)]


def test_the_window_never_holds_the_end_or_a_failure() -> None:
    """Text that comes just before the source ends (or fails) goes out at once, not when a long
    window would end: a turn's last text, and its `done` event, are never delayed."""

    # "second" comes within the window, and is held; the source ends (or fails) while it is.
    async def then_end() -> AsyncGenerator[str, None]:
        yield "first"
        await asyncio.sleep(0.01)
        yield "second"
        await asyncio.sleep(0.05)

    async def then_fail() -> AsyncGenerator[str, None]:
        yield "first"
        await asyncio.sleep(0.01)
        yield "second"
        await asyncio.sleep(0.05)
        raise RuntimeError("the model went away")

    async def run() -> None:
        # An hour's window: waiting for it would fail the 10 s bound below.
        assert await asyncio.wait_for(_pieces(then_end(), 3600), 10) == ["first", "second"]
        pieces: list[str] = []

        async def collect() -> None:
            async for piece in _in_own_task(then_fail(), 3600):
                pieces.append(piece)

        with pytest.raises(RuntimeError, match="went away"):
            await asyncio.wait_for(collect(), 10)
        assert pieces == ["first", "second"]

    asyncio.run(run())


def test_a_silent_source_gets_empty_keepalive_pieces_and_the_same_text() -> None:
    """With a keep-alive interval, each stretch without text longer than it yields empty pieces (the
    route sends them as `: ping` comments); without one, only the text."""

    async def slow() -> AsyncGenerator[str, None]:
        await asyncio.sleep(0.35)
        yield "a"
        await asyncio.sleep(0.35)
        yield "b"

    async def run() -> tuple[list[str], list[str]]:
        with_keepalive = [piece async for piece in _in_own_task(slow(), keepalive=0.1)]
        return with_keepalive, await _pieces(slow(), 0.0)

    with_keepalive, without = asyncio.run(run())
    assert without == ["a", "b"]
    assert [piece for piece in with_keepalive if piece] == ["a", "b"]
    first, second = with_keepalive.index("a"), with_keepalive.index("b")
    assert first >= 1 and second - first >= 2, with_keepalive  # empties before each piece of text
    assert second == len(with_keepalive) - 1  # and none once the source has ended
