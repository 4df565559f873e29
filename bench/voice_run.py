"""One configuration's run of the voice benchmark: the idle worker (and, for the capacity configuration,
the API alone), one call, then calls added level by level.

`VoiceBench` drives the collaborators: `Calls` (the callers in their rooms), `Meter` (counters over
each measurement window), `ApiProbe` (the API asked directly) and `VoiceReport` (the result lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from bench.common import logger
from bench.voice_callers import Calls
from bench.voice_measure import ApiProbe, Meter
from bench.voice_report import VoiceReport
from bench.voice_results import Results
from bench.voice_settings import GAP_JITTER_S, GAP_S, Plan, WorkerConfig
from bench.voice_system import LoopLag, Stack
from morgana_devtools.openai_server import FakeOpenAIProcess

log = logger("voice-bench")
IDLE_WINDOW_S = 3.0  # the idle worker's CPU is measured over at least this long
SETTLE_TIMEOUT_S = 30.0  # a new worker gets at most this long to become quiet
QUIET_CPU_S = 0.1  # quiet: its process tree used less than this much CPU in a second


@contextlib.asynccontextmanager
async def provider_delays(fake: FakeOpenAIProcess, delays_ms: dict[str, float]) -> AsyncIterator[None]:
    """The fake server's endpoints answer `delays_ms[endpoint]` late while inside; cleared after.

    Sticky per-endpoint scenarios: the callers' transcript is separate state (`set_transcript`)
    and nothing else here sets a sticky scenario, so there is nothing to merge with or restore."""
    for endpoint, delay in delays_ms.items():
        await asyncio.to_thread(fake.set_scenario, endpoint=endpoint, first_delay_ms=delay)
    try:
        yield
    finally:
        for endpoint in delays_ms:
            await asyncio.to_thread(fake.set_scenario, endpoint=endpoint)


class VoiceBench:
    def __init__(self, res: Results, plan: Plan, config: WorkerConfig, stack: Stack) -> None:
        self.plan = plan
        self.config = config
        self.stack = stack
        self.report = VoiceReport(res, config)
        self.calls = Calls(stack.api.url)
        self.lag = LoopLag()
        self.api = ApiProbe(stack.api.url)
        self.meter = Meter(stack, self.lag, self.api.probes)
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        await self.calls.prepare(self.stack.fake, self.stack.model_key)
        self.tasks += [asyncio.create_task(self.lag.run()), asyncio.create_task(self.meter.sample_forever())]
        try:
            await self.idle()
            async with provider_delays(self.stack.fake, self.config.provider_delays_ms):
                await self.single_call()
            if self.config.capacity:
                self.report.api_ttfe(self.api.ttfes, self.api.ttfe_errors)
                await self.capacity()
        finally:
            await self.shutdown()

    async def idle(self) -> None:
        """The idle worker's window (its CPU and memory); the capacity configuration also asks the
        API alone for chat streams in it, and from then on probes the API while calls run."""
        await self.settle()
        window = await self.meter.open()
        if self.config.capacity:
            await self.api.sequential(self.plan.ttfe_requests)
        await asyncio.sleep(max(0.0, window.started + IDLE_WINDOW_S - time.monotonic()))
        self.report.idle(await self.meter.close(window))
        if self.config.capacity:
            self.tasks.append(asyncio.create_task(self.api.probe_forever()))

    async def settle(self) -> None:
        """Wait until the new worker's process tree is quiet: each idle job process loads its
        models (the VAD, Smart Turn) once registered, which is not an idle worker's CPU or memory."""
        tree, began = self.stack.tree, time.monotonic()
        tree.sample()
        before = tree.total()
        while time.monotonic() < began + SETTLE_TIMEOUT_S:
            await asyncio.sleep(1.0)
            tree.sample()
            used, before = tree.total() - before, tree.total()
            if used < QUIET_CPU_S:
                break
        log(f"{self.config.name}: worker settled in {time.monotonic() - began:.1f} s ({tree.processes()} processes)")

    # ---- part 1: one call

    async def single_call(self) -> None:
        log(f"{self.config.name}: voice_turn: one call, 1 warm-up turn + {self.plan.single_turns} measured turns")
        firsts = await self.calls.ramp_to(1)
        talker = self.calls.talkers[0]
        window = await self.meter.open()
        deadline = time.monotonic() + self.plan.single_turns * (GAP_S + GAP_JITTER_S + 3) + 30
        while time.monotonic() < deadline:
            self.calls.check()
            if sum(1 for t in talker.turns if t.speech_end >= window.started) >= self.plan.single_turns:
                break
            await asyncio.sleep(0.2)
        end = time.monotonic()
        await self.calls.settle_replies(end)
        counters = await self.meter.close(window)
        turns = self.calls.turns(window.started, end)
        self.report.single(turns, counters, firsts[0])
        await self.report.timeline(turns, self.stack.fake)
        if self.config.capacity:
            self.report.level(1, turns, counters, firsts, self.calls.agent_texts(1))

    # ---- part 2: calls per core

    async def capacity(self) -> None:
        for calls in self.plan.levels[1:]:
            try:
                await self.capacity_level(calls)
            except RuntimeError as exc:  # a call broke: report it, keep the levels measured so far
                log(f"capacity: {calls} calls failed: {exc}")
                self.report.level_failed(calls, exc)
                break
        self.report.capacity(self.calls.first_turns)

    async def capacity_level(self, calls: int) -> None:
        log(f"capacity: ramping to {calls} concurrent calls")
        firsts = await self.calls.ramp_to(calls)
        await asyncio.sleep(1.0)
        self.calls.check()
        window = await self.meter.open()
        log(f"capacity: measuring {calls} calls for {self.plan.level_seconds:.0f} s")
        while time.monotonic() < window.started + self.plan.level_seconds:
            self.calls.check()
            await asyncio.sleep(0.25)
        end = time.monotonic()
        counters = await self.meter.close(window)
        await self.calls.settle_replies(end)
        turns = self.calls.turns(window.started, end)
        self.report.level(calls, turns, counters, firsts, self.calls.agent_texts(calls))

    # ---- the end

    async def shutdown(self) -> None:
        tasks = [*self.tasks, *self.calls.tasks()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.calls.leave()
        await self.meter.aclose()
        await self.api.aclose()
