"""What keeping chat streams' events for resuming (Last-Event-ID) costs, on this machine.

    uv run python -m bench.stream_log_bench [--quick]

1. log_append      the API's own code (`StreamRecorder.record` on `RedisStreamLog`, its pool as
                   the API configures it) writing events of 50-event streams to a real Valkey:
                   time per event, beside a Redis PING on the same client (the round trip any
                   Redis-backed log pays), measured alternately in the same run. An event is
                   logged after it is sent, so this is the most a later event can be held up.
2. stored_memory   Valkey's `used_memory` growth per stored event (streams of 50 typical events),
                   and the in-process log's (no Redis) Python allocations per event, beside the
                   event's own bytes.
3. end_to_end      one API process with the log (the default) and one without
                   (CHAT_STREAM_RESUME_SECONDS=0), the same load alternately: 8 streams at once,
                   each 100 tokens 2 ms apart, each token an event (CHAT_STREAM_COALESCE_SECONDS=0).
                   Per event: the time from a stream's first event to its last, and the API's CPU.

Results: JSON lines on stdout and in bench-results/stream_log.jsonl (the first line is the command
and machine info), then a table. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import time
import tracemalloc
import uuid
from dataclasses import dataclass

import aiohttp
import redis.asyncio

from bench.common import (
    RESULTS_DIR,
    ResultLines,
    cpu_seconds,
    interrupt_on_sigterm,
    logger,
    machine_info,
    morgana_env,
    percentile,
    scratch_dir,
    start_services,
)
from morgana.api.config import ApiSettings
from morgana.api.redis_pool import blocking_pool
from morgana.api.services.stream_log import Entry, MemoryStreamLog, RedisStreamLog, StreamRecorder, new_stream_id
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess, migrate

RESULTS = RESULTS_DIR / "stream_log.jsonl"
COMMAND = "uv run python -m bench.stream_log_bench"
EVENTS_PER_STREAM = 50
CONCURRENCY = 8  # streams at once in the end-to-end part
# A typical event: a few words of a reply, with its id.
FRAME = b'id: 0123456789abcdef0123456789abcdef:17\r\ndata: {"content": " a few words", "done": false}\r\n\r\n'
log = logger("stream-log-bench")


@dataclass(frozen=True)
class Plan:
    append_streams: int
    memory_streams: int
    e2e_streams: int


FULL = Plan(append_streams=200, memory_streams=400, e2e_streams=80)
QUICK = Plan(append_streams=40, memory_streams=100, e2e_streams=16)


class Results(ResultLines):
    columns = ("value", "baseline")


def _settings(url: str) -> ApiSettings:
    # Only the Redis pool's settings matter here; the rest must merely be valid.
    return ApiSettings(  # type: ignore[call-arg]
        _env_file=None, environment="test", redis_url=url, jwt_secret_key=secrets.token_hex(32), openai_api_key="unused"
    )


async def bench_append(res: Results, plan: Plan, url: str) -> None:
    settings = _settings(url)
    client = redis.asyncio.Redis(connection_pool=blocking_pool(settings, url, socket_timeout=None))
    stream_log = RedisStreamLog(client, 600, 10_000)
    appends: list[float] = []
    pings: list[float] = []
    try:
        for _ in range(plan.append_streams):
            stream = new_stream_id()
            recorder = StreamRecorder(stream_log, f"bench:{stream}", stream)
            for seq in range(1, EVENTS_PER_STREAM + 1):
                started = time.perf_counter()
                await recorder.record(seq, FRAME, last=seq == EVENTS_PER_STREAM)
                appends.append(time.perf_counter() - started)
                started = time.perf_counter()
                await client.ping()
                pings.append(time.perf_counter() - started)
            assert not recorder.broken
    finally:
        await stream_log.aclose()
    for q in (50, 95):
        res.add(
            "log_append",
            f"per_event_p{q}",
            1000 * percentile(appends, q),
            1000 * percentile(pings, q),
            "ms",
            events=len(appends),
            note="baseline: a Redis PING on the same client",
        )


async def bench_memory(res: Results, plan: Plan, url: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    stream_log = RedisStreamLog(client, 600, 10_000)
    try:
        await client.flushdb()
        before = int((await client.info("memory"))["used_memory"])
        for _ in range(plan.memory_streams):
            stream = new_stream_id()
            for seq in range(1, EVENTS_PER_STREAM + 1):
                await stream_log.append(f"bench:{stream}", _entry(seq))
        after = int((await client.info("memory"))["used_memory"])
    finally:
        await stream_log.aclose()
    events = plan.memory_streams * EVENTS_PER_STREAM
    res.add(
        "stored_memory",
        "redis_bytes_per_event",
        (after - before) / events,
        len(FRAME),
        "B",
        events=events,
        note="baseline: the event's own bytes",
    )

    memory_log = MemoryStreamLog(600, 10_000)
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    for _ in range(plan.memory_streams):
        stream = new_stream_id()
        for seq in range(1, EVENTS_PER_STREAM + 1):
            # A frame of its own per event, as the API's are.
            await memory_log.append(f"bench:{stream}", _entry(seq, bytes(bytearray(FRAME))))
    grown = sum(stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(start, "filename"))
    tracemalloc.stop()
    res.add(
        "stored_memory",
        "in_process_bytes_per_event",
        grown / events,
        len(FRAME),
        "B",
        events=events,
        note="no Redis: the API process's own log; the frame included",
    )


def _entry(seq: int, frame: bytes = FRAME) -> Entry:
    return Entry(seq, frame, seq == EVENTS_PER_STREAM)


async def _one_stream(http: aiohttp.ClientSession, url: str, token: str) -> tuple[int, float]:
    """(events, seconds from the first event to the last) of one chat stream."""
    body = {"messages": [{"role": "user", "content": "bench"}]}
    first = last = 0.0
    events = 0
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(f"{url}/api/v1/chatbot/chat/stream", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data:"):
                events += 1
                last = time.perf_counter()
                first = first or last
                if b'"done": true' in line or b'"done":true' in line:
                    break
    return events, last - first


async def bench_end_to_end(res: Results, plan: Plan, apis: dict[str, ApiProcess], fake: FakeOpenAIProcess) -> None:
    async with aiohttp.ClientSession() as http:
        tokens: dict[str, list[str]] = {}
        for name, api in apis.items():
            email = f"bench-{uuid.uuid4().hex[:10]}@example.com"
            account = {"email": email, "password": "Bench_Passw0rd!x"}
            async with http.post(f"{api.url}/api/v1/auth/register", json=account) as r:
                user = (await r.json())["token"]["access_token"]
            tokens[name] = []
            for _ in range(plan.e2e_streams):
                bearer = {"Authorization": f"Bearer {user}"}
                async with http.post(f"{api.url}/api/v1/auth/session", headers=bearer) as r:
                    tokens[name].append((await r.json())["token"]["access_token"])
        fake.set_scenario(tokens=100, delay_ms=2)
        per_event: dict[str, list[float]] = {name: [] for name in apis}
        cpu: dict[str, float] = dict.fromkeys(apis, 0.0)
        events: dict[str, int] = dict.fromkeys(apis, 0)
        for n in range(0, plan.e2e_streams, CONCURRENCY):
            order = list(apis) if n % (2 * CONCURRENCY) == 0 else list(reversed(apis))
            for name in order:
                api = apis[name]
                assert api.process is not None
                before = cpu_seconds(api.process.pid)
                done = await asyncio.gather(
                    *(_one_stream(http, api.url, token) for token in tokens[name][n : n + CONCURRENCY])
                )
                cpu[name] += cpu_seconds(api.process.pid) - before
                for count, seconds in done:
                    events[name] += count
                    per_event[name].append(seconds / max(1, count - 1))
        fake.set_scenario()
    res.add(
        "end_to_end",
        "time_per_event_p50",
        1000 * percentile(per_event["with_log"], 50),
        1000 * percentile(per_event["without_log"], 50),
        "ms",
        note="model sends a token every 2 ms",
    )
    res.add(
        "end_to_end",
        "api_cpu_per_event",
        1000 * cpu["with_log"] / events["with_log"],
        1000 * cpu["without_log"] / events["without_log"],
        "ms",
        events=events["with_log"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_log_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (~30 s)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    interrupt_on_sigterm()
    res = Results()
    res.emit({"bench": "meta", "command": COMMAND + (" --quick" if args.quick else ""), **machine_info()})
    model_key = "sk-bench-" + secrets.token_hex(8)
    with contextlib.ExitStack() as stack:
        workdir = scratch_dir(stack, "morgana-stream-log-bench-")
        log("starting Postgres, Valkey and the fake model server")
        pg, valkey, fake = start_services(stack, workdir, model_key)
        log("appending events")
        asyncio.run(bench_append(res, plan, valkey.url))
        log("measuring memory")
        asyncio.run(bench_memory(res, plan, valkey.url))
        env = morgana_env(pg, valkey, fake, model_key) | {"CHAT_STREAM_COALESCE_SECONDS": "0"}
        migrate(env)
        apis = {
            "with_log": ApiProcess(env, workdir / "with.log"),
            "without_log": ApiProcess(env | {"CHAT_STREAM_RESUME_SECONDS": "0"}, workdir / "without.log"),
        }
        for api in apis.values():
            stack.callback(api.stop)
            api.start()
        log("streaming through both API processes")
        asyncio.run(bench_end_to_end(res, plan, apis, fake))
    res.write(RESULTS)
    print(res.table())
    print(json.dumps({"bench": "meta", "results": str(RESULTS)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
