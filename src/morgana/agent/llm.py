"""The Morgana API as the voice pipeline's LLM.

A `livekit.agents.llm.LLM` whose stream reads the API's Server-Sent Events, so the framework's
turn handling, interruptions, metrics and transcripts apply unchanged. History lives in the API
(the caller's own chat session), so each turn sends only the caller's newest words.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, Never

from livekit.agents import APIConnectOptions, llm
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, NOT_GIVEN, NotGivenOr

from morgana.agent import metrics
from morgana.agent.api_client import ApiError, ChatSession, MorganaApi

log = logging.getLogger(__name__)


def newest_user_text(chat_ctx: llm.ChatContext) -> str:
    """The caller's words since the agent last spoke, oldest first."""
    parts: list[str] = []
    for message in reversed(chat_ctx.messages()):
        if message.role == "assistant":
            break
        if message.role == "user" and (text := message.text_content):
            parts.append(text)
    return "\n".join(reversed(parts)).strip()


class MorganaLLM(llm.LLM[Never]):  # no events beyond the base LLM's
    def __init__(
        self,
        api: MorganaApi,
        open_session: Callable[[], Awaitable[ChatSession]],
        session: ChatSession | None,
        *,
        retries: int,
        backoff: float,
        apology: str,
    ) -> None:
        super().__init__()
        self._api = api
        self._open_session = open_session
        # None when the API was down as the caller joined: opened at the first turn instead.
        self._session = session
        self._session_lock = asyncio.Lock()
        self._retries = retries
        self._backoff = backoff
        self._apology = apology

    async def session(self) -> ChatSession:
        async with self._session_lock:
            if self._session is None:
                self._session = await self._open_session()
            return self._session

    @property
    def model(self) -> str:
        return "morgana-api"

    @property
    def provider(self) -> str:
        return "morgana"

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> "MorganaStream":
        return MorganaStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class MorganaStream(llm.LLMStream):
    _llm: MorganaLLM

    async def _run(self) -> None:
        text = newest_user_text(self._chat_ctx)
        if not text:
            return
        request_id = f"morgana-{uuid.uuid4().hex[:12]}"
        owner = self._llm
        sent_any = False
        for attempt in range(owner._retries + 1):
            started = time.perf_counter()
            try:
                session = await owner.session()
                async with aclosing(owner._api.stream_reply(session, text)) as reply:
                    async for part in reply:
                        if not sent_any:
                            metrics.API_TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - started)
                        sent_any = True
                        self._send(request_id, part)
                return
            except ApiError as exc:
                metrics.API_ERRORS.labels(kind=_error_kind(exc)).inc()
                log.warning("API turn failed", extra={"attempt": attempt + 1, "error": str(exc)})
                # Words already spoken cannot be taken back: no retry after partial output.
                if sent_any or not exc.retryable or attempt == owner._retries:
                    break
                await asyncio.sleep(owner._backoff * 2**attempt)
        metrics.APOLOGIES.inc()
        self._send(request_id, (" " if sent_any else "") + owner._apology)

    def _send(self, request_id: str, text: str) -> None:
        self._event_ch.send_nowait(llm.ChatChunk(id=request_id, delta=llm.ChoiceDelta(role="assistant", content=text)))


def _error_kind(exc: ApiError) -> str:
    if exc.status is None:
        return "unreachable"
    if exc.status == 429:
        return "rate_limited"
    return "server_error" if exc.status >= 500 else "client_error"
