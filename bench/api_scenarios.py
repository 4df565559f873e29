"""The API benchmark's scenarios, each run against Morgana and the baseline alike.

1. session_create  POST /api/v1/auth/session  vs  POST /session (one INSERT)
2. chat_stream     POST /api/v1/chatbot/chat/stream  vs  POST /chat/stream (relay of the model's
                   SSE), 200-token replies: time to first event (sequential) and streams/s (c=8)
3. open_streams    N concurrent long-lived streams (500; --quick 100): errors, peak open,
                   server RSS per open stream
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp

from bench.api_load import (
    SessionPool,
    StreamResult,
    Tally,
    Target,
    abba,
    client_session,
    closed_loop,
    metric_value,
    one_session,
    one_stream,
    rss_kib,
)
from bench.api_report import Results
from bench.common import logger, percentile, rounded, tree_cpu_seconds
from bench.cpu_quota import CpuQuotas, server_workers

if TYPE_CHECKING:
    from morgana_devtools.openai_server import FakeOpenAIProcess

REPLY_TOKENS = 200
log = logger("bench")


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
    open_streams_large: int = 0  # a second, larger burst (0: none)
    # A burst of full-length replies, on fresh server processes (0: none): a process keeps the
    # memory of its largest burst so far, so after the bursts above it would show no growth.
    open_streams_long: int = 0
    long_tokens: int = 200
    long_delay_ms: int = 40
    scaling_workers: int = 2  # gunicorn workers measured against one (0: not measured)
    # ... and again with this CPU quota per worker (0: not), leaving the load the rest.
    scaling_quota_cores: float = 0.4


FULL = Plan(2000, 16, 100, 400, 8, 500, 20, 500, 4, 60, open_streams_large=2000, open_streams_long=200)
QUICK = Plan(300, 16, 20, 60, 8, 100, 10, 400, 2, 20, open_streams_long=100)


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
    expected = REPLY_TOKENS
    async with client_session(plan.stream_concurrency) as http:
        for t in targets:  # warm-up
            for _ in range(max(3, plan.warmup // 6)):
                r = await one_stream(http, t, expected)
                if not r.ok:
                    raise RuntimeError(f"{t.name} warm-up stream failed: {r.problem}")

        # Sequential: time to first content event, and whole-stream time, with no contention.
        log(f"chat_stream: {plan.ttfe_pairs} sequential streams per target (alternating)")
        seq = {t.name: Tally() for t in targets}
        events: dict[str, list[float]] = {
            t.name: [] for t in targets
        }  # per stream: the API may send several tokens per event
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
                    events[t.name].append(r.events)
                else:
                    seq[t.name].note(r.problem)
        m, b = seq["morgana"], seq["baseline"]
        for q in (50, 95):
            mv, bv = 1000 * percentile(m.ttfes, q), 1000 * percentile(b.ttfes, q)
            res.add("chat_stream", f"ttfe_p{q}", mv, bv, "ms", overhead_ms=rounded(mv - bv), n=m.done)
        mv, bv = 1000 * percentile(m.latencies, 50), 1000 * percentile(b.latencies, 50)
        res.add("chat_stream", "stream_time_p50", mv, bv, "ms", overhead_ms=rounded(mv - bv), tokens=REPLY_TOKENS)
        me, be = (percentile(events[name], 50) for name in ("morgana", "baseline"))
        res.add("chat_stream", "events_per_stream_p50", me, be, "events", tokens=REPLY_TOKENS)
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
    cpu_seconds: float  # the server's, from the first stream opened to the last closed


async def open_many(target: Target, count: int, expected_tokens: int, reply_seconds: float = 0.0) -> OpenRun:
    """Open `count` streams at once; sample server RSS and (Morgana) /metrics while they run.

    `reply_seconds` (the model's pacing of a whole reply) bounds "mid-reply": the streams that
    began first end, and store their turns, about that long after their first event."""
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
        """Every stream has had content and none is near its end: all are mid-reply."""
        if closed_count or len(first_event_times) + rejected < count:
            return False
        return time.perf_counter() - started < min(first_event_times, default=0.0) + 0.8 * reply_seconds

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
    cpu_before = tree_cpu_seconds(target.pid)
    async with client_session(count + 100, timeout=90) as http:
        sampling = asyncio.create_task(sampler())

        async def run_one() -> StreamResult:
            def opened_with_content() -> None:
                first_event_times.append(time.perf_counter() - started)

            nonlocal rejected
            r = await one_stream(http, target, expected_tokens, opened, closed, opened_with_content)
            if r.status != 200:  # refused (or failed) before it opened
                rejected += 1
            return r

        try:
            results = await asyncio.gather(*(run_one() for _ in range(count)))
        finally:
            all_done.set()
            await sampling
    wall = time.perf_counter() - started
    cpu_seconds = tree_cpu_seconds(target.pid) - cpu_before
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
        cpu_seconds=cpu_seconds,
    )


async def bench_open_streams(
    res: Results,
    plan: Plan,
    targets: list[Target],
    fake: FakeOpenAIProcess,
    morgana_tokens: SessionPool,
    n: int,
    name: str = "open_streams",
    reply_tokens: int | None = None,
    delay_ms: int | None = None,
) -> None:
    reply_tokens = reply_tokens or plan.open_tokens
    delay_ms = delay_ms or plan.open_delay_ms
    fake.set_scenario(tokens=reply_tokens, delay_ms=delay_ms)
    expected = reply_tokens
    runs: dict[str, OpenRun] = {}
    for t in targets:
        log(f"{name}: {n} concurrent streams to {t.name} ({reply_tokens} tokens x {delay_ms} ms)")
        if t.name == "morgana":  # one fresh session per stream, created beforehand
            tokens = [morgana_tokens.take() for _ in range(n)]
            t.stream_headers = lambda tokens=tokens: {"Authorization": f"Bearer {tokens.pop()}"}
        runs[t.name] = await open_many(t, n, expected, (reply_tokens - 1) * delay_ms / 1000)
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
        name,
        "errors",
        me,
        be,
        "count",
        streams=n,
        problems={"morgana": mp, "baseline": bp} if me or be else None,
    )
    res.add(name, "peak_open_client_side", m.peak_open, b.peak_open, "streams", streams=n)
    res.add(
        name,
        "peak_open_server_gauge",
        m.peak_gauge,
        None,
        "streams",
        note="morgana_api_chat_streams_open from /metrics; the baseline has no such gauge",
    )
    res.add(
        name,
        "peak_db_pool_checked_out",
        m.peak_db_checked_out,
        None,
        "connections",
        note="max morgana_api_db_pool_checked_out during the run, incl. ramp-up and the "
        "end-of-stream history writes (pool is 10+10)",
    )
    res.add(
        name,
        "mid_stream_db_pool_checked_out",
        m.steady_db_checked_out,
        None,
        "connections",
        note="max while every stream was open and mid-reply (should be 0)",
    )
    res.add(
        name,
        "all_open_after",
        1000 * m.all_open_after,
        1000 * b.all_open_after,
        "ms",
        note="time until every stream that opened had its first content event",
    )
    for q in (50, 95):
        mt = [r.ttfe for r in m.results if r.ok]
        bt = [r.ttfe for r in b.results if r.ok]
        res.add(name, f"ttfe_p{q}", 1000 * percentile(mt, q), 1000 * percentile(bt, q), "ms")
    ideal = (reply_tokens - 1) * delay_ms
    res.add(
        name,
        "stream_time_p95",
        1000 * percentile([r.total for r in m.results if r.ok], 95),
        1000 * percentile([r.total for r in b.results if r.ok], 95),
        "ms",
        note=f"ideal is ~{ideal} ms (model pacing)",
    )
    m_served, b_served = (sum(1 for r in run.results if r.ok) for run in (m, b))
    res.add(
        name,
        "server_cpu_per_stream",
        1000 * m.cpu_seconds / m_served if m_served else None,
        1000 * b.cpu_seconds / b_served if b_served else None,
        "ms",
        note=f"{reply_tokens} tokens {delay_ms} ms apart: each arrives in a read of its own, as from a real model",
    )
    res.add(name, "rss_before", m.rss_before, b.rss_before, "KiB")
    res.add(name, "rss_peak", m.rss_peak, b.rss_peak, "KiB")
    res.add(
        name,
        "rss_per_open_stream",
        (m.rss_peak - m.rss_before) / m.peak_open if m.peak_open else None,
        (b.rss_peak - b.rss_before) / b.peak_open if b.peak_open else None,
        "KiB/stream",
    )
    res.add(
        name,
        "rss_after_close_growth",
        m.rss_after - m.rss_before,
        b.rss_after - b.rss_before,
        "KiB",
        note="RSS 1 s after all streams closed minus before",
    )


async def bench_scaling(res: Results, plan: Plan, one: Target, many: Target, workers: int) -> None:
    """Chat streams per second of `workers` gunicorn workers against one uvicorn worker, the same
    load per worker (concurrency x workers), in alternating rounds: first as they are, then with
    an equal CPU quota per worker (when cgroups allow), which leaves the load cores of its own."""
    concurrency = plan.stream_concurrency * workers
    log(f"scaling: {plan.stream_requests} streams per target at concurrency {concurrency}, {workers} workers vs 1")
    s, m = await _scaling_rounds(plan, one, many, concurrency)
    res.add(
        "scaling",
        f"throughput_{workers}_workers",
        m.rate,
        s.rate,
        "streams/s",
        note=f"baseline column: one worker; target ratio >= {0.9 * workers:.1f} (0.9 x workers). The client, "
        "the model stand-in and Postgres share this machine's cores with the API",
        concurrency=concurrency,
        errors={many.name: m.errors, one.name: s.errors},
        machine_busy_percent={t.name: rounded(tally.machine_busy_percent, 1) for t, tally in ((many, m), (one, s))},
    )
    # What the raw ratio cannot show on a machine whose cores the load also needs: whether a
    # worker does the same work per stream beside another (no shared lock, pool or cache thrash).
    res.add(
        "scaling",
        f"cpu_per_stream_{workers}_workers",
        m.cpu_ms_per_request,
        s.cpu_ms_per_request,
        "ms",
        note="API CPU (all its processes) per stream; ratio ~1: a worker costs the same per stream beside "
        f"another, so on {workers} cores of their own {workers} workers would serve ~{workers}x",
    )
    if not plan.scaling_quota_cores:
        return
    if not CpuQuotas.available():
        log("scaling at equal CPU quotas: skipped (needs root and a cgroup cpu controller)")
        return
    quotas = CpuQuotas(plan.scaling_quota_cores)
    try:
        for pid in (*server_workers(one.pid), *server_workers(many.pid)):
            quotas.confine(pid)
        log(f"scaling: again with {plan.scaling_quota_cores} CPU per worker")
        s, m = await _scaling_rounds(plan, one, many, concurrency)
    finally:
        quotas.release()
    res.add(
        "scaling",
        f"throughput_{workers}_workers_equal_cpu",
        m.rate,
        s.rate,
        "streams/s",
        note=f"each worker held to {plan.scaling_quota_cores} CPU (a cgroup quota), so {workers} workers have "
        f"{workers}x one worker's CPU and the load keeps the rest of the machine: N workers on N cores "
        f"of their own, scaled down. Target ratio >= {0.9 * workers:.1f}",
        concurrency=concurrency,
        errors={many.name: m.errors, one.name: s.errors},
        machine_busy_percent={t.name: rounded(tally.machine_busy_percent, 1) for t, tally in ((many, m), (one, s))},
        # How much of its quota a worker used: ~100 % when the load keeps it busy, the case measured.
        quota_used_percent={
            t.name: rounded(100 * tally.cpu / (tally.elapsed * plan.scaling_quota_cores * n), 1)
            for t, tally, n in ((many, m, workers), (one, s, 1))
        },
    )
    res.add(
        "scaling",
        f"cpu_per_stream_{workers}_workers_equal_cpu",
        m.cpu_ms_per_request,
        s.cpu_ms_per_request,
        "ms",
        note="API CPU per stream, each worker held to its quota",
    )


async def _scaling_rounds(plan: Plan, one: Target, many: Target, concurrency: int) -> tuple[Tally, Tally]:
    tallies = {t.name: Tally() for t in (one, many)}
    per_round = math.ceil(plan.stream_requests / plan.rounds)
    deadline = time.monotonic() + 120
    async with client_session(concurrency) as http:
        for t in (one, many):
            for _ in range(3):
                await one_stream(http, t, REPLY_TOKENS)
        for t in abba([one, many], plan.rounds):

            async def call(t: Target = t) -> tuple[bool, float, float, str]:
                r = await one_stream(http, t, REPLY_TOKENS)
                return r.ok, r.total, r.ttfe, r.problem

            await closed_loop(per_round, concurrency, deadline, call, tallies[t.name], t.pid)
    return tallies[one.name], tallies[many.name]
