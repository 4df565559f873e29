"""The chat streams' event log on its own: in a real Redis (valkey) and in process, the same
behaviour: events after an id, waiting for the next, expiry, trimming, and a stream whose
producer went away."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import redis.asyncio

from morgana.api.services.stream_log import (
    Entry,
    EventId,
    InvalidEventId,
    MemoryStreamLog,
    RedisStreamLog,
    StreamGone,
    StreamLog,
    StreamLost,
    follow,
)
from morgana_devtools.services import EmbeddedValkey

LogFactory = Callable[[float, int], AbstractAsyncContextManager[StreamLog]]


@pytest.fixture(params=["redis", "memory"])
def open_log(request: pytest.FixtureRequest, valkey: EmbeddedValkey) -> LogFactory:
    @asynccontextmanager
    async def opened(ttl: float, most: int) -> AsyncIterator[StreamLog]:
        log: StreamLog
        if request.param == "redis":
            log = RedisStreamLog(redis.asyncio.Redis.from_url(valkey.url), ttl, most)
        else:
            log = MemoryStreamLog(ttl, most)
        try:
            yield log
        finally:
            await log.aclose()

    return opened


def frame(n: int) -> bytes:
    return f"id: s:{n}\ndata: {n}\n\n".encode()


def key() -> str:
    return f"test:{uuid.uuid4().hex}"


def test_events_after_an_id_then_the_next_as_it_comes(open_log: LogFactory) -> None:
    async def scenario() -> None:
        async with open_log(60, 100) as log:
            k = key()
            for n in (1, 2, 3):
                await log.append(k, Entry(n, frame(n), last=False))
            assert [e.seq for e in await log.read(k, 1, 0)] == [2, 3]
            assert await log.read(k, 3, 0) == []
            # Again (an append cut short may have been stored): nothing changes.
            await log.append(k, Entry(3, frame(3), last=False))
            assert [e.seq for e in await log.read(k, 0, 0)] == [1, 2, 3]
            waiting = asyncio.create_task(log.read(k, 3, 5))
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await log.append(k, Entry(4, frame(4), last=True))
            assert await asyncio.wait_for(waiting, 2) == [Entry(4, frame(4), last=True)]

    asyncio.run(scenario())


def test_a_stream_is_gone_after_its_time_to_live_and_never_there_for_an_unknown_key(open_log: LogFactory) -> None:
    async def scenario() -> None:
        async with open_log(0.3, 100) as log:
            k = key()
            await log.append(k, Entry(1, frame(1), last=True))
            assert [e.seq for e in await log.read(k, 0, 0)] == [1]
            await asyncio.sleep(0.5)
            with pytest.raises(StreamGone):
                await log.read(k, 0, 0)
            with pytest.raises(StreamGone):
                await log.read(key(), 0, 0.2)

    asyncio.run(scenario())


def test_events_trimmed_past_what_a_client_has_make_the_stream_gone_for_it(open_log: LogFactory) -> None:
    async def scenario() -> None:
        async with open_log(60, 10) as log:
            k = key()
            for n in range(1, 501):
                await log.append(k, Entry(n, frame(n), last=False))
            with pytest.raises(StreamGone):
                await log.read(k, 1, 0)
            assert [e.seq for e in await log.read(k, 498, 0)] == [499, 500]

    asyncio.run(scenario())


def test_following_a_stream_pings_while_waiting_and_gives_up_when_its_producer_is_gone(
    open_log: LogFactory,
) -> None:
    async def scenario() -> None:
        async with open_log(60, 100) as log:
            k = key()
            await log.append(k, Entry(1, frame(1), last=False))
            seen: list[object] = []
            with pytest.raises(StreamLost):
                async for entry in follow(log, k, 0, await log.read(k, 0, 0), keepalive=0.2, give_up=0.7):
                    seen.append(entry.seq if entry is not None else "ping")
            assert seen[0] == 1 and set(seen[1:]) == {"ping"} and 2 <= len(seen[1:]) <= 4

            ended = key()
            await log.append(ended, Entry(1, frame(1), last=False))
            await log.append(ended, Entry(2, frame(2), last=True))
            followed = [e async for e in follow(log, ended, 0, [], keepalive=5, give_up=5)]
            assert [e.seq for e in followed if e is not None] == [1, 2]

    asyncio.run(scenario())


def test_event_ids_are_the_streams_and_the_place_in_it() -> None:
    stream = uuid.uuid4().hex
    assert EventId.parse(f"{stream}:17") == EventId(stream, 17)
    assert str(EventId(stream, 17)) == f"{stream}:17"
    for bad in ("", "17", f"{stream}:", f"{stream}:-1", f"{stream[:-1]}:1", f"{stream}:1:2", "x" * 32 + ":1"):
        with pytest.raises(InvalidEventId):
            EventId.parse(bad)
