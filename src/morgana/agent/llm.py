"""The Morgana API as the voice pipeline's LLM.

A `livekit.agents.llm.LLM` whose stream reads the API's Server-Sent Events, so the framework's
turn handling, interruptions, metrics and transcripts apply unchanged. History lives in the API
(the caller's own chat session), so each turn sends only the caller's newest words.

A reply can be prepared before the caller's turn is over (preemptive generation) and then
dropped unheard when they go on speaking. The API stores a turn as soon as its reply is whole,
so each turn carries an id, and a dropped one is taken back (`UnheardTurns`) before the next is
sent: the conversation holds only replies the caller heard, and each of their words once.
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
from livekit.agents.voice import SpeechHandle

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


def current_speech() -> SpeechHandle | None:
    """The speech an LLM call is answering for, when it runs inside an AgentSession's reply.

    livekit-agents keeps it in a private context variable (function tools get it as
    `RunContext.speech_handle`); tests/agent/test_preemptive.py fails if that changes.
    """
    from livekit.agents.voice.agent_activity import _SpeechHandleContextVar

    return _SpeechHandleContextVar.get(None)


class UnheardTurns:
    """Turns sent to the API whose speech may still be dropped before the caller hears any of it.

    A turn whose speech was scheduled (played, even if then interrupted) stays in the history. One
    dropped unscheduled (a preemptive reply the caller talked over, a reply interrupted while still
    queued) is taken back with `DELETE /chatbot/turns/{id}`, whether the API stored it already or
    is still running it.
    """

    # The next turn waits this long at most for the withdrawals before it: an API that slow would
    # keep the caller waiting anyway, and a turn answered beside a stale reply beats silence.
    WAIT_SECONDS = 5.0

    def __init__(self, api: MorganaApi) -> None:
        self._api = api
        self._open: dict[str, tuple[SpeechHandle, ChatSession]] = {}
        self._withdrawals: set[asyncio.Task[None]] = set()

    def sent(self, turn_id: str, speech: SpeechHandle, session: ChatSession) -> None:
        self._open[turn_id] = (speech, session)
        speech.add_done_callback(lambda _: self._review(turn_id))

    async def settle(self) -> None:
        """Take back every turn dropped so far; the next turn is sent after, so that the history
        it is answered from does not hold them."""
        for turn_id in list(self._open):
            self._review(turn_id)
        if self._withdrawals:
            await asyncio.wait(set(self._withdrawals), timeout=self.WAIT_SECONDS)

    def _review(self, turn_id: str) -> None:
        entry = self._open.get(turn_id)
        if entry is None:
            return
        speech, session = entry
        if speech.scheduled:
            del self._open[turn_id]
        elif speech.interrupted or speech.done():
            del self._open[turn_id]
            task = asyncio.create_task(self._withdraw(session, turn_id))
            self._withdrawals.add(task)
            task.add_done_callback(self._withdrawals.discard)

    async def _withdraw(self, session: ChatSession, turn_id: str) -> None:
        try:
            deleted = await self._api.withdraw_turn(session, turn_id)
        except ApiError as exc:
            metrics.API_ERRORS.labels(kind=_error_kind(exc)).inc()
            log.warning("could not take back an unheard reply", extra={"turn_id": turn_id, "error": str(exc)})
            return
        metrics.TURNS_WITHDRAWN.inc()
        log.info("took back a reply the caller never heard", extra={"turn_id": turn_id, "deleted": deleted})


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
        self.unheard = UnheardTurns(api)

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
        await owner.unheard.settle()
        # One id for every attempt: the API stores the turn at most once.
        turn_id = str(uuid.uuid4())
        speech = current_speech()
        sent_any = False
        for attempt in range(owner._retries + 1):
            started = time.perf_counter()
            try:
                session = await owner.session()
                if speech is not None:
                    owner.unheard.sent(turn_id, speech, session)
                    speech = None  # tracked once, whatever the attempts
                async with aclosing(owner._api.stream_reply(session, text, turn_id)) as reply:
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
