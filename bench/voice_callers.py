"""The voice benchmark's callers and the room driver: callers that join through the API's token flow,
speak real speech in real time, and time what they hear; `Calls` adds them and collects their turns."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import random
import time
import uuid
from dataclasses import dataclass, field

import httpx
import numpy as np
from livekit import rtc

from bench.common import logger
from bench.voice_settings import (
    CAPTURE_MS,
    EXPECTED_REPLY,
    GAP_JITTER_S,
    GAP_S,
    HEARD_THRESHOLD,
    ONSET_QUIET_S,
    REPLY_VOICE,
    SPEECH_EDGE_RMS,
    TRANSCRIPT,
    UNDERRUN_TOLERANCE_S,
    UTTERANCE,
)
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.voice_client import (
    CALLER_PASSWORD,
    FRAME_MS,
    SAMPLE_RATE,
    Caller,
    rms,
    speech_pcm,
    wait_for,
)

log = logger("voice-bench")


def trimmed_speech(samples: np.ndarray) -> np.ndarray:
    """`samples` without the trailing near-silence, so its last frame is the end of speech."""
    per_frame = SAMPLE_RATE * FRAME_MS // 1000
    frames = len(samples) // per_frame
    last = frames - 1
    while last > 0 and rms(samples[last * per_frame : (last + 1) * per_frame]) < SPEECH_EDGE_RMS:
        last -= 1
    return samples[: (last + 1) * per_frame]


def loud_span(samples: np.ndarray) -> float:
    """Seconds from the first to the end of the last 10 ms frame louder than HEARD_THRESHOLD."""
    per_frame = SAMPLE_RATE * FRAME_MS // 1000
    frames = (samples[i * per_frame : (i + 1) * per_frame] for i in range(len(samples) // per_frame))
    loud = [i for i, frame in enumerate(frames) if rms(frame) > HEARD_THRESHOLD]
    return (loud[-1] - loud[0] + 1) * FRAME_MS / 1000 if loud else 0.0


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
    stretch: float | None = None  # how much longer the reply was heard than its audio lasts

    @property
    def underrun(self) -> bool:
        return self.stretch is not None and self.stretch > UNDERRUN_TOLERANCE_S

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

    def heard_span(self, onset: float, end: float) -> float:
        """Seconds from `onset` to the end of the last loud frame before `end`."""
        heard = self.heard
        index = bisect.bisect_left(heard, onset, key=lambda item: item[0])
        last = onset
        while index < len(heard) and heard[index][0] < end:
            if heard[index][1] > HEARD_THRESHOLD:
                last = heard[index][0]
            index += 1
        return last - onset + FRAME_MS / 1000

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
    reply_span: float  # the reply's audio, first to last loud frame
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
                    Turn(
                        self.index,
                        len(self.turns),
                        said_at,
                        speech_end,
                        speech_end - speech_s,
                        speech_end + frames * CAPTURE_MS / 1000,
                    )
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.problem = f"{type(exc).__name__}: {exc}"[:200]
            log(f"call {self.index} failed: {self.problem}")

    def evaluate(self, turn: Turn) -> Turn:
        heard = self.caller.onset(turn.speech_end, turn.window_end)
        turn.latency = None if heard is None else heard - turn.speech_end
        turn.latency_said = None if heard is None else heard - turn.said_at
        turn.overlapped = self.caller.loud_between(turn.speech_start, turn.speech_end)
        if heard is not None and self.reply_span:
            turn.stretch = self.caller.heard_span(heard, turn.window_end) - self.reply_span
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


class Calls:
    """The calls of a run, added one after another, each a `Talker` speaking the same utterance."""

    def __init__(self, api_url: str) -> None:
        self.api_url = api_url
        self.talkers: list[Talker] = []
        self.speech: list[rtc.AudioFrame] = []
        self.silence: rtc.AudioFrame | None = None
        self.first_turns: list[float | None] = []  # per call, in joining order
        self.reply_span = 0.0

    async def prepare(self, fake: FakeOpenAIProcess, model_key: str) -> None:
        """The utterance as 20 ms frames (speech from the fake server's espeak-ng), and the STT
        transcript it should produce."""
        await asyncio.to_thread(fake.set_transcript, TRANSCRIPT)
        pcm = trimmed_speech(await asyncio.to_thread(speech_pcm, fake.root_url, model_key, UTTERANCE))
        per_frame = SAMPLE_RATE * CAPTURE_MS // 1000
        self.speech = [
            rtc.AudioFrame(pcm[i : i + per_frame].tobytes(), SAMPLE_RATE, 1, per_frame)
            for i in range(0, len(pcm) - per_frame + 1, per_frame)
        ]
        self.silence = rtc.AudioFrame(np.zeros(per_frame, dtype=np.int16).tobytes(), SAMPLE_RATE, 1, per_frame)
        log(f"utterance {UTTERANCE!r}: {len(self.speech) * CAPTURE_MS} ms of speech")
        # The reply as the stand-in speaks it (the same espeak-ng audio the worker plays).
        reply = await asyncio.to_thread(speech_pcm, fake.root_url, model_key, EXPECTED_REPLY, REPLY_VOICE)
        self.reply_span = loud_span(reply)

    async def add(self) -> Talker:
        assert self.silence is not None
        index = len(self.talkers) + 1
        caller = BenchCaller(self.api_url)
        talker = Talker(index, caller, self.speech, self.silence, random.Random(1000 + index), self.reply_span)
        self.talkers.append(talker)
        await caller.join()
        talker.task = asyncio.create_task(talker.run(), name=f"call-{index}")
        return talker

    async def ramp_to(self, calls: int) -> list[float | None]:
        """Add calls one after another up to `calls`; wait for each one's first turn to be
        answered (or its reply window to pass). Returns their first-turn latencies."""
        new = []
        while len(self.talkers) < calls:
            new.append(await self.add())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.check()
            if all(t.first_turn_replied() for t in new):
                break
            await asyncio.sleep(0.25)
        else:
            raise RuntimeError(f"calls {[t.index for t in new if not t.turns]} never took a turn in 60 s")
        firsts = [talker.evaluate(talker.turns[0]).latency for talker in new]
        self.first_turns += firsts
        return firsts

    def turns(self, start: float, end: float) -> list[Turn]:
        """Every call's measured turns whose speech ended in [start, end)."""
        turns: list[Turn] = []
        for talker in self.talkers:
            turns += talker.measure(start, end)
        return turns

    async def settle_replies(self, end: float) -> None:
        """Wait until every turn whose speech ended before `end` has had its reply window."""
        ends = [t.window_end for talker in self.talkers for t in talker.turns if t.speech_end < end]
        await asyncio.sleep(max(0.0, max(ends, default=0.0) - time.monotonic()) + 0.2)

    def check(self) -> None:
        for talker in self.talkers:
            if talker.problem or (talker.task is not None and talker.task.done()):
                raise RuntimeError(f"call {talker.index} stopped: {talker.problem or 'its task ended'}")

    def agent_texts(self, calls: int) -> set[str]:
        """What the agent said (its transcripts) in the first `calls` calls."""
        return {text for t in self.talkers[:calls] for text in t.caller.agent_texts()}

    def tasks(self) -> list[asyncio.Task]:
        return [t.task for t in self.talkers if t.task is not None]

    async def leave(self) -> None:
        """Every caller hangs up (each given 10 s)."""

        async def leave(talker: Talker) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(talker.caller.leave(), 10)

        await asyncio.gather(*(leave(t) for t in self.talkers))
