"""The API benchmark's load driver: the two targets, one timed request, closed-loop load and its tallies.

Both targets (Morgana and the baseline) get the same aiohttp client. A chat stream is timed to its
first content event and checked: it must end with `done: true`, carry no error and (when given)
the expected number of events.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from bench.common import machine_busy_jiffies, tree_cpu_seconds

CHAT_BODY = {"messages": [{"role": "user", "content": "bench"}]}
SESSION_ROTATE_EVERY = 20  # fresh Morgana chat session every N turns (bounded history)


# --------------------------------------------------------------------------- small helpers


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


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
    expected_tokens: int | None,
    on_open: Callable[[], None] | None = None,
    on_close: Callable[[], None] | None = None,
    on_first: Callable[[], None] | None = None,
) -> StreamResult:
    """POST a chat stream; time the first content event; check it ends with done:true, no error,
    and (if given) that its text has `expected_tokens` words: an API may send several tokens in
    one event, so the events are counted but the text is what is checked."""
    started = time.perf_counter()
    result = StreamResult(ok=False)
    opened = False
    body = bytearray()
    try:
        async with http.post(target.url + target.stream_path, json=CHAT_BODY, headers=target.stream_headers()) as resp:
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
            async for chunk in resp.content.iter_any():
                result.events += (carry + chunk).count(b"data:")
                carry = chunk[-4:]
                body += chunk
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
    data_lines = [ln.rstrip(b"\r") for ln in bytes(body).split(b"\n") if ln.startswith(b"data:")]
    try:
        events = [json.loads(line[5:]) for line in data_lines]
    except ValueError:
        events = []
    last = events[-1] if events else {}
    words = len("".join(str(event.get("content", "")) for event in events).split())
    if last.get("error") or b"event: error" in body:
        result.problem = f"error event: {last.get('error')}"
    elif last.get("done") is not True:
        result.problem = "stream ended without done:true"
    elif math.isnan(result.ttfe):
        result.problem = "no content event"
    elif expected_tokens is not None and words != expected_tokens:
        result.problem = f"{words} words in {result.events} events, expected {expected_tokens}"
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
    cpu: float = 0.0  # of the target's process tree
    machine_busy: int = 0  # jiffies of every core, busy and in all, over its rounds
    machine_total: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfes: list[float] = field(default_factory=list)
    round_rates: list[float] = field(default_factory=list)
    problems: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed else math.nan

    @property
    def machine_busy_percent(self) -> float:
        return 100 * self.machine_busy / self.machine_total if self.machine_total else math.nan

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

    cpu0, t0, machine0 = tree_cpu_seconds(pid), time.perf_counter(), machine_busy_jiffies()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    tally.cpu += tree_cpu_seconds(pid) - cpu0
    machine1 = machine_busy_jiffies()
    tally.machine_busy += machine1[0] - machine0[0]
    tally.machine_total += machine1[1] - machine0[1]
    tally.elapsed += elapsed
    tally.done += finished
    tally.round_rates.append(finished / elapsed if elapsed else math.nan)


def abba(targets: list[Target], rounds: int) -> list[Target]:
    """Alternate the two targets A B B A A B ... so slow drift hits both alike."""
    order: list[Target] = []
    for r in range(rounds):
        order += targets if r % 2 == 0 else targets[::-1]
    return order
