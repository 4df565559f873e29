"""One chat turn end to end: history in, model reply out, the whole turn stored.

A turn is stored only once the reply is complete, in one transaction, and before the
final `done: true` event: a client that saw `done` can rely on the history holding it.
"""

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sse_starlette import ServerSentEvent

from morgana.api import metrics
from morgana.api.schemas import Message
from morgana.api.services import history
from morgana.api.services.chat import ChatAgent, ChatFailure

log = logging.getLogger(__name__)


class HistoryUnavailable(Exception):
    """The turn's history could not be read or written."""


class Conversation:
    def __init__(
        self,
        agent: ChatAgent,
        session_factory: async_sessionmaker[AsyncSession],
        session_id: uuid.UUID,
        context_limit: int,
    ) -> None:
        self._agent = agent
        self._session_factory = session_factory
        self._session_id = session_id
        self._context_limit = context_limit

    async def context_for(self, new_messages: Sequence[Message]) -> list[Message]:
        """What the model sees: the stored history, then the new messages."""
        async with self._session_factory() as db:
            stored = await history.recent(db, self._session_id, self._context_limit)
        return [Message(role=m.role, content=m.content) for m in stored] + list(new_messages)

    async def reply(self, new_messages: Sequence[Message]) -> Message:
        """Run a turn to completion and store it (the non-streaming endpoint)."""
        context = await self.context_for(new_messages)
        async with aclosing(self._agent.stream(context)) as reply_parts:
            parts = [part async for part in reply_parts]
        answer = Message.model_construct(role="assistant", content="".join(parts))
        await self._store(new_messages, answer)
        metrics.CHAT_TURNS.labels(outcome="completed", transport="json").inc()
        return answer

    async def stream_events(
        self, context: Sequence[Message], new_messages: Sequence[Message]
    ) -> AsyncIterator[ServerSentEvent]:
        """The SSE events of one turn; the last one always has `done: true`."""
        metrics.CHAT_STREAMS_OPEN.inc()
        parts: list[str] = []
        outcome = "error"
        try:
            # aclosing: a client that goes away closes the model stream now, not at GC.
            async with aclosing(self._agent.stream(context)) as reply_parts:
                async for part in reply_parts:
                    parts.append(part)
                    yield _event(part, done=False)
            await self._store(
                new_messages, Message.model_construct(role="assistant", content="".join(parts))
            )
            outcome = "completed"
            yield _event("", done=True)
        except ChatFailure as failure:
            yield _event("", done=True, error=failure.as_event_error())
        except HistoryUnavailable:
            yield _event(
                "",
                done=True,
                error={
                    "code": "history_unavailable",
                    "message": "The reply could not be saved to the history; please retry.",
                },
            )
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.CHAT_STREAMS_OPEN.dec()
            metrics.CHAT_TURNS.labels(outcome=outcome, transport="stream").inc()

    async def _store(self, new_messages: Sequence[Message], answer: Message) -> None:
        try:
            async with self._session_factory() as db:
                await history.append_turn(db, self._session_id, [*new_messages, answer])
        except Exception as exc:
            log.error("could not store a completed turn", extra={"session_id": str(self._session_id)},
                      exc_info=True)
            raise HistoryUnavailable() from exc


def _event(content: str, *, done: bool, error: dict | None = None) -> ServerSentEvent:
    payload: dict = {"content": content, "done": done}
    if error is not None:
        payload["error"] = error
    return ServerSentEvent(
        data=json.dumps(payload, ensure_ascii=False), event="error" if error else None
    )
