"""One voice benchmark run: the idle worker and the API alone, one call, then calls added level by level.

`VoiceBench` drives the collaborators: `Calls` (the callers in their rooms), `Meter` (counters over
each measurement window), `ApiProbe` (the API asked directly) and `VoiceReport` (the result lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from bench.common import logger
from bench.voice_callers import Calls
from bench.voice_measure import ApiProbe, Meter
from bench.voice_report import Results, VoiceReport
from bench.voice_settings import GAP_JITTER_S, GAP_S, Plan
from bench.voice_system import LoopLag, Stack

log = logger("voice-bench")


class VoiceBench:
    def __init__(self, res: Results, plan: Plan, stack: Stack) -> None:
        self.plan = plan
        self.stack = stack
        self.report = VoiceReport(res, plan)
        self.calls = Calls(stack.api.url)
        self.lag = LoopLag()
        self.api = ApiProbe(stack.api.url)
        self.meter = Meter(stack, self.lag, self.api.probes)
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        await self.calls.prepare(self.stack.fake, self.stack.model_key)
        self.tasks += [asyncio.create_task(self.lag.run()), asyncio.create_task(self.meter.sample_forever())]
        try:
            window = await self.meter.open()
            await self.api.sequential(self.plan.ttfe_requests)
            await asyncio.sleep(max(0.0, window.started + 3.0 - time.monotonic()))
            idle = await self.meter.close(window)
            self.tasks.append(asyncio.create_task(self.api.probe_forever()))
            await self.single_call()
            self.report.api_ttfe(self.api.ttfes, self.api.ttfe_errors)
            await self.capacity(idle)
        finally:
            await self.shutdown()

    # ---- part 1: one call

    async def single_call(self) -> None:
        log(f"voice_turn: one call, 1 warm-up turn + {self.plan.single_turns} measured turns")
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
        self.report.level(1, turns, counters, firsts, self.calls.agent_texts(1))

    # ---- part 2: calls per core

    async def capacity(self, idle: dict) -> None:
        self.report.idle(idle)
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
