"""One chat turn end to end: history in, the model's reply out, the whole turn stored.

A turn is stored only once the reply is complete, in one transaction, and before the stream's
last event (`TurnStored`): a client told the turn is done can rely on the history holding it.
The route turns these typed events into Server-Sent Events or a JSON body; nothing here knows
of HTTP.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from morgana.api import metrics
from morgana.api.security import Channel
from morgana.api.services import history
from morgana.api.services.chat import ChatAgent, ChatFailure
from morgana.api.services.utterance import Utterance

log = logging.getLogger(__name__)


class HistoryUnavailable(Exception):
    """The turn's history could not be read or written."""

    code = "history_unavailable"
    message = "The reply could not be saved to the history; please retry."


class TurnWithdrawn(Exception):
    """The turn's client withdrew it (DELETE /chatbot/turns/{turn_id}) before its reply was
    whole, so the reply was not stored."""

    code = "turn_withdrawn"
    message = "This turn was withdrawn by its client before its reply was complete; it was not stored."


@dataclass(frozen=True, slots=True)
class ReplyText:
    """The next piece of the model's reply."""

    text: str


@dataclass(frozen=True, slots=True)
class StillReplying:
    """No text for a while (the keep-alive interval): the reply is still on its way."""


@dataclass(frozen=True, slots=True)
class TurnStored:
    """The reply is complete and the whole turn is in the history: always the last event."""


@dataclass(frozen=True, slots=True)
class TurnFailed:
    """The turn ended without being stored: the model failed or the history could not take it."""

    code: str
    message: str


TurnEvent = ReplyText | StillReplying | TurnStored | TurnFailed


class Conversation:
    """A chat session's conversation: a turn sends the recent history and the new messages to the
    model and stores the turn once the reply is whole."""

    def __init__(
        self,
        agent: ChatAgent,
        session_factory: async_sessionmaker[AsyncSession],
        session_id: uuid.UUID,
        recent: list[Utterance],
        channel: Channel = Channel.CHAT,
        *,
        spoken: bool = False,
    ) -> None:
        self._agent = agent
        self._session_factory = session_factory
        self._session_id = session_id
        self._recent = recent
        self._channel = channel
        # A spoken reply is not held to be sent in fewer events: its speech waits for each sentence.
        self._coalesce = channel is Channel.CHAT and not spoken

    @property
    def session_id(self) -> uuid.UUID:
        return self._session_id

    def begin(self, said: Sequence[Utterance], turn_id: uuid.UUID | None = None) -> "Turn":
        """Start a turn on the session's recent history (read with the session itself, before any
        reply begins, so a database outage is an error the caller can report). A turn with the
        client's `turn_id` is stored at most once, and not at all once withdrawn."""

        async def store(turn: list[Utterance]) -> None:
            await self.store(turn, turn_id)

        return Turn(self._agent, store, [*self._recent, *said], list(said), coalesce=self._coalesce)

    async def store(self, turn: list[Utterance], turn_id: uuid.UUID | None = None) -> None:
        """Store a whole turn in one transaction; HistoryUnavailable if it cannot be, TurnWithdrawn
        if its client took it back meanwhile."""
        try:
            async with self._session_factory() as db:
                outcome = await history.append_turn(db, self._session_id, turn, self._channel, turn_id)
        except Exception as exc:
            log.error("could not store a completed turn", extra={"session_id": str(self._session_id)}, exc_info=True)
            raise HistoryUnavailable() from exc
        if outcome is history.StoreOutcome.WITHDRAWN:
            raise TurnWithdrawn()


class Turn:
    """One turn, its history already read: run it as a stream of events or to completion."""

    def __init__(
        self,
        agent: ChatAgent,
        store: Callable[[list[Utterance]], Awaitable[None]],
        context: list[Utterance],
        said: list[Utterance],
        *,
        coalesce: bool = False,
    ) -> None:
        self._agent = agent
        self._store = store
        self._context = context
        self._said = said
        self._coalesce = coalesce

    async def events(self, keepalive: float | None = None) -> AsyncGenerator[TurnEvent, None]:
        """The reply as it arrives; the last event is TurnStored or TurnFailed. With `keepalive`
        (seconds), StillReplying comes after that long without text."""
        metrics.CHAT_STREAMS_OPEN.inc()
        outcome = "error"
        parts: list[str] = []
        try:
            # aclosing: a client that goes away closes the model stream now, not at GC.
            reply = self._agent.stream(self._context, coalesce=self._coalesce, keepalive=keepalive)
            async with aclosing(reply) as reply_parts:
                async for part in reply_parts:
                    if not part:
                        yield StillReplying()
                        continue
                    parts.append(part)
                    yield ReplyText(part)
            await self._store([*self._said, Utterance("assistant", "".join(parts))])
            outcome = "completed"
            yield TurnStored()
        except (ChatFailure, HistoryUnavailable, TurnWithdrawn) as failure:
            outcome = "withdrawn" if isinstance(failure, TurnWithdrawn) else outcome
            yield TurnFailed(failure.code, failure.message)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.CHAT_STREAMS_OPEN.dec()
            metrics.CHAT_TURNS.labels(outcome=outcome, transport="stream").inc()

    async def reply(self) -> Utterance:
        """Run the turn to completion and store it; raises ChatFailure, HistoryUnavailable or
        TurnWithdrawn."""
        outcome = "error"
        try:
            async with aclosing(self._agent.stream(self._context)) as reply_parts:
                answer = Utterance("assistant", "".join([part async for part in reply_parts]))
            await self._store([*self._said, answer])
            outcome = "completed"
            return answer
        except TurnWithdrawn:
            outcome = "withdrawn"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            metrics.CHAT_TURNS.labels(outcome=outcome, transport="json").inc()
