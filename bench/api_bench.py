"""Morgana API vs a raw Starlette baseline, measured in one run on this machine.

    uv run python -m bench.api_bench [--quick]      (or: make bench [BENCH_ARGS=--quick])

Starts real Postgres and Valkey (from wheels), the fake OpenAI-protocol model server, the
Morgana API (one uvicorn worker) and the baseline (`bench/baseline_app.py`, a plain Starlette
app doing the same I/O with no framework logic), then measures both with the same client:

1. session_create  POST /api/v1/auth/session  vs  POST /session (one INSERT)
2. chat_stream     POST /api/v1/chatbot/chat/stream  vs  POST /chat/stream (relay of the model's
                   SSE), 200-token replies: time to first event (sequential) and streams/s (c=8)
3. open_streams    N concurrent long-lived streams (500; --quick 100): errors, peak open,
                   server RSS per open stream

Results: one JSON object per line on stdout and in bench-results/api.jsonl, then a table.
Progress goes to stderr. Every process started here is stopped in `finally` blocks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx

from bench.common import (
    ResultLines,
    cell,
    cpu_model,
    mem_total_mib,
    percentile,
    ratio,
    render_table,
    rounded,
    start_services,
)
from morgana.api.ratelimit import LIMIT_NAMES
from morgana.devtools.openai_server import FakeOpenAIProcess
from morgana.devtools.processes import ApiProcess, migrate
from morgana.devtools.services import EmbeddedPostgres, EmbeddedValkey, free_port


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench-results" / "api.jsonl"
COMMAND = "uv run python -m bench.api_bench"  # what `make bench` runs
PASSWORD = "A_Strong_Password123!"
MODEL = "morgana-bench-model"
RATE = "1000000/minute"
CHAT_BODY = {"messages": [{"role": "user", "content": "bench"}]}
SESSION_ROTATE_EVERY = 20  # fresh Morgana chat session every N turns (bounded history)
REPLY_TOKENS = 200
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    session_requests: int  # per target
    session_concurrency: int
    ttfe_pairs: int  # sequential requests per target
    stream_requests: int  # per target, at stream_concurrency
    stream_concurrency: int
    open_streams: int
    open_tokens: int
    open_delay_ms: int
    rounds: int  # alternating rounds per target (even: ABBA ordering)
    warmup: int


FULL = Plan(2000, 16, 100, 400, 8, 500, 20, 500, 4, 60)
QUICK = Plan(300, 16, 20, 60, 8, 100, 10, 400, 2, 20)


# --------------------------------------------------------------------------- small helpers


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            return float(line.rsplit(" ", 1)[1])
    return None


def raise_fd_limit(wanted: int = 8192) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class Results(ResultLines):
    """Collects result lines: printed at once (stdout), written and tabulated at the end."""

    def add(
        self,
        bench: str,
        metric: str,
        morgana: float | None,
        baseline: float | None,
        unit: str,
        **extra: object,
    ) -> None:
        record = {
            "bench": bench,
            "metric": metric,
            "morgana": rounded(morgana),
            "baseline": rounded(baseline),
            "ratio": rounded(ratio(morgana, baseline)),
            "unit": unit,
        }
        record.update({k: v for k, v in extra.items() if v is not None})
        self.emit(record)

    def table(self) -> str:
        rows = [("bench", "metric", "morgana", "baseline", "ratio", "unit")]
        for line in self.lines:
            if "metric" not in line:
                continue
            rows.append(
                (
                    line["bench"],
                    line["metric"],
                    cell(line["morgana"]),
                    cell(line["baseline"]),
                    cell(line["ratio"]),
                    line["unit"],
                )
            )
        return render_table(rows, left=(0, 1, 5))




# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str  # "morgana" | "baseline"
    url: str
    pid: int
    session_path: str
    stream_path: str
    session_headers: dict[str, str] = field(default_factory=dict)
    # Yields the Authorization headers for the next chat request (Morgana rotates sessions).
    stream_headers: Callable[[], dict[str, str]] = dict


class SessionPool:
    """Pre-created Morgana chat sessions; each worker uses one for SESSION_ROTATE_EVERY turns."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def take(self) -> str:
        if not self.tokens:
            raise RuntimeError("ran out of pre-created chat sessions")
        return self.tokens.pop()


def rotating_headers(pool: SessionPool) -> Callable[[], dict[str, str]]:
    """Per asyncio task (= per load worker): a session token, replaced every N turns."""
    states: dict[asyncio.Task | None, list] = {}

    def next_headers() -> dict[str, str]:
        state = states.setdefault(asyncio.current_task(), [SESSION_ROTATE_EVERY, {}])
        if state[0] >= SESSION_ROTATE_EVERY:
            state[0], state[1] = 0, {"Authorization": f"Bearer {pool.take()}"}
        state[0] += 1
        return state[1]

    return next_headers


def client_session(limit: int, timeout: float = 30.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


async def create_sessions(
    http: aiohttp.ClientSession, api_url: str, user_token: str, count: int, concurrency: int = 16
) -> list[str]:
    tokens: list[str] = []
    remaining = count
    headers = {"Authorization": f"Bearer {user_token}"}

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with http.post(f"{api_url}/api/v1/auth/session", headers=headers) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"session creation failed: {resp.status} {body}")
                tokens.append(body["token"]["access_token"])

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens


# --------------------------------------------------------------------------- one request


@dataclass
class StreamResult:
    ok: bool
    status: int = 0
    ttfe: float = math.nan  # seconds, request sent -> first content event
    total: float = math.nan  # seconds, request sent -> stream closed
    events: int = 0
    problem: str = ""


async def one_session(http: aiohttp.ClientSession, target: Target) -> tuple[bool, float]:
    started = time.perf_counter()
    try:
        async with http.post(target.url + target.session_path, headers=target.session_headers) as resp:
            body = await resp.read()
            ok = resp.status == 200 and b"session_id" in body
    except (TimeoutError, aiohttp.ClientError):
        ok = False
    return ok, time.perf_counter() - started


async def one_stream(
    http: aiohttp.ClientSession,
    target: Target,
    expected_events: int | None,
    on_open: Callable[[], None] | None = None,
    on_close: Callable[[], None] | None = None,
    on_first: Callable[[], None] | None = None,
) -> StreamResult:
    """POST a chat stream; time the first content event; check it ends with done:true, no error."""
    started = time.perf_counter()
    result = StreamResult(ok=False)
    opened = False
    try:
        async with http.post(
            target.url + target.stream_path, json=CHAT_BODY, headers=target.stream_headers()
        ) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.problem = f"http {resp.status}"
                await resp.read()
                return result
            if on_open is not None:
                on_open()
                opened = True
            pending = b""  # unparsed bytes until the first content event
            carry = b""  # last 4 bytes, so "data:" split across chunks is still counted
            tail = b""  # the last 4 KiB: holds the final events
            async for chunk in resp.content.iter_any():
                result.events += (carry + chunk).count(b"data:")
                carry = chunk[-4:]
                tail = (tail + chunk)[-4096:]
                if math.isnan(result.ttfe):
                    pending += chunk
                    for line in pending.split(b"\n")[:-1]:
                        line = line.rstrip(b"\r")
                        if line.startswith(b"data:") and json.loads(line[5:]).get("content"):
                            result.ttfe = time.perf_counter() - started
                            if on_first is not None:
                                on_first()
                            break
                    pending = pending[pending.rfind(b"\n") + 1 :]
            result.total = time.perf_counter() - started
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        result.problem = f"{type(exc).__name__}: {exc}"[:200]
        return result
    finally:
        if opened and on_close is not None:
            on_close()
    data_lines = [ln.rstrip(b"\r") for ln in tail.split(b"\n") if ln.startswith(b"data:")]
    try:
        last = json.loads(data_lines[-1][5:]) if data_lines else {}
    except ValueError:
        last = {}
    if last.get("error") or b"event: error" in tail:
        result.problem = f"error event: {last.get('error')}"
    elif last.get("done") is not True:
        result.problem = "stream ended without done:true"
    elif math.isnan(result.ttfe):
        result.problem = "no content event"
    elif expected_events is not None and result.events != expected_events:
        result.problem = f"{result.events} events, expected {expected_events}"
    else:
        result.ok = True
    return result


# --------------------------------------------------------------------------- load phases


@dataclass
class Tally:
    """Per-target aggregate over its (interleaved) rounds."""

    done: int = 0
    errors: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfes: list[float] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)
    problems: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else math.nan

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.cpu / self.done if self.done else math.nan

    def note(self, problem: str) -> None:
        self.errors += 1
        key = problem.split(":")[0][:60]
        self.problems[key] = self.problems.get(key, 0) + 1


async def closed_loop(
    count: int,
    concurrency: int,
    deadline: float,
    call: Callable[[], Awaitable[tuple[bool, float, float, str]]],
    tally: Tally,
    pid: int,
) -> None:
    """`count` calls from `concurrency` workers (stopping early at `deadline`), into `tally`."""
    remaining = count
    finished = 0

    async def worker() -> None:
        nonlocal remaining, finished
        while remaining > 0 and time.monotonic() < deadline:
            remaining -= 1
            ok, latency, ttfe, problem = await call()
            finished += 1
            if ok:
                tally.latencies.append(latency)
                if math.isfinite(ttfe):
                    tally.ttfes.append(ttfe)
            else:
                tally.note(problem or "failed")

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    tally.cpu += cpu_seconds(pid) - cpu0
    tally.elapsed += elapsed
    tally.done += finished
    tally.round_rates.append(finished / elapsed if elapsed else math.nan)


def abba(targets: list[Target], rounds: int) -> list[Target]:
    """Alternate the two targets A B B A A B ... so slow drift hits both alike."""
    order: list[Target] = []
    for r in range(rounds):
        order += targets if r % 2 == 0 else targets[::-1]
    return order


# --------------------------------------------------------------------------- benchmarks


async def bench_sessions(res: Results, plan: Plan, targets: list[Target]) -> None:
    log(
        f"session_create: {plan.session_requests} requests per target, "
        f"concurrency {plan.session_concurrency}, {plan.rounds} alternating rounds"
    )
    tallies = {t.name: Tally() for t in targets}
    per_round = math.ceil(plan.session_requests / plan.rounds)
    deadline = time.monotonic() + 90
    async with client_session(plan.session_concurrency) as http:
        for t in targets:  # warm-up (connections, code paths)
            await asyncio.gather(*(one_session(http, t) for _ in range(plan.warmup)))
        for t in abba(targets, plan.rounds):

            async def call(t: Target = t) -> tuple[bool, float, float, str]:
                ok, latency = await one_session(http, t)
                return ok, latency, math.nan, "" if ok else "non-200 or bad body"

            await closed_loop(per_round, plan.session_concurrency, deadline, call, tallies[t.name], t.pid)
    m, b = tallies["morgana"], tallies["baseline"]
    res.add(
        "session_create",
        "throughput",
        m.rate,
        b.rate,
        "req/s",
        n=m.done,
        concurrency=plan.session_concurrency,
        round_spread={
            "morgana": [rounded(min(m.round_rates), 1), rounded(max(m.round_rates), 1)],
            "baseline": [rounded(min(b.round_rates), 1), rounded(max(b.round_rates), 1)],
        },
    )
    for q in (50, 95):
        res.add(
            "session_create",
            f"latency_p{q}",
            1000 * percentile(m.latencies, q),
            1000 * percentile(b.latencies, q),
            "ms",
        )
    res.add("session_create", "server_cpu_per_request", m.cpu_ms_per_request, b.cpu_ms_per_request, "ms")
    res.add(
        "session_create",
        "errors",
        m.errors,
        b.errors,
        "count",
        problems={"morgana": m.problems, "baseline": b.problems} if m.errors or b.errors else None,
    )


async def bench_chat(res: Results, plan: Plan, targets: list[Target], fake: FakeOpenAIProcess) -> None:
    fake.set_scenario(tokens=REPLY_TOKENS)
    expected = REPLY_TOKENS + 1
    async with client_session(plan.stream_concurrency) as http:
        for t in targets:  # warm-up
            for _ in range(max(3, plan.warmup // 6)):
                r = await one_stream(http, t, expected)
                if not r.ok:
                    raise RuntimeError(f"{t.name} warm-up stream failed: {r.problem}")

        # Sequential: time to first content event, and whole-stream time, with no contention.
        log(f"chat_stream: {plan.ttfe_pairs} sequential streams per target (alternating)")
        seq = {t.name: Tally() for t in targets}
        deadline = time.monotonic() + 60
        for i in range(plan.ttfe_pairs):
            if time.monotonic() > deadline:
                break
            for t in targets if i % 2 == 0 else targets[::-1]:
                r = await one_stream(http, t, expected)
                if r.ok:
                    seq[t.name].ttfes.append(r.ttfe)
                    seq[t.name].latencies.append(r.total)
                    seq[t.name].done += 1
                else:
                    seq[t.name].note(r.problem)
        m, b = seq["morgana"], seq["baseline"]
        for q in (50, 95):
            mv, bv = 1000 * percentile(m.ttfes, q), 1000 * percentile(b.ttfes, q)
            res.add("chat_stream", f"ttfe_p{q}", mv, bv, "ms", overhead_ms=rounded(mv - bv), n=m.done)
        mv, bv = 1000 * percentile(m.latencies, 50), 1000 * percentile(b.latencies, 50)
        res.add(
            "chat_stream", "stream_time_p50", mv, bv, "ms", overhead_ms=rounded(mv - bv), tokens=REPLY_TOKENS
        )
        res.add(
            "chat_stream",
            "sequential_errors",
            m.errors,
            b.errors,
            "count",
            problems={"morgana": m.problems, "baseline": b.problems} if m.errors or b.errors else None,
        )

        # Concurrent: streams per second.
        log(
            f"chat_stream: {plan.stream_requests} streams per target at concurrency "
            f"{plan.stream_concurrency}, {plan.rounds} alternating rounds"
        )
        conc = {t.name: Tally() for t in targets}
        per_round = math.ceil(plan.stream_requests / plan.rounds)
        deadline = time.monotonic() + 120
        for t in abba(targets, plan.rounds):

            async def call(t: Target = t) -> tuple[bool, float, float, str]:
                r = await one_stream(http, t, expected)
                return r.ok, r.total, r.ttfe, r.problem

            await closed_loop(per_round, plan.stream_concurrency, deadline, call, conc[t.name], t.pid)
        m, b = conc["morgana"], conc["baseline"]
        res.add(
            "chat_stream",
            "throughput",
            m.rate,
            b.rate,
            "streams/s",
            n=m.done,
            concurrency=plan.stream_concurrency,
            round_spread={
                "morgana": [rounded(min(m.round_rates), 2), rounded(max(m.round_rates), 2)],
                "baseline": [rounded(min(b.round_rates), 2), rounded(max(b.round_rates), 2)],
            },
        )
        res.add("chat_stream", "tokens_per_second", m.rate * REPLY_TOKENS, b.rate * REPLY_TOKENS, "tokens/s")
        for q in (50, 95):
            res.add(
                "chat_stream",
                f"loaded_ttfe_p{q}",
                1000 * percentile(m.ttfes, q),
                1000 * percentile(b.ttfes, q),
                "ms",
            )
        res.add("chat_stream", "server_cpu_per_stream", m.cpu_ms_per_request, b.cpu_ms_per_request, "ms")
        res.add(
            "chat_stream",
            "errors",
            m.errors,
            b.errors,
            "count",
            problems={"morgana": m.problems, "baseline": b.problems} if m.errors or b.errors else None,
        )


@dataclass
class OpenRun:
    results: list[StreamResult]
    peak_open: int
    peak_gauge: float | None
    peak_db_checked_out: float | None
    steady_db_checked_out: float | None
    rss_before: int
    rss_peak: int
    rss_after: int
    all_open_after: float
    wall: float


async def open_many(target: Target, count: int, expected_events: int) -> OpenRun:
    """Open `count` streams at once; sample server RSS and (Morgana) /metrics while they run."""
    open_now = closed_count = rejected = 0
    peak = {"open": 0, "gauge": None, "db": None, "db_steady": None, "rss": 0}
    first_event_times: list[float] = []
    all_done = asyncio.Event()

    def opened() -> None:
        nonlocal open_now
        open_now += 1
        peak["open"] = max(peak["open"], open_now)

    def closed() -> None:
        nonlocal open_now, closed_count
        open_now -= 1
        closed_count += 1

    def steady() -> bool:
        """Every stream has had content and none has ended: all are mid-stream."""
        return closed_count == 0 and len(first_event_times) + rejected == count

    await asyncio.sleep(1.0)
    rss_before = rss_kib(target.pid)
    peak["rss"] = rss_before

    async def sampler() -> None:
        async with client_session(2, timeout=5) as probe:
            while not all_done.is_set():
                peak["rss"] = max(peak["rss"], rss_kib(target.pid))
                if target.name == "morgana":
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        was_steady = steady()
                        async with probe.get(target.url + "/metrics") as resp:
                            text = await resp.text()
                        gauge = metric_value(text, "morgana_api_chat_streams_open")
                        db = metric_value(text, "morgana_api_db_pool_checked_out")
                        if gauge is not None:
                            peak["gauge"] = max(peak["gauge"] or 0.0, gauge)
                        if db is not None:
                            peak["db"] = max(peak["db"] or 0.0, db)
                            if was_steady and steady():
                                peak["db_steady"] = max(peak["db_steady"] or 0.0, db)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_done.wait(), 0.25)

    started = time.perf_counter()
    async with client_session(count + 100, timeout=90) as http:
        sampling = asyncio.create_task(sampler())

        async def run_one() -> StreamResult:
            def opened_with_content() -> None:
                first_event_times.append(time.perf_counter() - started)

            nonlocal rejected
            r = await one_stream(http, target, expected_events, opened, closed, opened_with_content)
            if r.status != 200:  # refused (or failed) before it opened
                rejected += 1
            return r

        try:
            results = await asyncio.gather(*(run_one() for _ in range(count)))
        finally:
            all_done.set()
            await sampling
    wall = time.perf_counter() - started
    await asyncio.sleep(1.0)
    return OpenRun(
        results=results,
        peak_open=peak["open"],
        peak_gauge=peak["gauge"],
        peak_db_checked_out=peak["db"],
        steady_db_checked_out=peak["db_steady"],
        rss_before=rss_before,
        rss_peak=peak["rss"],
        rss_after=rss_kib(target.pid),
        all_open_after=max(first_event_times, default=math.nan),
        wall=wall,
    )


async def bench_open_streams(
    res: Results, plan: Plan, targets: list[Target], fake: FakeOpenAIProcess, morgana_tokens: SessionPool
) -> None:
    n = plan.open_streams
    fake.set_scenario(tokens=plan.open_tokens, delay_ms=plan.open_delay_ms)
    expected = plan.open_tokens + 1
    runs: dict[str, OpenRun] = {}
    for t in targets:
        log(
            f"open_streams: {n} concurrent streams to {t.name} "
            f"({plan.open_tokens} tokens x {plan.open_delay_ms} ms)"
        )
        if t.name == "morgana":  # one fresh session per stream, created beforehand
            tokens = [morgana_tokens.take() for _ in range(n)]
            t.stream_headers = lambda tokens=tokens: {"Authorization": f"Bearer {tokens.pop()}"}
        runs[t.name] = await open_many(t, n, expected)
    fake.set_scenario(tokens=REPLY_TOKENS)
    m, b = runs["morgana"], runs["baseline"]

    def errors(run: OpenRun) -> tuple[int, dict[str, int]]:
        problems: dict[str, int] = {}
        for r in run.results:
            if not r.ok:
                key = r.problem.split(":")[0][:60]
                problems[key] = problems.get(key, 0) + 1
        return sum(problems.values()), problems

    (me, mp), (be, bp) = errors(m), errors(b)
    res.add(
        "open_streams",
        "errors",
        me,
        be,
        "count",
        streams=n,
        problems={"morgana": mp, "baseline": bp} if me or be else None,
    )
    res.add("open_streams", "peak_open_client_side", m.peak_open, b.peak_open, "streams", streams=n)
    res.add(
        "open_streams",
        "peak_open_server_gauge",
        m.peak_gauge,
        None,
        "streams",
        note="morgana_api_chat_streams_open from /metrics; the baseline has no such gauge",
    )
    res.add(
        "open_streams",
        "peak_db_pool_checked_out",
        m.peak_db_checked_out,
        None,
        "connections",
        note="max morgana_api_db_pool_checked_out during the run, incl. ramp-up and the "
        "end-of-stream history writes (pool is 10+10)",
    )
    res.add(
        "open_streams",
        "mid_stream_db_pool_checked_out",
        m.steady_db_checked_out,
        None,
        "connections",
        note="max while every stream was open and mid-reply (should be 0)",
    )
    res.add(
        "open_streams",
        "all_open_after",
        1000 * m.all_open_after,
        1000 * b.all_open_after,
        "ms",
        note="time until every stream that opened had its first content event",
    )
    for q in (50, 95):
        mt = [r.ttfe for r in m.results if r.ok]
        bt = [r.ttfe for r in b.results if r.ok]
        res.add("open_streams", f"ttfe_p{q}", 1000 * percentile(mt, q), 1000 * percentile(bt, q), "ms")
    ideal = (plan.open_tokens - 1) * plan.open_delay_ms
    res.add(
        "open_streams",
        "stream_time_p95",
        1000 * percentile([r.total for r in m.results if r.ok], 95),
        1000 * percentile([r.total for r in b.results if r.ok], 95),
        "ms",
        note=f"ideal is ~{ideal} ms (model pacing)",
    )
    res.add("open_streams", "rss_before", m.rss_before, b.rss_before, "KiB")
    res.add("open_streams", "rss_peak", m.rss_peak, b.rss_peak, "KiB")
    res.add(
        "open_streams",
        "rss_per_open_stream",
        (m.rss_peak - m.rss_before) / m.peak_open if m.peak_open else None,
        (b.rss_peak - b.rss_before) / b.peak_open if b.peak_open else None,
        "KiB/stream",
    )
    res.add(
        "open_streams",
        "rss_after_close_growth",
        m.rss_after - m.rss_before,
        b.rss_after - b.rss_before,
        "KiB",
        note="RSS 1 s after all streams closed minus before",
    )


# --------------------------------------------------------------------------- setup & main


class Baseline:
    """bench/baseline_app.py under uvicorn in its own process."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env, self.log_path = env, log_path
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Baseline:
        env = {
            **os.environ,
            **self.env,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "bench.baseline_app:app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"baseline exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"baseline did not become healthy in {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(FileNotFoundError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def morgana_env(
    pg: EmbeddedPostgres, valkey: EmbeddedValkey, fake: FakeOpenAIProcess, model_key: str
) -> dict[str, str]:
    env = {
        "ENVIRONMENT": "test",
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": pg.url(),
        "REDIS_URL": valkey.url,
        "JWT_SECRET_KEY": secrets.token_hex(32),
        "OPENAI_API_KEY": model_key,
        "OPENAI_BASE_URL": fake.base_url,
        "LLM_MODEL": MODEL,
        "LLM_TIMEOUT_SECONDS": "30",
        "LLM_MAX_RETRIES": "0",  # a failure must show up as an error, not a silent retry
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",  # tracing off
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name in LIMIT_NAMES:
        env[f"RATE_LIMIT_{name.upper()}"] = RATE
    return env


def api_log_problems(path: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return [
            line
            for line in path.read_text(errors="replace").splitlines()
            if '"level": "ERROR"' in line
            or '"level": "CRITICAL"' in line
            or "Traceback" in line
            or "TimeoutError" in line
        ]
    return []


async def run_benchmarks(
    res: Results, plan: Plan, api: ApiProcess, baseline: Baseline, fake: FakeOpenAIProcess
) -> None:
    assert api.process is not None and baseline.process is not None
    async with client_session(16) as http:
        email = f"bench-{uuid.uuid4().hex[:12]}@example.com"
        async with http.post(
            f"{api.url}/api/v1/auth/register", json={"email": email, "password": PASSWORD}
        ) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"register failed: {resp.status} {body}")
        user_token = body["token"]["access_token"]
        # Chat sessions for every Morgana stream phase, created before any timing starts.
        rotations = (plan.ttfe_pairs + plan.stream_requests) // SESSION_ROTATE_EVERY
        needed = rotations + plan.stream_concurrency * (plan.rounds + 1) + 20 + plan.open_streams
        log(f"creating {needed} Morgana chat sessions for the stream benchmarks")
        pool = SessionPool(await create_sessions(http, api.url, user_token, needed))

    morgana = Target(
        "morgana",
        api.url,
        api.process.pid,
        "/api/v1/auth/session",
        "/api/v1/chatbot/chat/stream",
        session_headers={"Authorization": f"Bearer {user_token}"},
    )
    base = Target("baseline", baseline.url, baseline.process.pid, "/session", "/chat/stream")
    targets = [morgana, base]

    await bench_sessions(res, plan, targets)

    # Each load worker (task) has its own chat session, replaced every SESSION_ROTATE_EVERY turns.
    morgana.stream_headers = rotating_headers(pool)
    await bench_chat(res, plan, targets, fake)

    await bench_open_streams(res, plan, targets, fake, pool)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (~1 minute)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    raise_fd_limit()

    res = Results()
    res.emit(
        {
            "bench": "meta",
            "command": COMMAND + (" --quick" if args.quick else ""),
            "make": "make bench" + (" BENCH_ARGS=--quick" if args.quick else ""),
            "quick": args.quick,
            "cores": os.cpu_count(),
            "cpu": cpu_model(),
            "mem_total_mib": mem_total_mib(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "platform": platform.platform(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
    )

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="morgana-bench-"))
    model_key = "sk-bench-" + secrets.token_hex(8)
    failed = False
    api = baseline = fake = None  # type: ignore[assignment]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        try:
            log("starting Postgres, Valkey and the fake model server")
            pg, valkey, fake = start_services(stack, workdir, model_key)

            env = morgana_env(pg, valkey, fake, model_key)
            log("migrating")
            migrate(env)
            api = ApiProcess(env, workdir / "api.log", workers=1)
            stack.callback(api.stop)
            api.start()
            baseline = Baseline(
                {
                    "BASELINE_DATABASE_URL": "postgresql+psycopg" + pg.url()[len("postgresql") :],
                    "BASELINE_MODEL_URL": fake.base_url,
                    "BASELINE_MODEL_KEY": model_key,
                    "BASELINE_MODEL_NAME": MODEL,
                    "NO_PROXY": "127.0.0.1,localhost",
                },
                workdir / "baseline.log",
            )
            stack.callback(baseline.stop)
            baseline.start()
            log(
                f"morgana {api.url} (pid {api.process.pid}), baseline {baseline.url} "
                f"(pid {baseline.process.pid}), setup {time.monotonic() - began:.1f} s"
            )

            runner = _uvloop_run()
            runner(run_benchmarks(res, plan, api, baseline, fake))

            problems = api_log_problems(api.log_path)
            res.emit(
                {
                    "bench": "meta",
                    "api_log_error_lines": len(problems),
                    "api_log_sample": problems[:5],
                    "fake_model_stats": fake.stats(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "seconds": round(time.monotonic() - began, 1),
                }
            )
            if problems:
                log(f"the API logged {len(problems)} error lines, e.g.:\n" + "\n".join(problems[:5]))
        except KeyboardInterrupt:
            failed = True
            log("interrupted; stopping everything")
        except Exception as exc:  # noqa: BLE001 - report any failure, then clean up
            failed = True
            log(f"FAILED: {type(exc).__name__}: {exc}")
            for name, proc in (("api", api), ("baseline", baseline)):
                with contextlib.suppress(Exception):
                    log(f"{name} log tail:\n{proc.log_tail()}")
            with contextlib.suppress(Exception):
                alive = fake._process is not None and fake._process.poll() is None
                log(f"fake model server alive={alive}; stderr:\n{fake._stderr_text()[-3000:]}")
        finally:
            res.write(RESULTS)
    print(flush=True)
    print(res.table(), flush=True)
    for line in res.lines:
        if line.get("problems"):
            print(f"  {line['bench']}/{line['metric']}: {json.dumps(line['problems'])}", flush=True)
        if line.get("api_log_error_lines"):
            print(
                f"  API log: {line['api_log_error_lines']} error lines, first: "
                f"{line['api_log_sample'][0][:200]}",
                flush=True,
            )
    print(
        f"\n(results in {RESULTS.relative_to(REPO)}; total {time.monotonic() - began:.0f} s; "
        "ratio = morgana / baseline)",
        flush=True,
    )
    return 1 if failed else 0


def _uvloop_run() -> Callable[[Awaitable[None]], None]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run  # type: ignore[return-value]
    return uvloop.run  # type: ignore[return-value]


if __name__ == "__main__":
    raise SystemExit(main())
