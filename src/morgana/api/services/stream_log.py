"""The events of each chat stream, kept for a while so that a client that lost its connection can
pick the stream up again (`Last-Event-ID`) on any replica.

Each stream's events go to a Redis Stream of their own (bounded length, expiring), or, with no
Redis configured, to a log in this process. An event's id is `<stream>:<n>`: the stream's random
id, and the event's place in it from 1. The last event of a stream ends it (`done: true`).
"""

import asyncio
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol, cast

import redis.asyncio
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from morgana.api import metrics
from morgana.api.config import ApiSettings
from morgana.api.redis_pool import blocking_pool

log = logging.getLogger(__name__)

_EVENT_ID = re.compile(r"^([0-9a-f]{32}):([0-9]{1,9})$")


class InvalidEventId(ValueError):
    """A Last-Event-ID this API did not give out."""


class StreamGone(Exception):
    """The stream's events are not kept (any more): expired, trimmed, or never this session's."""


class StreamLogDown(Exception):
    """The store of stream events could not be reached."""


@dataclass(frozen=True, slots=True)
class EventId:
    stream: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> "EventId":
        match = _EVENT_ID.match(text.strip())
        if match is None:
            raise InvalidEventId(text)
        return cls(match[1], int(match[2]))

    def __str__(self) -> str:
        return f"{self.stream}:{self.seq}"


def new_stream_id() -> str:
    return uuid.uuid4().hex


def stream_key(session_id: uuid.UUID, stream: str) -> str:
    """A stream's events are filed under its session: another session's token finds nothing."""
    return f"morgana:chat-stream:{session_id.hex}:{stream}"


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    frame: bytes
    last: bool


class StreamLog(Protocol):
    async def append(self, key: str, entry: Entry) -> None:
        """Add the stream's next event (entries come in order, `seq` from 1). Adding one that is
        there already does nothing: an append cut short by a cancellation may have been stored."""

    async def read(self, key: str, after: int, wait: float) -> list[Entry]:
        """The events after `after`, waiting up to `wait` seconds for one if there are none yet.
        StreamGone if the stream is not kept, or its events right after `after` are not."""

    async def aclose(self) -> None: ...


class RedisStreamLog:
    """Each stream is a Redis Stream whose entry ids are the events' places (`<n>-0`).

    Appends from all streams go out together: one task writes whatever has come meanwhile in
    one pipeline, so that many open streams cost a round trip per batch, not per event.
    """

    def __init__(
        self, client: "redis.asyncio.Redis", ttl_seconds: float, max_events: int, command_timeout: float = 2.0
    ) -> None:
        # The client's connections must have no socket timeout: redis-py bounds a socket write
        # with asyncio.wait_for, which on Python 3.11 loses a cancellation that comes meanwhile (a
        # client gone with on_disconnect: cancel, whose reply then ran on). Bounded here instead.
        self._redis = client
        self._ttl_ms = int(ttl_seconds * 1000)
        self._max_events = max_events
        self._command_timeout = command_timeout
        self._batch: list[tuple[str, Entry, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def append(self, key: str, entry: Entry) -> None:
        loop = asyncio.get_running_loop()
        stored = loop.create_future()
        self._batch.append((key, entry, stored))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_batches())
        # A cancelled append may still be written: appending it again is then a no-op.
        await stored

    async def _write_batches(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, []
            try:
                async with asyncio.timeout(self._command_timeout):
                    results = await self._write(batch)
            except (RedisError, TimeoutError) as exc:
                for *_, stored in batch:
                    if not stored.done():
                        stored.set_exception(StreamLogDown(str(exc)))
                continue
            for (*_, stored), result in zip(batch, results, strict=True):
                if stored.done():
                    continue  # its append was cancelled
                # Already there (an append cut short by a cancellation, then made again) is fine.
                if isinstance(result, ResponseError) and "equal or smaller" not in str(result):
                    stored.set_exception(StreamLogDown(str(result)))
                else:
                    stored.set_result(None)

    async def _write(self, batch: list[tuple[str, Entry, "asyncio.Future[None]"]]) -> list[object]:
        """One pipeline for the batch; each entry's XADD result (or error), in order."""
        async with self._redis.pipeline(transaction=False) as pipe:
            expiring = []
            for key, entry, _ in batch:
                fields: dict[FieldT, EncodableT] = {b"f": entry.frame}
                if entry.last:
                    fields[b"end"] = b"1"
                pipe.xadd(key, fields, id=f"{entry.seq}-0", maxlen=self._max_events, approximate=True)
                # The time to live starts again with the first and the last event (and every
                # 100th between): a stream is kept that long after it ended.
                expiring.append(entry.seq == 1 or entry.last or entry.seq % 100 == 0)
                if expiring[-1]:
                    pipe.pexpire(key, self._ttl_ms)
            replies = iter(await pipe.execute(raise_on_error=False))
        results: list[object] = []
        for expires in expiring:
            results.append(next(replies))
            if expires:
                next(replies)
        return results

    async def read(self, key: str, after: int, wait: float) -> list[Entry]:
        try:
            async with asyncio.timeout(self._command_timeout + wait):
                # No BLOCK at all for wait 0 (BLOCK 0 would wait for ever).
                block = max(1, int(wait * 1000)) if wait > 0 else None
                found = await self._redis.xread({key: f"{after}-0"}, count=1000, block=block)
                if not found:
                    if not await self._redis.exists(key):
                        raise StreamGone(key)
                    return []
        except (RedisError, TimeoutError) as exc:
            raise StreamLogDown(str(exc)) from exc
        # RESP2 without decoding: [[key, [(b"<n>-0", {b"f": frame, b"end"?: b"1"}), ...]]]
        kept = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], found)[0][1]
        entries = [Entry(int(entry_id.split(b"-", 1)[0]), fields[b"f"], b"end" in fields) for entry_id, fields in kept]
        if entries[0].seq != after + 1:
            raise StreamGone(key)  # trimmed past what the client has
        return entries

    async def aclose(self) -> None:
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)
        await self._redis.aclose()


class _KeptStream:
    __slots__ = ("entries", "expires_at", "waiter")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.expires_at = 0.0
        self.waiter: asyncio.Future[None] | None = None


class MemoryStreamLog:
    """The log of this process alone (no Redis configured): a client resumes on the same replica."""

    def __init__(self, ttl_seconds: float, max_events: int) -> None:
        self._ttl = ttl_seconds
        self._max_events = max_events
        self._streams: dict[str, _KeptStream] = {}
        self._next_sweep = 0.0

    def _kept(self, key: str, now: float) -> _KeptStream | None:
        stream = self._streams.get(key)
        if stream is not None and stream.expires_at <= now:
            del self._streams[key]
            return None
        return stream

    async def append(self, key: str, entry: Entry) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        stream = self._kept(key, now)
        if stream is None:
            stream = self._streams[key] = _KeptStream()
        if stream.entries and stream.entries[-1].seq >= entry.seq:
            return
        stream.entries.append(entry)
        if len(stream.entries) > self._max_events:
            del stream.entries[: len(stream.entries) - self._max_events]
        stream.expires_at = now + self._ttl
        if stream.waiter is not None and not stream.waiter.done():
            stream.waiter.set_result(None)

    async def read(self, key: str, after: int, wait: float) -> list[Entry]:
        stream = self._kept(key, time.monotonic())
        if stream is None:
            raise StreamGone(key)
        if (not stream.entries or stream.entries[-1].seq <= after) and wait > 0:
            if stream.waiter is None or stream.waiter.done():
                stream.waiter = asyncio.get_running_loop().create_future()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can lose a cancellation.
                async with asyncio.timeout(wait):
                    await asyncio.shield(stream.waiter)
            except TimeoutError:
                return []
        if not stream.entries:
            return []
        first = stream.entries[0].seq
        if first > after + 1:
            raise StreamGone(key)
        return stream.entries[after + 1 - first :]

    def _sweep(self, now: float) -> None:
        for key in [key for key, stream in self._streams.items() if stream.expires_at <= now]:
            del self._streams[key]
        self._next_sweep = now + min(self._ttl, 60.0)

    async def aclose(self) -> None:
        self._streams.clear()


class StreamRecorder:
    """Writes one stream's events to the log as they are sent. A log that fails does not fail
    the stream: its client still gets every event, though it could not resume."""

    __slots__ = ("_key", "_log", "broken", "ended", "stream")

    def __init__(self, stream_log: StreamLog, key: str, stream: str) -> None:
        self._log = stream_log
        self._key = key
        self.stream = stream
        self.ended = False  # its last event is logged
        self.broken = False

    def event_id(self, seq: int) -> str:
        return str(EventId(self.stream, seq))

    async def record(self, seq: int, frame: bytes, *, last: bool) -> None:
        if self.broken:
            return
        try:
            await self._log.append(self._key, Entry(seq, frame, last))
        except StreamLogDown:
            self.broken = True
            metrics.CHAT_STREAM_LOG_ERRORS.inc()
            log.warning("chat stream events not kept: a dropped client cannot resume this stream")
            return
        self.ended = last


def create_stream_log(settings: ApiSettings) -> StreamLog | None:
    """The log of CHAT_STREAM_RESUME_SECONDS (None when 0): in Redis if REDIS_URL is set."""
    if settings.chat_stream_resume_seconds <= 0:
        return None
    ttl, most = settings.chat_stream_resume_seconds, settings.chat_stream_resume_max_events
    if settings.redis_url:
        client = redis.asyncio.Redis(connection_pool=blocking_pool(settings, settings.redis_url, socket_timeout=None))
        return RedisStreamLog(client, ttl, most)
    return MemoryStreamLog(ttl, most)


class StreamLost(Exception):
    """A followed stream's events stopped coming before its last one (its replica went away)."""


# A blocking read holds a pooled connection: a short one, so that pings go out on time.
_READ_WAIT_SECONDS = 1.0


async def follow(
    stream_log: StreamLog, key: str, after: int, entries: list[Entry], *, keepalive: float, give_up: float
) -> AsyncGenerator[Entry | None, None]:
    """The stream's events after `after` to its last, as they are logged, starting with `entries`
    (the first read, made before the response started, so that StreamGone is an HTTP 410); None
    after each `keepalive` seconds without one. StreamLost after `give_up` seconds without one."""
    loop = asyncio.get_running_loop()
    heard = pinged = loop.time()
    while True:
        for entry in entries:
            yield entry
            if entry.last:
                return
        if entries:
            heard = pinged = loop.time()
            after = entries[-1].seq
        entries = await stream_log.read(key, after, min(_READ_WAIT_SECONDS, keepalive))
        now = loop.time()
        if not entries and now - heard >= give_up:
            raise StreamLost(key)
        if not entries and now - pinged >= keepalive:
            pinged = now
            yield None
