"""What the voice benchmark measures besides the callers' ears: counters over a measurement window (the
worker's histograms and log warnings, CPU of the worker, the cores and the other services, this
process's loop lag, the worker's memory at the window's end) and the API's own chat latency, asked
for directly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
import uuid
from dataclasses import dataclass

import httpx

from bench.common import logger, ms, percentile, rounded
from bench.voice_settings import METRIC_PREFIX, STAGES, TRANSCRIPT
from bench.voice_system import LoopLag, Stack, core_times, core_util, process_cpu

PASSWORD = "A_Strong_Password123!"
log = logger("voice-bench")


def parse_metrics(text: str) -> dict[str, float]:
    """`name -> value` for every sample line, summed over label sets."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Per stage: count and mean (seconds) of the observations made between two scrapes."""
    out: dict[str, dict[str, float | None]] = {}
    for histogram, label in STAGES:
        base = METRIC_PREFIX + histogram
        count = after.get(base + "_count", 0.0) - before.get(base + "_count", 0.0)
        total = after.get(base + "_sum", 0.0) - before.get(base + "_sum", 0.0)
        out[label] = {"count": int(count), "mean_s": total / count if count > 0 else None}
    return out


@dataclass
class Window:
    """Counters at the start of a measurement window."""

    started: float
    metrics: dict[str, float]
    worker_cpu: float
    worker_main_cpu: float
    cores: dict[str, tuple[int, int]]
    others: dict[str, float]
    log_offset: int


# Agent log lines counted per window: signs of a starved job process.
AGENT_WARNINGS = {
    "vad_slower_than_realtime": "VAD inference is slower than realtime",
    "event_loop_blocked": "event loop blocked",
}
PROBE_INTERVAL_S = 2.0  # a direct API chat request every this often while calls run
SESSION_TURNS = 12  # a chat session is used for this many direct requests (bounded history)


class Meter:
    """Counters at the start of a window (`open`) and what changed by its end (`close`)."""

    def __init__(self, stack: Stack, lag: LoopLag, probes: list[tuple[float, float | None]]) -> None:
        self.stack = stack
        self.lag = lag
        self.probes = probes  # the API probe's (time, ttfe or None on error), filled while calls run
        self.http = httpx.AsyncClient(timeout=10)

    async def scrape(self) -> dict[str, float]:
        response = await self.http.get(f"http://127.0.0.1:{self.stack.worker.metrics_port}/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)

    def other_pids(self) -> dict[str, int | None]:
        fake = self.stack.fake._process  # its pid, for CPU accounting
        return {
            "livekit": self.stack.livekit.pid,
            "api": self.stack.api.process.pid if self.stack.api.process else None,
            "fake_openai": fake.pid if fake else None,
            "valkey": self.stack.valkey.process.pid if self.stack.valkey.process else None,
            "bench": os.getpid(),
        }

    def agent_log_size(self) -> int:
        with contextlib.suppress(OSError):
            return self.stack.worker.log_path.stat().st_size
        return 0

    def agent_warnings(self, offset: int) -> dict[str, int]:
        with self.stack.worker.log_path.open("rb") as log_file:
            log_file.seek(offset)
            text = log_file.read().decode(errors="replace")
        return {name: text.count(needle) for name, needle in AGENT_WARNINGS.items()}

    async def open(self) -> Window:
        tree = self.stack.tree
        tree.sample()
        return Window(
            time.monotonic(),
            await self.scrape(),
            tree.total(),
            tree.root_total(),
            core_times(),
            {name: process_cpu(pid) for name, pid in self.other_pids().items()},
            self.agent_log_size(),
        )

    async def close(self, window: Window) -> dict:
        tree = self.stack.tree
        tree.sample()
        ended = time.monotonic()
        elapsed = ended - window.started
        metrics = await self.scrape()
        others = {
            name: rounded(100 * (process_cpu(pid) - window.others.get(name, 0.0)) / elapsed, 1)
            for name, pid in self.other_pids().items()
        }
        lags = self.lag.between(window.started, ended)
        probes = [ttfe for t, ttfe in self.probes if window.started <= t < ended]
        probe_ok = [ttfe for ttfe in probes if ttfe is not None]
        return {
            "ended": ended,
            "seconds": elapsed,
            "stages": stage_means(window.metrics, metrics),
            "worker_cpu_s": tree.total() - window.worker_cpu,
            "worker_main_cpu_s": tree.root_total() - window.worker_main_cpu,
            "core_util_pct": core_util(window.cores, core_times()),
            "other_cpu_pct_of_core": others,
            "loop_lag_p99_ms": rounded(ms(percentile(lags, 99)), 1),
            "loop_lag_max_ms": rounded(ms(max(lags)) if lags else None, 1),
            "worker_processes": tree.processes(),
            "worker_memory": await asyncio.to_thread(tree.memory),
            "agent_warnings": self.agent_warnings(window.log_offset),
            "api_probe": {
                "n": len(probe_ok),
                "errors": len(probes) - len(probe_ok),
                "p50_ms": rounded(ms(percentile(probe_ok, 50)), 1),
                "max_ms": rounded(ms(max(probe_ok)) if probe_ok else None, 1),
            },
        }

    async def sample_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.stack.tree.sample()

    async def aclose(self) -> None:
        await self.http.aclose()


class ApiProbe:
    """The API's chat time to first event, asked for directly from this process (raw SSE requests
    with a session token): a sequence with no call running, and a request every PROBE_INTERVAL_S
    while calls run."""

    def __init__(self, api_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=api_url, timeout=30)
        self.user_token = ""
        self.ttfes: list[float] = []
        self.ttfe_errors = 0
        self.probes: list[tuple[float, float | None]] = []  # (time, ttfe or None on error)

    async def new_session_token(self) -> str:
        headers = {"Authorization": f"Bearer {self.user_token}"}
        response = await self.http.post("/api/v1/auth/session", headers=headers)
        response.raise_for_status()
        return response.json()["token"]["access_token"]

    async def chat_ttfe(self, session_token: str) -> float | None:
        """One chat stream: seconds to the first content event; None unless it ends with done."""
        started = time.perf_counter()
        first, done = math.nan, False
        async with self.http.stream(
            "POST",
            "/api/v1/chatbot/chat/stream",
            json={"messages": [{"role": "user", "content": TRANSCRIPT}]},
            headers={"Authorization": f"Bearer {session_token}"},
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return None
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = json.loads(line[5:])
                if data.get("error"):
                    return None
                if data.get("content") and math.isnan(first):
                    first = time.perf_counter() - started
                done = done or data.get("done") is True
        return first if done and math.isfinite(first) else None

    async def sequential(self, requests: int) -> None:
        """`requests` chat streams one after another (after 3 warm-up ones), into `ttfes`.

        Measured before any call starts (an idle worker), reported after the one-call run.
        """
        log(f"api_chat: {requests} sequential chat streams (+3 warm-up)")
        email = f"bench-{uuid.uuid4().hex[:12]}@example.com"
        response = await self.http.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
        response.raise_for_status()
        self.user_token = response.json()["token"]["access_token"]
        token = ""
        for i in range(requests + 3):
            if i % SESSION_TURNS == 0:
                token = await self.new_session_token()
            ttfe = await self.chat_ttfe(token)
            if i < 3:
                continue
            if ttfe is None:
                self.ttfe_errors += 1
            else:
                self.ttfes.append(ttfe)

    async def probe_forever(self) -> None:
        """While calls run: a direct chat request every PROBE_INTERVAL_S (the API under that load)."""
        token, used = "", SESSION_TURNS
        while True:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                if used >= SESSION_TURNS:
                    token, used = await self.new_session_token(), 0
                used += 1
                self.probes.append((time.monotonic(), await self.chat_ttfe(token)))
            except httpx.HTTPError:
                self.probes.append((time.monotonic(), None))

    async def aclose(self) -> None:
        await self.http.aclose()
