"""The voice benchmark's view of the machine: CPU pinning, per-core and per-process CPU from /proc, the agent
worker pinned to its core and its process tree (CPU and memory), this process's event-loop lag, and the
processes of a run."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
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


def pss_kib(pid: int) -> int | None:
    """Proportional set size of a process from /proc/<pid>/smaps_rollup (None if unreadable).

    RSS counts every page a process maps, so job processes forked from livekit-agents' forkserver
    each count the shared copy-on-write pages again; PSS splits shared pages among their sharers,
    so the PSS of the processes sums to the memory they take together."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return None


def mib(kib: float | None) -> float | None:
    return None if kib is None else rounded(kib / 1024, 1)


class ProcessTree:
    """CPU seconds of a process and all its descendants, including ones that come and go, and the
    memory of the ones alive."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> cpu seconds
        self.known: dict[tuple[int, float], psutil.Process] = {}

    def sample(self) -> None:
        for proc in [self.root, *self._children()]:
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

    def role(self, proc: psutil.Process) -> str:
        """main (the worker), forkserver (livekit-agents forks job processes from it), job, or
        another helper process by its command line."""
        if proc.pid == self.root.pid:
            return "main"
        command = " ".join(proc.cmdline())
        if "resource_tracker" in command:
            return "resource_tracker"
        if proc.ppid() == self.root.pid and "forkserver" in command:
            return "forkserver"
        return "job"

    def memory(self) -> dict:
        """RSS and PSS (MiB) of every live process of the tree and their sums; `pss_mib` is None
        unless every process's smaps_rollup was readable."""
        processes = []
        for proc in [self.root, *self._children()]:
            try:
                entry = {"pid": proc.pid, "role": self.role(proc), "rss_kib": proc.memory_info().rss // 1024}
            except psutil.Error:
                continue
            entry["pss_kib"] = pss_kib(proc.pid)
            processes.append(entry)
        pss = [p["pss_kib"] for p in processes]
        return {
            "rss_mib": mib(sum(p["rss_kib"] for p in processes)),
            "pss_mib": mib(sum(pss)) if pss and None not in pss else None,
            "processes": [
                {"pid": p["pid"], "role": p["role"], "rss_mib": mib(p["rss_kib"]), "pss_mib": mib(p["pss_kib"])}
                for p in processes
            ],
        }

    def _children(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return self.root.children(recursive=True)
        return []


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


@contextlib.contextmanager
def pinned_worker(env: dict[str, str], log_path: Path, core: int) -> Iterator[tuple[PinnedAgentWorker, ProcessTree]]:
    """An agent worker on `core` and its process tree; stopped (with any job process it leaves
    behind) on the way out, so the next configuration starts on a clean core."""
    worker = PinnedAgentWorker(env, log_path, core)
    tree: ProcessTree | None = None
    try:
        worker.start()
        assert worker.process is not None
        tree = ProcessTree(worker.process.pid)
        tree.sample()
        yield worker, tree
    finally:
        worker.stop(20.0)
        stop_leftovers(tree)


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
