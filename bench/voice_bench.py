"""Voice turn latency and calls per core of the agent worker, measured in one run on this machine.

    uv run python -m bench.voice_bench [--quick] [--min-endpointing-delay SECONDS]

Starts real Postgres and Valkey (from wheels), the fake OpenAI-protocol server (chat, speech to
text, text to speech, all with no added delay), a dedicated LiveKit server, the Morgana API
(one uvicorn worker) and ONE agent worker (`morgana-agent start`) pinned to CPU core 1 with
`taskset -c 1` (its job processes inherit the pin). This process and every other service are
pinned to core 0, so the worker has a core to itself (other tenants of a shared machine aside).
Callers are `morgana.devtools.voice_client.Caller`s: each joins through the API's token flow,
speaks real espeak-ng speech as its microphone (48 kHz, in real time) and records what it hears.

1. voice_turn  one call, 12 turns (--quick 4) after a warm-up turn: the latency a caller feels,
               from the end of its speech (when the last speech frame leaves the caller's audio
               source) to the onset of the agent's reply heard at the client, p50/p95, as
               overhead over the endpointing delay (MIN_ENDPOINTING_DELAY, the baseline). Broken
               down by stage with the worker's own Prometheus histograms (means of _sum/_count
               deltas over the same window) and on one clock with the arrival times of the
               worker's STT and TTS requests at the fake server.
2. api_chat    the API's chat time to first event, measured directly (raw SSE requests with a
               session token, no call running), to show how much of a turn is the API.
3. capacity    calls one worker sustains on one core: calls are added one after another, each
               taking a turn every 4.4-5.4 s, and for N = 1, 2, 4, 6, 8 (--quick 1, 2, 4) the turn
               latency p50/p95, missed and overlapped turns, the CPU of the worker and its job
               processes, the worker's stage means and the API's own latency (a direct request
               every 2 s) are measured. calls_per_core = the largest N (all smaller N passing
               too) whose p95 stays under MIN_ENDPOINTING_DELAY + 1.0 s with every turn answered
               before the caller speaks again.

Results: one JSON object per line on stdout and in bench-results/voice.jsonl (the first line is
the command and machine info), then two tables. Progress goes to stderr. Every process started
here is stopped in `finally` blocks. VOICE_BENCH_KEEP=1 keeps the logs (API, agent, LiveKit).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import datetime as dt
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from livekit import rtc

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
from morgana.devtools.livekit_server import LiveKitServer
from morgana.devtools.openai_server import FakeOpenAIProcess
from morgana.devtools.processes import AgentWorker, ApiProcess, migrate
from morgana.devtools.services import EmbeddedPostgres, EmbeddedValkey
from morgana.devtools.voice_client import (

    CALLER_PASSWORD,
    FRAME_MS,
    SAMPLE_RATE,
    Caller,
    rms,
    speech_pcm,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench-results" / "voice.jsonl"
COMMAND = "uv run python -m bench.voice_bench"
PASSWORD = "A_Strong_Password123!"
AGENT_EMAIL = "voice-bench-agent@example.com"
AGENT_PASSWORD = "Voice_Bench_Agent_Passw0rd!"
MODEL = "morgana-bench-model"
RATE = "1000000/minute"

# What the caller says, what the fake speech-to-text hears, what the agent answers (the fake
# model echoes "You said: <last user message>").
UTTERANCE = "What time is it?"
TRANSCRIPT = "What time is it"
EXPECTED_REPLY = f"You said: {TRANSCRIPT}"

ENDPOINTING_DELAY = 0.5  # MIN_ENDPOINTING_DELAY given to the worker (its default; --min-endpointing-delay)
VAD_MIN_SILENCE = 0.55  # silero.VAD.load() default min_silence_duration (the worker keeps it)
BOUND_OVER_ENDPOINTING = 1.0  # capacity: p95 must stay under ENDPOINTING_DELAY + this
MAX_CALLS = 16  # MAX_CONCURRENT_CALLS: well above the largest N, so LiveKit never holds a job back
WORKER_CORE = 1
BENCH_CORE = 0
HEARD_THRESHOLD = 300.0  # frame RMS (int16) above which agent audio counts as non-silent
# A reply onset follows at least this much quiet: longer than the pauses inside the reply
# (espeak-ng pauses up to ~230 ms after "You said:"), so a late earlier reply still playing
# after the caller's speech is not taken for the reply to it.
ONSET_QUIET_S = 0.35
CAPTURE_MS = 20  # the callers hand 20 ms frames to their audio source (half the calls of 10 ms)
SPEECH_EDGE_RMS = 50.0  # trailing 10 ms frames of the utterance quieter than this are trimmed
GAP_S = 3.5  # silence after each utterance (plus up to GAP_JITTER_S): room for the reply
GAP_JITTER_S = 1.0
METRIC_PREFIX = "morgana_agent_"
STAGES = (  # (histogram, label)
    ("end_of_turn_delay_seconds", "end_of_turn_delay"),
    ("api_time_to_first_token_seconds", "api_time_to_first_token"),
    ("tts_time_to_first_byte_seconds", "tts_time_to_first_byte"),
    ("turn_latency_seconds", "turn_latency_e2e"),
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(f"[voice-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    single_turns: int  # measured turns of the one-call latency run (after one warm-up turn)
    levels: tuple[int, ...]  # concurrent calls; the first must be 1 (the one-call run)
    level_seconds: float  # capacity window per level N > 1
    ttfe_requests: int  # direct API chat requests


FULL = Plan(single_turns=12, levels=(1, 2, 4, 6, 8), level_seconds=20.0, ttfe_requests=20)
QUICK = Plan(single_turns=4, levels=(1, 2, 4), level_seconds=12.0, ttfe_requests=10)


# --------------------------------------------------------------------------- small helpers


def ms(seconds: float | None) -> float | None:
    return None if seconds is None or not math.isfinite(seconds) else 1000 * seconds


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
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


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


def trimmed_speech(samples: np.ndarray) -> np.ndarray:
    """`samples` without the trailing near-silence, so its last frame is the end of speech."""
    per_frame = SAMPLE_RATE * FRAME_MS // 1000
    frames = len(samples) // per_frame
    last = frames - 1
    while last > 0 and rms(samples[last * per_frame : (last + 1) * per_frame]) < SPEECH_EDGE_RMS:
        last -= 1
    return samples[: (last + 1) * per_frame]


# --------------------------------------------------------------------------- results


class Results(ResultLines):
    """Collects result lines: printed at once (stdout), written and tabulated at the end."""

    def add(
        self, bench: str, metric: str, value: float | None, baseline: float | None, unit: str, **extra: object
    ) -> None:
        record = {
            "bench": bench,
            "metric": metric,
            "value": rounded(value),
            "baseline": rounded(baseline),
            "ratio": rounded(ratio(value, baseline)),
            "unit": unit,
        }
        record.update({k: v for k, v in extra.items() if v is not None})
        self.emit(record)

    def table(self) -> str:
        rows = [("bench", "metric", "value", "baseline", "ratio", "unit", "note")]
        for line in self.lines:
            if "metric" not in line or line["bench"] == "capacity" and "calls" in line:
                continue
            note = line.get("note", "")
            if "overhead_ms" in line:
                note = f"overhead {cell(line['overhead_ms'])} ms" + (f"; {note}" if note else "")
            rows.append(
                (
                    line["bench"],
                    line["metric"],
                    cell(line["value"]),
                    cell(line["baseline"]),
                    cell(line["ratio"]),
                    line["unit"],
                    note,
                )
            )
        return render_table(rows, left=(0, 1, 5, 6))

    def capacity_table(self) -> str:
        rows = [
            (
                "calls",
                "turns",
                "missed",
                "overlap",
                "p50 ms",
                "p95 ms",
                "max ms",
                "pass",
                "worker cpu %",
                "cpu/call %",
                "core0 %",
                "core1 %",
                "core1 other %",
                "eot ms",
                "api ms",
                "tts ms",
                "e2e ms",
                "api direct ms",
                "vad slow",
                "loop lag p99 ms",
            )
        ]
        for line in self.lines:
            if line.get("bench") != "capacity" or "calls" not in line:
                continue
            stages = line.get("stages", {})
            rows.append(
                (
                    str(line["calls"]),
                    str(line["turns"]),
                    str(line["missed"]),
                    str(line["overlapped"]),
                    cell(line["p50_ms"]),
                    cell(line["p95_ms"]),
                    cell(line["max_ms"]),
                    "yes" if line["pass"] else "NO",
                    cell(line["worker_cpu_pct_of_core"]),
                    cell(line["worker_cpu_pct_per_call"]),
                    cell(line["core_util_pct"].get(f"cpu{BENCH_CORE}")),
                    cell(line["core_util_pct"].get(f"cpu{WORKER_CORE}")),
                    cell(line["worker_core_others_pct"]),
                    *(cell(stages.get(label, {}).get("mean_ms")) for _, label in STAGES),
                    cell(line["api_probe_ttfe"]["p50_ms"]),
                    str(line["agent_warnings"]["vad_slower_than_realtime"]),
                    cell(line["bench_loop_lag_p99_ms"]),
                )
            )
        return render_table(rows, left=())






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


# --------------------------------------------------------------------------- callers


@dataclass
class Turn:
    call: int
    index: int  # 0 = the call's first turn (warm-up)
    said_at: float  # Caller.say's notion: the last speech frame was handed to the audio source
    speech_end: float  # that frame left the source's queue (what the remote side hears as the end)
    speech_start: float
    window_end: float  # the caller speaks again here (speech_end + silence)
    latency: float | None = None  # speech_end -> onset of the agent's reply heard
    latency_said: float | None = None  # said_at -> the same onset
    overlapped: bool = False  # the agent was audible while the caller was saying this turn

    # An overlapped turn met a reply that was late (or paused and resumed by the caller's
    # speech): which reply answers it is ambiguous, so it counts as failed, not as a latency.
    @property
    def clean(self) -> bool:
        return self.latency is not None and not self.overlapped

    @property
    def missed(self) -> bool:
        """No reply before the caller spoke again (and no overlap to blame)."""
        return self.latency is None and not self.overlapped


class BenchCaller(Caller):
    """A `Caller` whose HTTP join runs in a thread (not blocking the other callers' audio) and
    whose `say` also reports when the last speech frame actually left the audio source.

    `rtc.AudioSource` keeps a 1 s queue: `capture_frame` returns once a frame is queued, so in
    steady state the frame is sent ~1 s after `Caller.say` saw it captured. The caller is heard
    to stop speaking when that frame is played out, i.e. at capture time + `queued_duration`.
    """

    async def join(self) -> None:
        grant = await asyncio.to_thread(self._grant)
        await self.connect(grant["serverUrl"], grant["participantToken"])

    def _grant(self) -> dict:
        with httpx.Client(base_url=self.api_url, timeout=20) as http:
            email = f"caller-{uuid.uuid4().hex[:12]}@example.com"
            registered = http.post("/api/v1/auth/register", json={"email": email, "password": CALLER_PASSWORD})
            registered.raise_for_status()
            user_token = registered.json()["token"]["access_token"]
            session = http.post("/api/v1/auth/session", headers={"Authorization": f"Bearer {user_token}"})
            session.raise_for_status()
            self.session_id = session.json()["session_id"]
            token = session.json()["token"]["access_token"]
            grant = http.post("/api/v1/livekit/token", headers={"Authorization": f"Bearer {token}"})
            grant.raise_for_status()
            return grant.json()

    async def say_timed(
        self, speech: list[rtc.AudioFrame], silence_frames: int, silence: rtc.AudioFrame
    ) -> tuple[float, float]:
        """Speak `speech` then `silence_frames` of silence, in real time: (said_at, speech_end)."""
        assert self._source is not None
        for frame in speech:
            await self._source.capture_frame(frame)
        said_at = time.monotonic()
        speech_end = said_at + self._source.queued_duration
        for _ in range(silence_frames):
            await self._source.capture_frame(silence)
        return said_at, speech_end

    def agent_present(self) -> bool:
        return any(
            pub.kind == rtc.TrackKind.KIND_AUDIO
            for participant in self.room.remote_participants.values()
            for pub in participant.track_publications.values()
        )

    def loud_between(self, start: float, end: float) -> bool:
        heard = self.heard
        index = bisect.bisect_left(heard, start, key=lambda item: item[0])
        while index < len(heard) and heard[index][0] < end:
            if heard[index][1] > HEARD_THRESHOLD:
                return True
            index += 1
        return False

    def onset(self, start: float, end: float) -> float | None:
        """The first reply onset in [start, end): a frame louder than HEARD_THRESHOLD after at
        least ONSET_QUIET_S of quiet, so a late earlier reply still playing is not taken for it."""
        heard = self.heard
        index = bisect.bisect_left(heard, start - ONSET_QUIET_S, key=lambda item: item[0])
        last_loud = -math.inf
        while index < len(heard) and heard[index][0] < end:
            t, level = heard[index]
            if level > HEARD_THRESHOLD:
                if t >= start and t - last_loud >= ONSET_QUIET_S:
                    return t
                last_loud = t
            index += 1
        return None


@dataclass
class Talker:
    """One call that keeps talking: a turn every GAP_S..GAP_S+GAP_JITTER_S s after its speech."""

    index: int
    caller: BenchCaller
    speech: list[rtc.AudioFrame]
    silence: rtc.AudioFrame
    rng: random.Random
    turns: list[Turn] = field(default_factory=list)
    task: asyncio.Task | None = None
    problem: str = ""

    async def run(self) -> None:
        speech_s = len(self.speech) * CAPTURE_MS / 1000
        try:
            if not await wait_for(self.caller.agent_present, 30):
                self.problem = "the agent never joined the room"
                return
            await self.caller.say_timed([], int(500 / CAPTURE_MS), self.silence)
            while True:
                frames = int((GAP_S + self.rng.uniform(0, GAP_JITTER_S)) * 1000 / CAPTURE_MS)
                said_at, speech_end = await self.caller.say_timed(self.speech, frames, self.silence)
                self.turns.append(
                    Turn(self.index, len(self.turns), said_at, speech_end, speech_end - speech_s,
                         speech_end + frames * CAPTURE_MS / 1000)
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the results
            self.problem = f"{type(exc).__name__}: {exc}"[:200]
            log(f"call {self.index} failed: {self.problem}")

    def evaluate(self, turn: Turn) -> Turn:
        heard = self.caller.onset(turn.speech_end, turn.window_end)
        turn.latency = None if heard is None else heard - turn.speech_end
        turn.latency_said = None if heard is None else heard - turn.said_at
        turn.overlapped = self.caller.loud_between(turn.speech_start, turn.speech_end)
        return turn

    def first_turn_replied(self) -> bool:
        """The first turn's reply window is over, or its reply has been heard."""
        if not self.turns:
            return False
        first = self.turns[0]
        if time.monotonic() >= first.window_end:
            return True
        return self.caller.onset(first.speech_end, first.window_end) is not None

    def measure(self, start: float, end: float) -> list[Turn]:
        """Turns (not the first) whose speech ended in [start, end) and whose reply window is over."""
        now = time.monotonic()
        return [
            self.evaluate(turn)
            for turn in self.turns
            if turn.index > 0 and start <= turn.speech_end < end and turn.window_end <= now
        ]


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


# --------------------------------------------------------------------------- the run


@dataclass
class Stack:
    api: ApiProcess
    worker: PinnedAgentWorker
    livekit: LiveKitServer
    fake: FakeOpenAIProcess
    valkey: EmbeddedValkey
    model_key: str
    tree: ProcessTree


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


class Bench:
    def __init__(self, res: Results, plan: Plan, stack: Stack) -> None:
        self.res = res
        self.plan = plan
        self.stack = stack
        self.talkers: list[Talker] = []
        self.lag = LoopLag()
        self.http = httpx.AsyncClient(timeout=10)
        self.api_http = httpx.AsyncClient(base_url=stack.api.url, timeout=30)
        self.tasks: list[asyncio.Task] = []
        self.speech: list[rtc.AudioFrame] = []
        self.silence: rtc.AudioFrame | None = None
        self.single_latency: dict[str, float] = {}
        self.ttfes: list[float] = []
        self.ttfe_errors = 0
        self.probes: list[tuple[float, float | None]] = []  # (time, ttfe or None on error)
        self.user_token = ""
        self.wall_offset = time.time() - time.monotonic()  # monotonic -> wall clock (fake's times)
        self.idle: dict = {}
        self.first_turns: list[float | None] = []  # per call, in joining order

    # ---- counters

    async def scrape(self) -> dict[str, float]:
        response = await self.http.get(f"http://127.0.0.1:{self.stack.worker.metrics_port}/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)

    def other_pids(self) -> dict[str, int | None]:
        fake = self.stack.fake._process  # noqa: SLF001 - its pid, for CPU accounting
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

    async def open_window(self) -> Window:
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

    async def close_window(self, window: Window) -> dict:
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

    # ---- the API, directly

    async def new_session_token(self) -> str:
        headers = {"Authorization": f"Bearer {self.user_token}"}
        response = await self.api_http.post("/api/v1/auth/session", headers=headers)
        response.raise_for_status()
        return response.json()["token"]["access_token"]

    async def chat_ttfe(self, session_token: str) -> float | None:
        """One chat stream: seconds to the first content event; None unless it ends with done."""
        started = time.perf_counter()
        first, done = math.nan, False
        async with self.api_http.stream(
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

    async def api_ttfe(self) -> None:
        """The API's own chat time to first event, from this process (raw SSE, session token).

        Measured before any call starts (an idle worker), reported after the one-call run.
        """
        log(f"api_chat: {self.plan.ttfe_requests} sequential chat streams (+3 warm-up)")
        email = f"bench-{uuid.uuid4().hex[:12]}@example.com"
        response = await self.api_http.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
        response.raise_for_status()
        self.user_token = response.json()["token"]["access_token"]
        token = ""
        for i in range(self.plan.ttfe_requests + 3):
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

    # ---- calls

    async def add_call(self) -> Talker:
        assert self.silence is not None
        index = len(self.talkers) + 1
        caller = BenchCaller(self.stack.api.url)
        talker = Talker(index, caller, self.speech, self.silence, random.Random(1000 + index))
        self.talkers.append(talker)
        await caller.join()
        talker.task = asyncio.create_task(talker.run(), name=f"call-{index}")
        return talker

    async def ramp_to(self, calls: int) -> list[float | None]:
        """Add calls one after another up to `calls`; wait for each one's first turn to be
        answered (or its reply window to pass). Returns their first-turn latencies."""
        new = []
        while len(self.talkers) < calls:
            new.append(await self.add_call())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check_calls()
            if all(t.first_turn_replied() for t in new):
                break
            await asyncio.sleep(0.25)
        else:
            raise RuntimeError(f"calls {[t.index for t in new if not t.turns]} never took a turn in 60 s")
        firsts = [talker.evaluate(talker.turns[0]).latency for talker in new]
        self.first_turns += firsts
        return firsts

    def level_turns(self, start: float, end: float) -> list[Turn]:
        turns: list[Turn] = []
        for talker in self.talkers:
            turns += talker.measure(start, end)
        return turns

    async def settle_replies(self, end: float) -> None:
        """Wait until every turn whose speech ended before `end` has had its reply window."""
        ends = [t.window_end for talker in self.talkers for t in talker.turns if t.speech_end < end]
        await asyncio.sleep(max(0.0, max(ends, default=0.0) - time.monotonic()) + 0.2)

    def check_calls(self) -> None:
        for talker in self.talkers:
            if talker.problem or (talker.task is not None and talker.task.done()):
                raise RuntimeError(f"call {talker.index} stopped: {talker.problem or 'its task ended'}")

    # ---- part 1: one call

    async def single_call(self) -> None:
        log(f"voice_turn: one call, 1 warm-up turn + {self.plan.single_turns} measured turns")
        firsts = await self.ramp_to(1)
        talker = self.talkers[0]
        window = await self.open_window()
        deadline = time.monotonic() + self.plan.single_turns * (GAP_S + GAP_JITTER_S + 3) + 30
        while time.monotonic() < deadline:
            self.check_calls()
            if sum(1 for t in talker.turns if t.speech_end >= window.started) >= self.plan.single_turns:
                break
            await asyncio.sleep(0.2)
        end = time.monotonic()
        await self.settle_replies(end)
        counters = await self.close_window(window)
        turns = self.level_turns(window.started, end)
        self.report_single(turns, counters, firsts[0])
        await self.report_timeline(turns)
        self.report_level(1, turns, counters, firsts)

    def report_single(self, turns: list[Turn], counters: dict, first_turn: float | None) -> None:
        heard = [t.latency for t in turns if t.clean]
        said = [t.latency_said for t in turns if t.clean and t.latency_said is not None]
        missed = sum(1 for t in turns if t.missed)
        overlapped = sum(1 for t in turns if t.overlapped)
        base_ms = 1000 * ENDPOINTING_DELAY
        p50, p95 = percentile(heard, 50), percentile(heard, 95)
        self.single_latency = {"p50": p50, "p95": p95}
        for q, value in (("p50", p50), ("p95", p95)):
            self.res.add(
                "voice_turn",
                f"latency_{q}",
                ms(value),
                base_ms,
                "ms",
                overhead_ms=rounded(ms(value) - base_ms if math.isfinite(value) else None),
                n=len(heard),
                missed=missed,
                overlapped=overlapped,
                note="end of caller speech -> first agent audio heard; baseline = endpointing delay",
            )
        mean = sum(heard) / len(heard) if heard else math.nan
        self.res.add(
            "voice_turn",
            "latency_mean",
            ms(mean),
            base_ms,
            "ms",
            min_ms=rounded(ms(min(heard)) if heard else None),
            max_ms=rounded(ms(max(heard)) if heard else None),
            samples_ms=[rounded(ms(v), 1) for v in heard],
        )
        self.res.add(
            "voice_turn",
            "first_turn_latency",
            ms(first_turn),
            base_ms,
            "ms",
            note="the call's first turn (warm-up, not in the percentiles)" if first_turn else "no reply heard",
        )
        self.res.add(
            "voice_turn",
            "latency_p50_from_say_return",
            ms(percentile(said, 50)),
            base_ms,
            "ms",
            note="from Caller.say's return: adds the caller's ~1 s audio-source queue",
        )
        stages = counters["stages"]
        for _, label in STAGES:
            stage = stages[label]
            self.res.add(
                "voice_turn",
                f"stage_{label}_mean",
                ms(stage["mean_s"]),
                base_ms if label in ("end_of_turn_delay", "turn_latency_e2e") else None,
                "ms",
                count=stage["count"],
                note="worker histogram, mean over the same window",
            )
        e2e = stages["turn_latency_e2e"]["mean_s"]
        self.res.add(
            "voice_turn",
            "client_minus_worker_e2e_mean",
            ms(mean - e2e) if e2e is not None and math.isfinite(mean) else None,
            None,
            "ms",
            note="what the worker's e2e histogram does not see (see the timeline rows)",
        )

    async def report_timeline(self, turns: list[Turn]) -> None:
        """The same turns on one clock: when the worker's STT and TTS requests reached the fake
        OpenAI server (its `started_at`, wall clock) between the caller's speech end and the
        reply heard. One call only, so every request belongs to the turn it follows."""
        fake = self.stack.fake
        stt = sorted(r["started_at"] for r in await asyncio.to_thread(fake.audio_requests, "transcriptions"))
        tts = sorted(r["started_at"] for r in await asyncio.to_thread(fake.audio_requests, "speech"))
        legs: dict[str, list[float]] = {
            "speech_end_to_stt_request": [],
            "stt_request_to_tts_request": [],
            "tts_request_to_audio_heard": [],
        }
        for turn in turns:
            if not turn.clean:
                continue
            start, end = turn.speech_end + self.wall_offset, turn.window_end + self.wall_offset
            heard = start + turn.latency
            t_stt = next((t for t in stt if start <= t < end), None)
            t_tts = next((t for t in tts if t_stt is not None and t_stt <= t < end), None)
            if t_stt is None or t_tts is None or not t_tts <= heard:
                continue
            legs["speech_end_to_stt_request"].append(t_stt - start)
            legs["stt_request_to_tts_request"].append(t_tts - t_stt)
            legs["tts_request_to_audio_heard"].append(heard - t_tts)
        notes = {
            "speech_end_to_stt_request": (
                f"uplink + VAD end of speech (silence {1000 * VAD_MIN_SILENCE:.0f} ms + VAD lag)"
            ),
            "stt_request_to_tts_request": "STT + end of turn + API first token + first sentence",
            "tts_request_to_audio_heard": "TTS first byte + agent audio output + downlink + jitter buffer",
        }
        for leg, values in legs.items():
            self.res.add(
                "voice_turn",
                f"timeline_{leg}_mean",
                ms(sum(values) / len(values)) if values else None,
                1000 * VAD_MIN_SILENCE if leg == "speech_end_to_stt_request" else None,
                "ms",
                n=len(values),
                p95_ms=rounded(ms(percentile(values, 95)), 1),
                note=notes[leg],
            )

    def report_idle(self) -> None:
        idle = self.idle
        self.res.add(
            "capacity",
            "worker_idle_cpu",
            100 * idle["worker_cpu_s"] / idle["seconds"],
            None,
            "% of core",
            processes=idle["worker_processes"],
            note="no call: the worker and its pre-started idle job processes",
        )

    def report_api_ttfe(self) -> None:
        p50, p95 = percentile(self.ttfes, 50), percentile(self.ttfes, 95)
        share = ratio(p50, self.single_latency.get("p50"))
        for q, value in (("p50", p50), ("p95", p95)):
            self.res.add(
                "api_chat",
                f"ttfe_{q}",
                ms(value),
                None,
                "ms",
                n=len(self.ttfes),
                errors=self.ttfe_errors,
                share_of_turn_p50=rounded(share) if q == "p50" else None,
                note=(
                    "direct SSE request, no call running"
                    + (f"; {100 * share:.1f}% of the turn p50" if share else "")
                )
                if q == "p50"
                else "",
            )

    # ---- part 2: calls per core

    async def capacity(self) -> None:
        self.report_idle()
        for calls in self.plan.levels[1:]:
            try:
                await self.capacity_level(calls)
            except RuntimeError as exc:  # a call broke: report it, keep the levels measured so far
                log(f"capacity: {calls} calls failed: {exc}")
                self.res.add("capacity", f"calls_{calls}_failed", None, None, "error", note=str(exc)[:200])
                break
        self.report_capacity()

    async def capacity_level(self, calls: int) -> None:
        log(f"capacity: ramping to {calls} concurrent calls")
        firsts = await self.ramp_to(calls)
        await asyncio.sleep(1.0)
        self.check_calls()
        window = await self.open_window()
        log(f"capacity: measuring {calls} calls for {self.plan.level_seconds:.0f} s")
        while time.monotonic() < window.started + self.plan.level_seconds:
            self.check_calls()
            await asyncio.sleep(0.25)
        end = time.monotonic()
        counters = await self.close_window(window)
        await self.settle_replies(end)
        self.report_level(calls, self.level_turns(window.started, end), counters, firsts)

    def report_level(self, calls: int, turns: list[Turn], counters: dict, firsts: list[float | None]) -> None:
        heard = [t.latency for t in turns if t.clean]
        missed = sum(1 for t in turns if t.missed)
        overlapped = sum(1 for t in turns if t.overlapped)
        p95 = percentile(heard, 95)
        bound = ENDPOINTING_DELAY + BOUND_OVER_ENDPOINTING
        passed = bool(heard) and missed == 0 and overlapped == 0 and p95 < bound
        cpu_pct = 100 * counters["worker_cpu_s"] / counters["seconds"]
        unexpected = sorted(
            {text for t in self.talkers[:calls] for text in t.caller.agent_texts() if text != EXPECTED_REPLY}
        )
        self.res.emit(
            {
                "bench": "capacity",
                "metric": f"calls_{calls}",
                "calls": calls,
                "turns": len(turns),
                "missed": missed,
                "overlapped": overlapped,
                "p50_ms": rounded(ms(percentile(heard, 50)), 1),
                "p95_ms": rounded(ms(p95), 1),
                "max_ms": rounded(ms(max(heard)) if heard else None, 1),
                "bound_ms": rounded(1000 * bound, 1),
                "pass": passed,
                "worker_cpu_pct_of_core": rounded(cpu_pct, 1),
                "worker_cpu_pct_per_call": rounded(cpu_pct / calls, 1),
                "worker_main_process_cpu_pct": rounded(
                    100 * counters["worker_main_cpu_s"] / counters["seconds"], 1
                ),
                "worker_processes": counters["worker_processes"],
                "core_util_pct": counters["core_util_pct"],
                # busy time of the worker's core not spent by the worker: other tenants
                # (approximate: /proc/stat ticks vs per-process times differ by a few %)
                "worker_core_others_pct": rounded(
                    max(0.0, (counters["core_util_pct"].get(f"cpu{WORKER_CORE}") or 0.0) - cpu_pct), 1
                ),
                "other_cpu_pct_of_core": counters["other_cpu_pct_of_core"],
                "stages": {
                    label: {"count": v["count"], "mean_ms": rounded(ms(v["mean_s"]), 1)}
                    for label, v in counters["stages"].items()
                },
                "api_probe_ttfe": counters["api_probe"],
                "agent_warnings": counters["agent_warnings"],
                "first_turn_ms_new_calls": [rounded(ms(v), 1) for v in firsts],
                "bench_loop_lag_p99_ms": counters["loop_lag_p99_ms"],
                "bench_loop_lag_max_ms": counters["loop_lag_max_ms"],
                "window_s": rounded(counters["seconds"], 1),
                "loadavg": [round(x, 2) for x in os.getloadavg()],
                "unexpected_replies": unexpected or None,
            }
        )
        log(
            f"{calls} calls: p50 {cell(ms(percentile(heard, 50)))} ms, p95 {cell(ms(p95))} ms, "
            f"{missed} missed and {overlapped} overlapped of {len(turns)}, worker {cpu_pct:.0f}% of a core"
        )

    def report_capacity(self) -> None:
        levels = sorted(
            (line for line in self.res.lines if line.get("bench") == "capacity" and "calls" in line),
            key=lambda item: item["calls"],
        )
        best = 0
        for line in levels:
            if not line["pass"]:
                break
            best = line["calls"]
        tested = levels[-1]["calls"] if levels else 0
        passing = [line for line in levels if line["pass"]]
        per_call = passing[-1]["worker_cpu_pct_per_call"] if passing else None
        bound_ms = 1000 * (ENDPOINTING_DELAY + BOUND_OVER_ENDPOINTING)
        self.res.add(
            "capacity",
            "calls_per_core",
            best,
            None,
            "calls",
            bound_ms=rounded(bound_ms, 1),
            tested=[line["calls"] for line in levels],
            note=f"largest N with p95 < {bound_ms:.0f} ms, no missed or overlapped turn"
            + (" (every level passed: a lower bound)" if best == tested else ""),
        )
        self.res.add(
            "capacity",
            "worker_cpu_per_call",
            per_call,
            None,
            "% of core",
            cpu_bound_calls=rounded(100 / per_call, 1) if per_call else None,
            note="at the largest passing N; 100 / this = calls per core if CPU alone limited",
        )
        missed_firsts = sum(1 for v in self.first_turns if v is None)
        self.res.add(
            "capacity",
            "first_turn_latency_max",
            ms(max((v for v in self.first_turns if v is not None), default=math.nan)),
            1000 * ENDPOINTING_DELAY,
            "ms",
            samples_ms=[rounded(ms(v), 1) for v in self.first_turns],
            missed=missed_firsts,
            note="each call's first turn, as the calls were added (not in the percentiles)"
            + (f"; {missed_firsts} got no reply before the caller spoke again" if missed_firsts else ""),
        )

    # ---- the whole run

    async def run(self) -> None:
        fake = self.stack.fake
        await asyncio.to_thread(fake.set_transcript, TRANSCRIPT)
        pcm = trimmed_speech(await asyncio.to_thread(speech_pcm, fake.root_url, self.stack.model_key, UTTERANCE))
        per_frame = SAMPLE_RATE * CAPTURE_MS // 1000
        self.speech = [
            rtc.AudioFrame(pcm[i : i + per_frame].tobytes(), SAMPLE_RATE, 1, per_frame)
            for i in range(0, len(pcm) - per_frame + 1, per_frame)
        ]
        self.silence = rtc.AudioFrame(np.zeros(per_frame, dtype=np.int16).tobytes(), SAMPLE_RATE, 1, per_frame)
        log(f"utterance {UTTERANCE!r}: {len(self.speech) * CAPTURE_MS} ms of speech")
        self.tasks += [asyncio.create_task(self.lag.run()), asyncio.create_task(self.sample_forever())]
        try:
            window = await self.open_window()
            await self.api_ttfe()
            await asyncio.sleep(max(0.0, window.started + 3.0 - time.monotonic()))
            self.idle = await self.close_window(window)
            self.tasks.append(asyncio.create_task(self.probe_forever()))
            await self.single_call()
            self.report_api_ttfe()
            await self.capacity()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        for task in (*self.tasks, *(t.task for t in self.talkers)):
            if task is not None:
                task.cancel()
        for task in (*self.tasks, *(t.task for t in self.talkers)):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

        async def leave(talker: Talker) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(talker.caller.leave(), 10)

        await asyncio.gather(*(leave(t) for t in self.talkers))
        await self.http.aclose()
        await self.api_http.aclose()


# --------------------------------------------------------------------------- wiring


def api_env(pg: EmbeddedPostgres, valkey: EmbeddedValkey, fake: FakeOpenAIProcess, model_key: str,
            livekit: LiveKitServer, agent_name: str) -> dict[str, str]:
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
        "LLM_MAX_RETRIES": "0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "NO_PROXY": "127.0.0.1,localhost",
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "LIVEKIT_AGENT_NAME": agent_name,
        "API_USER_EMAIL": AGENT_EMAIL,  # `migrate` creates the agent's service account
        "API_USER_PASSWORD": AGENT_PASSWORD,
    }
    for name in LIMIT_NAMES:
        env[f"RATE_LIMIT_{name.upper()}"] = RATE
    return env


def agent_env(api: ApiProcess, fake: FakeOpenAIProcess, model_key: str, livekit: LiveKitServer,
              agent_name: str, workdir: Path) -> dict[str, str]:
    # The job processes' metrics files; created here, removed with the run's temporary directory.
    (workdir / "agent-metrics").mkdir(parents=True, exist_ok=True)
    return {
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "LIVEKIT_AGENT_NAME": agent_name,
        "MORGANA_BACKEND_URL": api.url,
        "API_USER_EMAIL": AGENT_EMAIL,
        "API_USER_PASSWORD": AGENT_PASSWORD,
        "OPENAI_API_KEY": model_key,
        "OPENAI_BASE_URL": fake.base_url,
        "TTS_RESPONSE_FORMAT": "pcm",
        "MAX_CONCURRENT_CALLS": str(MAX_CALLS),
        "MIN_ENDPOINTING_DELAY": str(ENDPOINTING_DELAY),
        "DRAIN_TIMEOUT_SECONDS": "5",
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "agent-metrics"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "NO_PROXY": "127.0.0.1,localhost",
        "LOG_LEVEL": "INFO",  # `AgentWorker` waits for the "registered worker" log line
    }


def log_problems(path: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return [
            line
            for line in path.read_text(errors="replace").splitlines()
            if '"level": "ERROR"' in line or '"level": "CRITICAL"' in line or "Traceback" in line
        ]
    return []


def set_endpointing_delay(seconds: float) -> None:
    global ENDPOINTING_DELAY  # noqa: PLW0603 - one setting for the whole run
    ENDPOINTING_DELAY = seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.voice_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns and levels (~2 minutes)")
    parser.add_argument(
        "--min-endpointing-delay",
        type=float,
        default=ENDPOINTING_DELAY,
        metavar="SECONDS",
        help=f"MIN_ENDPOINTING_DELAY for the worker, also the latency baseline (default {ENDPOINTING_DELAY})",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    set_endpointing_delay(args.min_endpointing_delay)
    command = COMMAND + (" --quick" if args.quick else "")
    if args.min_endpointing_delay != 0.5:
        command += f" --min-endpointing-delay {args.min_endpointing_delay:g}"
    if shutil.which("taskset") is None:
        print("voice_bench needs `taskset` (util-linux) to pin the worker to one core", file=sys.stderr)
        return 2
    cores = sorted(os.sched_getaffinity(0))
    if BENCH_CORE not in cores or WORKER_CORE not in cores:
        print(f"voice_bench needs CPUs {BENCH_CORE} and {WORKER_CORE}; it may use {cores}", file=sys.stderr)
        return 2

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Before anything starts: this process (the callers) and every service it starts run on
    # core 0; only the agent worker (taskset) runs on core 1.
    pin_this_process(BENCH_CORE)

    res = Results()
    res.emit(
        {
            "bench": "meta",
            "command": command,
            "make": "make bench" + (" BENCH_ARGS=--quick" if args.quick else "") + " (after the API benchmark)",
            "quick": args.quick,
            "cores": os.cpu_count(),
            "cpu": cpu_model(),
            "mem_total_mib": mem_total_mib(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "platform": platform.platform(),
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "worker_core": WORKER_CORE,
            "bench_and_services_core": BENCH_CORE,
            "min_endpointing_delay_s": ENDPOINTING_DELAY,
            "vad_min_silence_s": VAD_MIN_SILENCE,
            "max_concurrent_calls": MAX_CALLS,
            "utterance": UTTERANCE,
            "reply": EXPECTED_REPLY,
            "turn_gap_s": [GAP_S, GAP_S + GAP_JITTER_S],
            "providers": "fake OpenAI server, no added delay (chat, STT, TTS pcm)",
        }
    )

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="morgana-voice-bench-"))
    model_key = "sk-bench-" + secrets.token_hex(8)
    agent_name = "morgana-bench-" + secrets.token_hex(4)
    failed = False
    api = worker = livekit = fake = None
    tree: ProcessTree | None = None
    with contextlib.ExitStack() as stack:
        if os.environ.get("VOICE_BENCH_KEEP"):  # keep the logs (API, agent, LiveKit) for a look
            stack.callback(log, f"logs kept in {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        try:
            log("starting Postgres, Valkey, the fake OpenAI server and LiveKit")
            pg, valkey, fake = start_services(stack, workdir, model_key)
            livekit = LiveKitServer(
                "APIvoicebench", "vb-" + secrets.token_hex(24), log_path=workdir / "livekit.log"
            )
            stack.callback(livekit.stop)
            livekit.start()

            env = api_env(pg, valkey, fake, model_key, livekit, agent_name)
            log("migrating (creates the agent's service account)")
            migrate(env)
            api = ApiProcess(env, workdir / "api.log", workers=1)
            stack.callback(api.stop)
            api.start()
            log(f"starting the agent worker on core {WORKER_CORE} (taskset)")
            worker = PinnedAgentWorker(
                agent_env(api, fake, model_key, livekit, agent_name, workdir), workdir / "agent.log", WORKER_CORE
            )
            stack.callback(lambda: stop_leftovers(tree))
            stack.callback(worker.stop, 20.0)
            worker.start()
            assert worker.process is not None
            tree = ProcessTree(worker.process.pid)
            tree.sample()
            log(f"ready in {time.monotonic() - began:.1f} s (worker pid {worker.process.pid})")

            bench = Bench(res, plan, Stack(api, worker, livekit, fake, valkey, model_key, tree))
            asyncio.run(bench.run())

            problems = {"api": log_problems(api.log_path), "agent": log_problems(worker.log_path)}
            res.emit(
                {
                    "bench": "meta",
                    "api_log_error_lines": len(problems["api"]),
                    "agent_log_error_lines": len(problems["agent"]),
                    "log_sample": (problems["api"] + problems["agent"])[:5],
                    "fake_openai_stats": fake.stats(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()],
                    "seconds": round(time.monotonic() - began, 1),
                }
            )
        except KeyboardInterrupt:
            failed = True
            log("interrupted; stopping everything")
        except Exception as exc:  # noqa: BLE001 - report any failure, then clean up
            failed = True
            log(f"FAILED: {type(exc).__name__}: {exc}")
            for name, proc in (("api", api), ("agent", worker), ("livekit", livekit)):
                with contextlib.suppress(Exception):
                    if proc is not None:
                        log(f"{name} log tail:\n{proc.log_tail()}")
        finally:
            res.write(RESULTS)
            log("stopping everything")
    print(flush=True)
    print(res.table(), flush=True)
    print(flush=True)
    print(res.capacity_table(), flush=True)
    for line in res.lines:
        if line.get("unexpected_replies"):
            print(f"  {line['metric']}: unexpected agent replies {line['unexpected_replies']}", flush=True)
        if line.get("api_log_error_lines") or line.get("agent_log_error_lines"):
            print(
                f"  logs: API {line['api_log_error_lines']} / agent {line['agent_log_error_lines']} error lines, "
                f"first: {line['log_sample'][0][:200]}",
                flush=True,
            )
    print(
        f"\n(results in {RESULTS.relative_to(REPO)}; total {time.monotonic() - began:.0f} s; "
        f"worker on core {WORKER_CORE}, callers and services on core {BENCH_CORE}; "
        f"baseline = MIN_ENDPOINTING_DELAY {1000 * ENDPOINTING_DELAY:.0f} ms)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
