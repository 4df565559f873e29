"""The voice benchmark's view of the machine: CPU pinning, per-core and per-process CPU from /proc, the agent
worker pinned to its core and its process tree, this process's event-loop lag, and the processes of a run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.common import cpu_seconds, logger, rounded
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker, ApiProcess
from morgana_devtools.services import EmbeddedValkey

log = logger("voice-bench")


def pin_this_process(core: int) -> None:
    """Every thread of this process onto `core`; children started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), {core})


def core_times() -> dict[str, tuple[int, int]]:
    """Per CPU (`cpu0`, `cpu1`, ...): (busy jiffies, total jiffies) from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]
            out[name] = (sum(numbers) - idle, sum(numbers))
    return out


def core_util(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    util = {}
    for name, (busy, total) in after.items():
        b0, t0 = before.get(name, (0, 0))
        util[name] = rounded(100 * (busy - b0) / (total - t0), 1) if total > t0 else None
    return util


def process_cpu(pid: int | None) -> float:
    """user + system CPU seconds of one process so far (0 if gone)."""
    if pid is None:
        return 0.0
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return 0.0


# --------------------------------------------------------------------------- processes


class PinnedAgentWorker(AgentWorker):
    """`AgentWorker` run under `taskset -c <core>`: the worker and its job processes use one core."""

    def __init__(self, env: dict[str, str], log_path: Path, core: int) -> None:
        super().__init__(env, log_path)
        self.core = core
        self.command = ["taskset", "-c", str(core), *self.command]


class ProcessTree:
    """CPU seconds of a process and all its descendants, including ones that come and go."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> cpu seconds
        self.known: dict[tuple[int, float], psutil.Process] = {}

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
            except psutil.Error:
                continue
            self.known[key] = proc
            self.seen[key] = times.user + times.system

    def total(self) -> float:
        return sum(self.seen.values())

    def root_total(self) -> float:
        """The worker process alone (its job processes excluded)."""
        return sum(cpu for (pid, _), cpu in self.seen.items() if pid == self.root.pid)

    def processes(self) -> int:
        return sum(1 for proc in self.known.values() if _alive(proc))

    def leftovers(self) -> list[psutil.Process]:
        return [proc for proc in self.known.values() if _alive(proc)]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_leftovers(tree: ProcessTree | None) -> None:
    """Processes of the worker's tree (ours, by pid) still alive 3 s after it exited: end them."""
    if tree is None:
        return
    _, procs = psutil.wait_procs(tree.leftovers(), timeout=3)
    described = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    if procs:
        log(f"stopped {len(procs)} worker processes still running 3 s after the worker exited: {described}")


class LoopLag:
    """How late this process's event loop wakes up (the callers' timestamps are only as good)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            now = time.monotonic()
            self.samples.append((now, now - before - self.interval))

    def between(self, start: float, end: float) -> list[float]:
        return [lag for t, lag in self.samples if start <= t < end]


@dataclass
class Stack:
    api: ApiProcess
    worker: PinnedAgentWorker
    livekit: LiveKitServer
    fake: FakeOpenAIProcess
    valkey: EmbeddedValkey
    model_key: str
    tree: ProcessTree
