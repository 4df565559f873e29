"""Tests for the fake OpenAI server, driven through the real ``openai`` SDK and ChatOpenAI."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import SecretStr

from morgana_devtools.openai_server import FakeOpenAIProcess, Scenario, parse_directive, tokenize
from morgana_devtools.services import eventually

API_KEY = "sk-test-fake-openai-key"
MODEL = "gpt-fake"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(api_key=API_KEY, model=MODEL) as process:
        yield process


@pytest.fixture(autouse=True)
def _clean(fake: FakeOpenAIProcess) -> None:
    fake.reset()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def client(fake: FakeOpenAIProcess, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=API_KEY, max_retries=0, **kwargs)


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def stream(c: openai.OpenAI, text: str, **kwargs: Any) -> Any:
    return c.chat.completions.create(model=MODEL, messages=user(text), stream=True, **kwargs)


def drain(response: Any, received: list[str]) -> None:
    """Iterate a chat stream, collecting non-empty content deltas (even if it later raises)."""
    for chunk in response:
        if chunk.choices and chunk.choices[0].delta.content:
            received.append(chunk.choices[0].delta.content)


def last_outcome(fake: FakeOpenAIProcess) -> str:
    return str(fake.requests()[-1]["outcome"])


def raw_post(fake: FakeOpenAIProcess, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        fake.root_url + path,
        data=body,
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --------------------------------------------------------------------------- pure helpers


def test_tokenize_round_trips_whitespace() -> None:
    text = "  You said:\n\n héllo,  world  "
    tokens = tokenize(text)
    assert "".join(tokens) == text
    assert tokens[1] == " said:"


def test_parse_directive() -> None:
    scenario, rest = parse_directive("hello [[fake tokens=3 delay_ms=1.5 reply=hi fail_mode=abort]] there")
    assert scenario == Scenario(tokens=3, delay_ms=1.5, reply="hi", fail_mode="abort")
    assert rest == "hello  there"
    assert parse_directive("no directive") == (None, "no directive")


# --------------------------------------------------------------------------- happy paths


def test_models_list(fake: FakeOpenAIProcess) -> None:
    models = client(fake).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].owned_by == "morgana-dev"


def test_streaming_echo_with_usage(fake: FakeOpenAIProcess) -> None:
    text = "hello there,\n  world  "
    chunks = list(stream(client(fake), text, stream_options={"include_usage": True}))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert "".join(content) == "You said: " + text
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(content)
    assert chunks[-1].usage.prompt_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(c.model == MODEL and c.system_fingerprint == "fp_morgana" for c in chunks)

    record = fake.requests()[-1]
    assert record["outcome"] == "completed"
    assert record["stream"] is True
    assert record["stream_options"] == {"include_usage": True}
    assert record["headers_authorization_present"] is True
    assert record["tokens_sent"] == len(content)


def test_stream_without_include_usage_has_no_usage_chunk(fake: FakeOpenAIProcess) -> None:
    chunks = list(stream(client(fake), "hi"))
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def raw_stream_events(fake: FakeOpenAIProcess) -> list[str]:
    """A streamed completion's SSE events as they come over the wire (plain urllib, no SDK)."""
    body = json.dumps({"model": MODEL, "messages": user("hi"), "stream": True}).encode()
    request = urllib.request.Request(
        fake.base_url + "/chat/completions",
        data=body,
        method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        return response.read().decode().split("\n\n")


def test_raw_stream_wire_format(fake: FakeOpenAIProcess) -> None:
    events = raw_stream_events(fake)
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert "usage" not in payloads[0]
    assert payloads[0]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": "", "refusal": None},
        "logprobs": None,
        "finish_reason": None,
    }
    assert payloads[-1]["choices"][0]["delta"] == {}


def test_keepalive_comments_fill_pauses_longer_than_their_interval(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(tokens=3, first_delay_ms=350, delay_ms=50, keepalive_ms=100)
    events = raw_stream_events(fake)
    assert events[:3] == [": keepalive"] * 3  # 350 ms before the first token, one every 100 ms
    assert ": keepalive" not in events[3:]  # the 50 ms pauses are shorter than the interval
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[3:-2]]
    assert len("".join(p["choices"][0]["delta"].get("content") or "" for p in payloads).split()) == 3


def test_non_streaming_response(fake: FakeOpenAIProcess) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": "be brief"}, *user("ping pong")]
    completion = client(fake).chat.completions.create(model="other-model", messages=messages)
    assert completion.object == "chat.completion"
    assert completion.model == "other-model"
    assert completion.system_fingerprint == "fp_morgana"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "You said: ping pong"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 4)
    assert completion.usage.total_tokens == 8
    assert fake.requests()[-1]["outcome"] == "completed"


def test_max_tokens_truncates_with_length(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(tokens=10)
    completion = client(fake).chat.completions.create(model=MODEL, messages=user("x"), max_tokens=3)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3


def test_tokens_scenario_gives_exact_chunk_count(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(tokens=200)
    chunks = list(stream(client(fake), "go"))
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 200
    assert fake.requests()[-1]["tokens_sent"] == 200


def test_reply_scenario(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(reply="Exactly this, please.")
    chunks = list(stream(client(fake), "ignored"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Exactly this, please."


def test_headers_sent_before_first_delay(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(first_delay_ms=800)
    started = time.monotonic()
    response = stream(client(fake), "slow")
    headers_after = time.monotonic() - started
    chunks = list(response)
    total = time.monotonic() - started
    assert headers_after < 0.6
    assert total >= 0.75
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "You said: slow"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("status", "error_type", "message"),
    [
        (429, openai.RateLimitError, "Rate limit reached"),
        (500, openai.InternalServerError, "The server had an error"),
        (503, openai.InternalServerError, "The server is overloaded or not ready yet."),
        (401, openai.AuthenticationError, "Incorrect API key provided"),
    ],
)
def test_status_scenarios_raise_sdk_errors(
    fake: FakeOpenAIProcess, status: int, error_type: type[openai.APIStatusError], message: str, streaming: bool
) -> None:
    fake.queue_scenario(status=status)
    with pytest.raises(error_type) as caught:
        client(fake).chat.completions.create(model=MODEL, messages=user("x"), stream=streaming)
    assert caught.value.status_code == status
    assert message in caught.value.message
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.code == "rate_limit_exceeded"
    assert last_outcome(fake) == "error_status"


def test_wrong_api_key(fake: FakeOpenAIProcess) -> None:
    bad = openai.OpenAI(base_url=fake.base_url, api_key="sk-wrong-key-123456", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.chat.completions.create(model=MODEL, messages=user("x"))
    assert "Incorrect API key provided" in caught.value.message
    assert caught.value.code == "invalid_api_key"


def test_invalid_requests(fake: FakeOpenAIProcess) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client(fake).chat.completions.create(model=MODEL, messages=[])
    assert caught.value.param == "messages"

    status, body = raw_post(fake, "/v1/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"

    status, body = raw_post(fake, "/v1/chat/completions", json.dumps({"model": MODEL}).encode())
    assert (status, body["error"]["param"]) == (400, "messages")

    status, body = raw_post(fake, "/_control/scenario", json.dumps({"bogus": 1}).encode())
    assert status == 400
    assert "bogus" in body["error"]["message"]


def test_unknown_fields_are_tolerated(fake: FakeOpenAIProcess) -> None:
    tool: ChatCompletionToolParam = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
    }
    completion = client(fake).chat.completions.create(
        model=MODEL, messages=user("hi"), temperature=0.2, tools=[tool], user="u1", seed=3
    )
    assert completion.choices[0].message.content == "You said: hi"


def test_fail_after_abort_drops_stream(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(fail_after=3, fail_mode="abort")
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        drain(stream(client(fake), "one two three four five six"), received)
    assert len(received) == 3
    assert last_outcome(fake) == "failed"


def test_fail_after_abort_drops_non_streaming_response(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(fail_after=3, fail_mode="abort")
    with pytest.raises(openai.APIConnectionError):
        client(fake).chat.completions.create(model=MODEL, messages=user("x"))
    assert last_outcome(fake) == "failed"


def test_fail_after_error_event(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(fail_after=2, fail_mode="error_event")
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        drain(stream(client(fake), "one two three four"), received)
    assert "The server had an error" in caught.value.message
    assert len(received) == 2
    assert last_outcome(fake) == "failed"


def test_stall_after_times_out_client(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(stall_after=2)
    received: list[str] = []
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        drain(stream(client(fake, timeout=0.5), "one two three four"), received)
    assert time.monotonic() - started < 3
    assert len(received) == 2
    eventually(lambda: last_outcome(fake) == "client_disconnected", 3, interval=0.05, what="client_disconnected")
    assert fake.stats()["open_streams"] == 0


# --------------------------------------------------------------------------- disconnects


def test_client_closing_stream_is_recorded(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(tokens=100, delay_ms=50)
    response = stream(client(fake), "x")
    iterator = iter(response)
    for _ in range(3):
        next(iterator)
    assert fake.stats()["open_streams"] == 1
    response.close()
    eventually(lambda: last_outcome(fake) == "client_disconnected", 3, interval=0.05, what="client_disconnected")
    stats = fake.stats()
    assert stats["client_disconnected"] == 1
    assert stats["open_streams"] == 0
    assert 0 < fake.requests()[-1]["tokens_sent"] < 100


def test_disconnect_detected_during_first_delay(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(first_delay_ms=60_000)
    response = stream(client(fake), "x")
    response.close()
    eventually(lambda: last_outcome(fake) == "client_disconnected", 3, interval=0.05, what="client_disconnected")


def test_disconnect_detected_for_non_streaming_request(fake: FakeOpenAIProcess) -> None:
    fake.queue_scenario(first_delay_ms=60_000)
    with pytest.raises(openai.APITimeoutError):
        client(fake, timeout=0.3).chat.completions.create(model=MODEL, messages=user("x"))
    eventually(lambda: last_outcome(fake) == "client_disconnected", 3, interval=0.05, what="client_disconnected")


# --------------------------------------------------------------------------- scenario selection


def test_scenario_priority(fake: FakeOpenAIProcess) -> None:
    c = client(fake)

    def reply(text: str) -> str:
        completion = c.chat.completions.create(model=MODEL, messages=user(text))
        return completion.choices[0].message.content or ""

    fake.set_scenario(reply="sticky")
    fake.queue_scenario(reply="queued")
    assert reply("hey [[fake reply=directive]]") == "directive"
    assert reply("hey") == "queued"
    assert reply("hey") == "sticky"
    assert reply("hey") == "sticky"
    fake.set_scenario()
    assert reply("hey [[fake delay_ms=1]]") == "You said: hey"
    fake.set_scenario(reply="again")
    fake.reset()
    assert reply("hey") == "You said: hey"
    assert fake.stats()["requests"] == 1


# --------------------------------------------------------------------------- async clients


@pytest.mark.anyio
async def test_chat_openai_astream(fake: FakeOpenAIProcess) -> None:
    llm = ChatOpenAI(model=MODEL, base_url=fake.base_url, api_key=SecretStr(API_KEY), streaming=True, max_retries=0)
    chunks = [chunk async for chunk in llm.astream("tell me something nice")]
    texts = [c.text for c in chunks if c.text]
    assert len(texts) == 6
    assert "".join(texts) == "You said: tell me something nice"
    message = await llm.ainvoke("again please")
    assert message.content == "You said: again please"


@pytest.mark.anyio
async def test_many_concurrent_streams(fake: FakeOpenAIProcess) -> None:
    fake.set_scenario(tokens=200)
    c = openai.AsyncOpenAI(base_url=fake.base_url, api_key=API_KEY, max_retries=0)

    async def one() -> int:
        response = await c.chat.completions.create(model=MODEL, messages=user("x"), stream=True)
        return len([c async for c in response if c.choices and c.choices[0].delta.content])

    counts = await asyncio.gather(*(one() for _ in range(100)))
    await c.close()
    assert counts == [200] * 100
    stats = fake.stats()
    assert (stats["completed"], stats["open_streams"]) == (100, 0)
