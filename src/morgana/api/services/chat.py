"""The LangGraph agent behind chat, and how its failures are reported.

The graph is one node today (system prompt + history -> model) so that tools, memory or
routing can be added as graph nodes without touching the HTTP layer.
"""

import asyncio
import logging
import math
import time
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import cast

import httpx
import openai
from langchain_core.messages import AIMessage, AIMessageChunk, AnyMessage, BaseMessage, HumanMessage, SystemMessage
from langgraph.config import get_stream_writer
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.runtime import Runtime
from opentelemetry import trace

from morgana.api import metrics
from morgana.api.config import ApiSettings
from morgana.api.services.model_client import HistoryChatOpenAI, chat_completions
from morgana.api.services.utterance import Utterance

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


class ChatFailure(Exception):
    """A model call that failed; `code` (llm_<reason>) is stable for clients, `message` is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason)
        self.reason, self.code, self.message = reason, f"llm_{reason}", message


def classify_failure(exc: BaseException) -> ChatFailure:
    """Map a provider/client exception to what the caller is told (never the raw error)."""
    if isinstance(exc, (openai.APITimeoutError, httpx.TimeoutException, TimeoutError)):
        failure = ChatFailure("timeout", "The language model did not respond in time.")
    elif isinstance(exc, openai.RateLimitError):
        failure = ChatFailure("rate_limited", "The language model is rate limited; retry shortly.")
    elif isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        failure = ChatFailure("auth", "The language model rejected the server's credentials.")
    elif isinstance(exc, openai.BadRequestError):
        failure = ChatFailure("bad_request", "The language model rejected the request.")
    elif isinstance(exc, (openai.APIError, httpx.TransportError)):
        failure = ChatFailure("unavailable", "The language model is unavailable.")
    else:
        failure = ChatFailure("other", "The reply failed unexpectedly.")
    metrics.LLM_ERRORS.labels(reason=failure.reason).inc()
    return failure


def to_langchain(messages: Sequence[Utterance]) -> list[AnyMessage]:
    # Each message's place in the conversation is its id: the graph's `add_messages` would give
    # each one a uuid otherwise (0.8 ms for a 200-message history). Ids are not sent to the model.
    return [
        HumanMessage(m.content, id=str(n)) if m.role == "user" else AIMessage(m.content, id=str(n))
        for n, m in enumerate(messages)
    ]


class ChatAgent:
    """Streams a reply to a conversation through a compiled LangGraph graph."""

    def __init__(self, settings: ApiSettings) -> None:
        self._system_prompt = SystemMessage(settings.system_prompt)
        self._coalesce_seconds = settings.chat_stream_coalesce_seconds
        self._model_name = settings.llm_model
        self._silence_limit = settings.llm_timeout_seconds
        # Its own OpenAI client: no per-message transform of requests, and the reply's text
        # deltas that arrive together merged before they are parsed (model_client).
        self._client, completions = chat_completions(settings)
        self._llm = HistoryChatOpenAI(
            model=settings.llm_model,
            api_key=settings.openai_api_key,
            base_url=settings.openai_base_url,
            temperature=settings.llm_temperature,
            max_tokens=settings.llm_max_tokens,
            timeout=settings.llm_timeout_seconds,
            max_retries=settings.llm_max_retries,
            streaming=True,
            stream_usage=True,
            # The longest wait for text is bounded by the reply's reader (`_in_own_task`'s
            # `silence`): langchain-openai's own bound wraps each chunk's read in a task of its own.
            stream_chunk_timeout=None,
            root_async_client=self._client,
            async_client=completions,
        )
        graph = StateGraph(MessagesState, context_schema=ReplyContext)
        graph.add_node("respond", self._respond)
        graph.add_edge(START, "respond")
        graph.add_edge("respond", END)
        self._graph = graph.compile()

    async def aclose(self) -> None:
        await self._client.close()

    async def _respond(self, state: MessagesState, runtime: Runtime["ReplyContext"]) -> dict[str, list[BaseMessage]]:
        # The node streams its text itself (LangGraph's "custom" stream mode): the callback-driven
        # "messages" mode costs a handler call and a message-chunk merge per token.
        # It reads ChatOpenAI's provider stream (`_astream`, what `astream` wraps) because `astream`
        # keeps every chunk until the reply ends, to merge them for its callbacks: about 2.3 KiB per
        # token, 627 KiB vs 177 KiB per open 200-token stream in a burst of 300. The cost: no
        # LangChain callbacks (LangSmith runs) for the model call; the graph's own run still has them.
        write = get_stream_writer()
        texts: list[str] = []
        async for generation in self._llm._astream([self._system_prompt, *state["messages"]]):
            chunk = cast(AIMessageChunk, generation.message)
            if chunk.usage_metadata:
                write(_OutputTokens(chunk.usage_metadata.get("output_tokens", 0)))
            text = chunk.content if isinstance(chunk.content, str) else chunk.text
            if text:
                texts.append(text)
                write(text)
                if len(texts) == 1:
                    # The rest of a burst waits until the first text is sent (see ReplyContext).
                    await runtime.context.first_text_sent
        return {"messages": [AIMessage("".join(texts))]}

    async def stream(
        self, conversation: Sequence[Utterance], *, coalesce: bool = False, keepalive: float | None = None
    ) -> AsyncGenerator[str, None]:
        """Yield the reply's text as it arrives; raise ChatFailure if the model fails. With
        `coalesce`, text that arrives within CHAT_STREAM_COALESCE_SECONDS of the last piece is
        yielded together (the first piece is never held). With `keepalive` (seconds), an empty
        piece comes after that long without text: the reply is still on its way. A model that
        sends no text for LLM_TIMEOUT_SECONDS (keep-alive comments or not) fails with llm_timeout.

        Closing or cancelling this generator (a client that went away) cancels the model call.
        """
        window = self._coalesce_seconds if coalesce else 0.0
        context = ReplyContext(asyncio.get_running_loop().create_future())
        started = time.perf_counter()
        first_token_at: float | None = None
        usage = _Usage()
        # Started, not made current: this generator yields to its reader, which would then run
        # inside the span (and detach it from another context).
        span = tracer.start_span("llm.chat", attributes={"gen_ai.request.model": self._model_name})
        try:
            # aclosing: when this generator is closed at its yield (a client gone while its
            # last event was being sent), the model call is cancelled now, not at GC.
            pieces = _in_own_task(
                self._text_chunks(conversation, context, usage), window, keepalive, self._silence_limit
            )
            async with aclosing(pieces) as chunks:
                async for text in chunks:
                    if not text:
                        yield text  # a keep-alive
                        continue
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        metrics.LLM_TIME_TO_FIRST_TOKEN.observe(first_token_at - started)
                    yield text
                    context.text_sent()  # this generator's reader took it and came back
        except Exception as exc:
            failure = classify_failure(exc)
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, failure.code)
            log.warning("model call failed", extra={"code": failure.code, "error": type(exc).__name__})
            raise failure from exc
        finally:
            metrics.LLM_TOKENS_STREAMED.inc(usage.tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.tokens)
            if first_token_at is not None:
                span.set_attribute("morgana.llm.time_to_first_token_s", first_token_at - started)
            span.end()
        metrics.LLM_DURATION.observe(time.perf_counter() - started)

    async def _text_chunks(
        self, conversation: Sequence[Utterance], context: "ReplyContext", usage: "_Usage"
    ) -> AsyncGenerator[str, None]:
        # Pregel.astream is an async generator function (typed as returning an AsyncIterator); in
        # "custom" mode it yields what the node wrote: text, and the provider's token count.
        graph_stream = cast(
            AsyncGenerator[str | _OutputTokens, None],
            self._graph.astream({"messages": to_langchain(conversation)}, context=context, stream_mode="custom"),
        )
        async with aclosing(graph_stream):
            async for item in graph_stream:
                if isinstance(item, _OutputTokens):
                    usage.reported = item.count
                else:
                    usage.chunks += 1
                    yield item


@dataclass(frozen=True, slots=True)
class ReplyContext:
    """The graph's run context for one reply.

    `first_text_sent` is set once the reply's first text has been taken by the reader of
    `ChatAgent.stream` (for a chat stream: written to the socket). Until then the node reads no
    more of the model's stream. The node, LangGraph and the pump are separate tasks, so without
    this a reply that arrives in one burst (a fast model, several tokens in one read) is parsed
    whole before the first event is sent: 0.7 ms for 200 tokens.
    """

    first_text_sent: asyncio.Future[None]

    def text_sent(self) -> None:
        if not self.first_text_sent.done():
            self.first_text_sent.set_result(None)


@dataclass(frozen=True, slots=True)
class _OutputTokens:
    """The provider's count of the reply's tokens, written by the node beside the text."""

    count: int


class _Usage:
    """Completion tokens of one call: the provider's count when it reports one, else the pieces of
    text received (a lower bound: tokens that arrived together were merged, see model_stream)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.reported: int | None = None

    @property
    def tokens(self) -> int:
        return self.reported if self.reported is not None else self.chunks


_END = object()


def _wake(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Mailbox:
    """What the pump hands the reader: items in order, and a future while the reader waits.

    asyncio.Queue holds four deques (its getters, putters and items, and its Event's waiters) of
    760 bytes each from the start: 3.5 KiB of every open stream, for one reader and one writer.
    """

    __slots__ = ("_waiter", "_wake_on_text", "ended", "items")

    def __init__(self) -> None:
        self.items: list[object] = []
        self.ended = False
        self._waiter: asyncio.Future[None] | None = None
        self._wake_on_text = True

    def put(self, item: object) -> None:
        self.items.append(item)
        if item is _END:
            self.ended = True
        if self._waiter is not None and (self.ended or self._wake_on_text):
            _wake(self._waiter)

    def take(self) -> list[object]:
        items, self.items = self.items, []
        return items

    async def wait(self, timeout: float | None, *, until_end: bool = False) -> None:
        """Until an item comes (with `until_end`: the source ends), or `timeout` seconds pass."""
        if self.ended or (self.items and not until_end):
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        self._wake_on_text = not until_end
        timer = None if timeout is None else loop.call_later(timeout, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()


async def _in_own_task(
    source: AsyncGenerator[str, None],
    window: float = 0.0,
    keepalive: float | None = None,
    silence: float | None = None,
) -> AsyncGenerator[str, None]:
    """Iterate `source` in a task of its own, cancelled as soon as this generator stops, and yield
    its text in as few pieces as keeps it flowing.

    Starlette streams run under anyio cancel scopes, whose repeated cancellation can cut
    LangGraph's own clean-up short and leave the model call running. A plain asyncio
    task, cancelled once, shuts the HTTP stream to the model down promptly.

    Each piece joins everything that came while the last one was being sent, so a client (or an
    event loop) slower than the model gets fewer, larger events rather than a backlog of tiny
    ones. With a `window` (seconds), text that comes sooner than that after the last piece waits
    for the window to end, and goes out with whatever else came meanwhile: a model sending one
    token per read then costs an event (its framing, the middleware and a socket write) per
    window rather than per token. The first piece, and the end of the source, are never held.
    With a `keepalive` (seconds), an empty piece is yielded whenever that long passes with nothing
    from the source. With a `silence` limit (seconds), that long without text raises TimeoutError.
    """
    loop = asyncio.get_running_loop()
    box = _Mailbox()

    async def pump() -> None:
        try:
            async with aclosing(source):
                async for item in source:
                    box.put(item)
        except Exception as exc:
            box.put(exc)
        box.put(_END)

    task = loop.create_task(pump())
    last_sent = -math.inf
    last_heard = last_out = loop.time()
    try:
        while True:
            deadline = min(
                last_out + keepalive if keepalive else math.inf, last_heard + silence if silence else math.inf
            )
            await box.wait(None if deadline == math.inf else deadline - loop.time())
            if not box.items:
                now = loop.time()
                if silence and now >= last_heard + silence:
                    raise TimeoutError(f"no text from the model for {silence:g} s")
                if keepalive and now >= last_out + keepalive:
                    yield ""  # the reply is still on its way
                    last_out = loop.time()
                continue
            last_heard = loop.time()
            held = last_sent + window - last_heard
            if held > 0:
                # Until the window ends, or at once when the source does.
                await box.wait(held, until_end=True)
            pieces: list[str] = []
            ending: object = None
            for item in box.take():
                if item is _END or isinstance(item, Exception):
                    ending = item  # after the text before it
                    break
                pieces.append(cast(str, item))  # pump() puts the source's str items, an exception or _END
            if pieces:
                yield "".join(pieces)
                last_sent = last_out = last_heard = loop.time()
            if ending is _END:
                return
            if isinstance(ending, Exception):
                raise ending
    finally:
        task.cancel()
