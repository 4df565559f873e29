"""The model's streamed text deltas merged where they arrive together (morgana.api.services.model_stream)."""

import asyncio
import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx2
import openai
import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_openai import ChatOpenAI

from morgana.api.config import ApiSettings
from morgana.api.services.chat import ChatAgent, ChatFailure
from morgana.api.services.model_client import HistoryChatOpenAI, PlainCompletions, _plain_reply_as_chat_message
from morgana.api.services.model_stream import MergingHttpClient, MergingStream, merge_events
from morgana.api.services.utterance import Utterance
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import free_port
from tests.conftest import OPENAI_KEY


def chunk(delta: dict, *, id: str = "c1", finish: str | None = None, usage: dict | None = None, index: int = 0) -> dict:
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }


def sse(*events: dict | str) -> bytes:
    return b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n" for e in events
    )


def parsed(data: bytes) -> list[dict | str]:
    out: list[dict | str] = []
    for event in data.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: ")
        body = event[6:].decode()
        out.append(body if body == "[DONE]" else json.loads(body))
    return out


def test_consecutive_text_deltas_become_one_and_everything_else_passes_as_it_came() -> None:
    role = chunk({"role": "assistant", "content": ""})
    finish = chunk({}, finish="stop")
    usage = {**chunk({}), "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
    data = sse(
        role, chunk({"content": "Hel"}), chunk({"content": "lo"}), chunk({"content": "!"}), finish, usage, "[DONE]"
    )
    events = parsed(merge_events(data))
    assert events == [role, chunk({"content": "Hello!"}), finish, usage, "[DONE]"]


def test_tool_calls_other_completions_or_choices_and_deltas_with_more_than_text_are_not_merged() -> None:
    tool = chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]})
    refusal = chunk({"content": "a", "refusal": "no"})
    data = sse(
        chunk({"content": "a"}),
        tool,
        chunk({"content": "b"}),
        chunk({"content": "c"}, id="c2"),
        chunk({"content": "other choice"}, id="c2", index=1),
        refusal,
        chunk({"content": "d", "role": None, "refusal": None}),
        chunk({"content": "e"}),
    )
    events = parsed(merge_events(data))
    assert events == [
        chunk({"content": "a"}),
        tool,
        chunk({"content": "b"}),
        chunk({"content": "c"}, id="c2"),
        chunk({"content": "other choice"}, id="c2", index=1),
        refusal,
        chunk({"content": "de", "role": None, "refusal": None}),
    ]


class Reads(httpx2.AsyncByteStream):
    """A response body that arrives in the given reads."""

    def __init__(self, reads: Iterable[bytes]) -> None:
        self.reads, self.closed = list(reads), False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for data in self.reads:
            yield data

    async def aclose(self) -> None:
        self.closed = True


async def collect(stream: MergingStream) -> list[bytes]:
    return [data async for data in stream]


def test_only_what_arrives_in_one_read_is_merged_and_split_events_are_completed_first() -> None:
    first, second = sse(chunk({"content": "a"}), chunk({"content": "b"})), sse(chunk({"content": "c"}))
    cut = len(first) - 7  # the second event of the first read arrives partly in the next one
    upstream = Reads([first[:cut], first[cut:] + second[:10], second[10:]])
    reads = asyncio.run(collect(MergingStream(upstream)))
    assert [parsed(data) for data in reads] == [
        [chunk({"content": "a"})],
        [chunk({"content": "b"})],
        [chunk({"content": "c"})],
    ]
    upstream = Reads([first + second, first + second])
    assert [parsed(data) for data in asyncio.run(collect(MergingStream(upstream)))] == [
        [chunk({"content": "a"})],  # the reply's first text: passed on before the rest is looked at
        [chunk({"content": "bc"})],
        [chunk({"content": "abc"})],
    ]


def test_the_first_text_of_a_burst_is_passed_on_before_the_rest_is_merged() -> None:
    role = chunk({"role": "assistant", "content": ""})
    texts = [chunk({"content": word}) for word in ("One", " two", " three")]
    finish = chunk({}, finish="stop")
    reads = asyncio.run(collect(MergingStream(Reads([sse(role, *texts, finish, "[DONE]")]))))
    assert [parsed(data) for data in reads] == [
        [role, texts[0]],
        [chunk({"content": " two three"}), finish, "[DONE]"],
    ]
    # No text yet (the role chunk alone, an empty delta): nothing is split off until one comes.
    empty = chunk({"content": ""})
    reads = asyncio.run(collect(MergingStream(Reads([sse(role), sse(empty, *texts)]))))
    assert [parsed(data) for data in reads] == [[role], [empty, texts[0]], [chunk({"content": " two three"})]]


def test_a_delta_with_nothing_to_merge_with_passes_byte_for_byte() -> None:
    data = b'data: {"id":"c1", "object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    assert merge_events(data) == data


def test_a_stream_with_crlf_line_ends_passes_through_byte_for_byte() -> None:
    data = sse(chunk({"content": "a"}), chunk({"content": "b"})).replace(b"\n", b"\r\n")
    assert b"".join(asyncio.run(collect(MergingStream(Reads([data[:30], data[30:]]))))) == data


def test_closing_the_stream_closes_the_upstream() -> None:
    upstream = Reads([])
    asyncio.run(MergingStream(upstream).aclose())
    assert upstream.closed


def test_the_real_sdk_reads_the_same_text_from_a_burst(fake_openai: FakeOpenAIProcess) -> None:
    fake_openai.set_scenario(tokens=300)

    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url=fake_openai.base_url, http_client=MergingHttpClient())
        raw = openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url=fake_openai.base_url)
        try:
            request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            stream = await client.chat.completions.create(**request, stream=True)
            texts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            whole = await raw.chat.completions.create(**request)
            return "".join(texts), whole.choices[0].message.content or ""
        finally:
            await client.close()
            await raw.close()

    text, unstreamed = asyncio.run(run())
    assert text == unstreamed and len(text.split()) == 300


def test_errors_and_unstreamed_replies_reach_the_sdk_unchanged(fake_openai: FakeOpenAIProcess) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(
            api_key=OPENAI_KEY, base_url=fake_openai.base_url, http_client=MergingHttpClient(), max_retries=0
        )
        try:
            request = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            fake_openai.set_scenario(reply="All at once.")
            whole = await client.chat.completions.create(**request)
            assert whole.choices[0].message.content == "All at once."
            fake_openai.set_scenario(status=429)
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(**request, stream=True)
        finally:
            await client.close()

    asyncio.run(run())


def test_a_model_that_cannot_be_reached_is_unavailable_and_one_that_stalls_timed_out(
    fake_openai: FakeOpenAIProcess,
) -> None:
    """The aiohttp transport reports a refused connection as a connect timeout; clients must be
    told the model is unavailable, not that it was slow. A model that stalls is a timeout."""
    fake_openai.set_scenario(stall_after=0)

    async def outcome(base_url: str) -> str:
        settings = ApiSettings(
            openai_api_key=OPENAI_KEY,
            openai_base_url=base_url,
            jwt_secret_key="x" * 40,
            llm_max_retries=0,
            llm_timeout_seconds=0.5,
        )
        agent = ChatAgent(settings)
        try:
            async for _ in agent.stream([Utterance("user", "hi")]):
                pass
        except ChatFailure as failure:
            return failure.code
        finally:
            await agent.aclose()
        return "replied"

    assert asyncio.run(outcome(f"http://127.0.0.1:{free_port()}/v1")) == "llm_unavailable"
    assert asyncio.run(outcome(fake_openai.base_url)) == "llm_timeout"


def test_plain_completions_send_what_the_sdk_sends_and_read_what_it_reads(fake_openai: FakeOpenAIProcess) -> None:
    """PlainCompletions skips the SDK's request transform: the same payload must reach the model.
    And it streams each chunk as the decoded JSON the model sent (what langchain-openai turns the
    SDK's pydantic chunks back into), not as a pydantic model."""
    payload = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "You said: first"},
            {"role": "user", "content": "second"},
        ],
        "temperature": 0.7,
        "max_tokens": 64,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def run() -> tuple[list[Any], list[Any]]:
        stock = openai.AsyncOpenAI(api_key=OPENAI_KEY, base_url=fake_openai.base_url)
        plain = PlainCompletions(stock)
        try:
            by_sdk = [chunk async for chunk in await stock.chat.completions.create(**payload)]
            by_plain = [chunk async for chunk in await plain.create(**payload)]
        finally:
            await stock.close()
        return by_sdk, by_plain

    sdk_chunks, plain_chunks = asyncio.run(run())
    assert all(isinstance(chunk, dict) for chunk in plain_chunks)
    # Two completions: the same chunks but for their ids.
    as_sdk_read = [{**chunk.model_dump(exclude_unset=True), "id": None} for chunk in sdk_chunks]
    assert [{**chunk, "id": None} for chunk in plain_chunks] == as_sdk_read
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in plain_chunks if c["choices"])
    assert text == "You said: second"
    assert plain_chunks[-1]["usage"]["completion_tokens"] > 0
    sent_by_sdk, sent_by_plain = fake_openai.requests()[-2:]
    assert sent_by_plain == sent_by_sdk


def test_the_history_model_builds_the_payload_langchain_openai_builds() -> None:
    """HistoryChatOpenAI converts long plain replies as ChatMessages, to skip langchain-openai's
    per-character scan of an AIMessage's text: the request's payload must be the same, for
    short and long replies, and for replies with more than text (converted as they are)."""
    long_reply = "A reply of some length. " * 40
    tool_call = {"name": "lookup", "args": {"q": "x"}, "id": "call_1", "type": "tool_call"}
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("first"),
        AIMessage("short"),
        HumanMessage("second " * 50),
        AIMessage(long_reply),
        AIMessage(long_reply, name="helper"),
        AIMessage(long_reply, tool_calls=[tool_call]),
        ToolMessage("found", tool_call_id="call_1"),
        AIMessage(long_reply, additional_kwargs={"audio": {"id": "audio_1"}}),
        HumanMessage("third"),
    ]
    options: dict[str, Any] = {"model": "gpt-4o-mini", "api_key": "sk-test", "temperature": 0.7, "max_tokens": 64}
    stock = ChatOpenAI(**options)._get_request_payload(messages, stream=True)
    ours = HistoryChatOpenAI(**options)._get_request_payload(messages, stream=True)
    assert json.dumps(ours) == json.dumps(stock)  # the same keys, in the same order
    assert ours["messages"][4] == {"content": long_reply, "role": "assistant"}
    assert isinstance(_plain_reply_as_chat_message(messages[4]), ChatMessage)
    assert all(_plain_reply_as_chat_message(m) is m for i, m in enumerate(messages) if i != 4)
