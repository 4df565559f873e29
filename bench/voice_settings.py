"""The voice benchmark's settings: what a caller says and hears, how a reply is detected, the cores,
the worker configurations compared in one run (`WorkerConfig`), their targets, and the size of a run
(`Plan`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from morgana.agent.config import AgentSettings

# What the caller says, what the fake speech-to-text hears, what the agent answers (the fake
# model echoes "You said: <last user message>").
UTTERANCE = "What time is it?"
TRANSCRIPT = "What time is it"
EXPECTED_REPLY = f"You said: {TRANSCRIPT}"

# capacity: a level passes with its p95 under this (the "p95 turn latency under 1.5 s"). It
# was the endpointing delay + 1 s, which tightened as the shipped delay fell (0.5 -> 0.2 s).
CAPACITY_P95_BOUND_S = 1.5
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
# A reply heard for longer than its audio lasts (first to last loud frame) had gaps: the worker
# did not hand the room its audio in time, and the caller heard silence mid-reply (an underrun).
# Opus, resampling and the 10 ms frames move the edges by a frame or two.
UNDERRUN_TOLERANCE_S = 0.06
GAP_S = 3.5  # silence after each utterance (plus up to GAP_JITTER_S): room for the reply
GAP_JITTER_S = 1.0
METRIC_PREFIX = "morgana_agent_"
STAGES = (  # (histogram, label)
    ("end_of_turn_delay_seconds", "end_of_turn_delay"),
    ("api_time_to_first_token_seconds", "api_time_to_first_token"),
    ("tts_time_to_first_byte_seconds", "tts_time_to_first_byte"),
    ("turn_latency_seconds", "turn_latency_e2e"),
)

# Provider delays of the `realistic` configurations, injected by the fake OpenAI server as sticky
# per-endpoint scenarios (first_delay_ms): the model's first token, TTS's first byte, STT's answer.
PROVIDER_DELAYS_MS = {"chat": 350.0, "speech": 150.0, "transcriptions": 100.0}


# The worker's defaults, from its settings class without reading this environment or a `.env`.
_DEFAULTS = AgentSettings.model_construct()
# The voice the worker speaks with (set explicitly, so the reply's expected length is of this voice).
REPLY_VOICE = _DEFAULTS.tts_voice


@dataclass(frozen=True)
class Targets:
    """The issue's latency targets for a configuration's one-call run (ms; None: no target)."""

    p50_ms: float | None = None
    p95_ms: float | None = None

    def text(self) -> str:
        parts = [f"{q} <= {v:.0f}" for q, v in (("p50", self.p50_ms), ("p95", self.p95_ms)) if v is not None]
        return ", ".join(parts) or "-"


@dataclass(frozen=True)
class WorkerConfig:
    """One configuration of the agent worker, measured with a worker of its own."""

    name: str
    summary: str
    turn_detector: str
    vad_min_silence: float  # VAD_MIN_SILENCE_SECONDS
    endpointing_delay: float  # MIN_ENDPOINTING_DELAY: the latency baseline of this configuration
    max_endpointing_delay: float
    predict_after_silence: float = _DEFAULTS.smart_turn_after_silence_seconds  # SMART_TURN_AFTER_SILENCE_SECONDS
    stt_vad_min_silence: float = _DEFAULTS.stt_vad_min_silence_seconds  # STT_VAD_MIN_SILENCE_SECONDS
    preemptive: bool = False
    preemptive_tts: bool = _DEFAULTS.preemptive_tts  # PREEMPTIVE_TTS
    vad_runtime: str = _DEFAULTS.vad_runtime  # VAD_RUNTIME
    event_loop: str = _DEFAULTS.event_loop  # EVENT_LOOP
    provider_delays_ms: dict[str, float] = field(default_factory=dict)  # fake server endpoint -> ms
    capacity: bool = False  # also the idle API (api_chat) and the capacity levels
    targets: Targets = Targets()
    compare_with: str | None = None  # a configuration its latency is put beside (ratio), if measured

    @property
    def bound(self) -> float:
        """capacity: a level passes with its turn latency p95 under this (seconds)."""
        return CAPACITY_P95_BOUND_S

    def env(self) -> dict[str, str]:
        """The turn settings, all given explicitly: the shipped defaults are read from the worker's
        settings class, so neither this shell's environment nor a `.env` file changes them."""
        return {
            "TURN_DETECTOR": self.turn_detector,
            "VAD_MIN_SILENCE_SECONDS": str(self.vad_min_silence),
            "MIN_ENDPOINTING_DELAY": str(self.endpointing_delay),
            "MAX_ENDPOINTING_DELAY": str(self.max_endpointing_delay),
            "SMART_TURN_AFTER_SILENCE_SECONDS": str(self.predict_after_silence),
            "STT_VAD_MIN_SILENCE_SECONDS": str(self.stt_vad_min_silence),
            "PREEMPTIVE_GENERATION": "true" if self.preemptive else "false",
            "PREEMPTIVE_TTS": "true" if self.preemptive_tts else "false",
            "VAD_RUNTIME": self.vad_runtime,
            "EVENT_LOOP": self.event_loop,
            "TTS_VOICE": REPLY_VOICE,
        }

    def describe(self) -> dict:
        return {
            "config": self.name,
            "summary": self.summary,
            "worker_env": self.env(),
            "provider_first_delay_ms": self.provider_delays_ms,
            "capacity": self.capacity,
            "targets": self.targets.text(),
            "compare_with": self.compare_with,
        }


SHIPPED = WorkerConfig(
    name="default",
    summary="the shipped defaults, no provider delay",
    turn_detector=_DEFAULTS.turn_detector,
    vad_min_silence=_DEFAULTS.vad_min_silence_seconds,
    endpointing_delay=_DEFAULTS.min_endpointing_delay,
    max_endpointing_delay=_DEFAULTS.max_endpointing_delay,
    preemptive=_DEFAULTS.preemptive_generation,
    capacity=True,
    targets=Targets(p50_ms=650.0, p95_ms=800.0),
    compare_with="today",
)
CONFIGS = (
    WorkerConfig(
        name="today",
        summary="silence only, as before Smart Turn: VAD 0.55 s, endpointing 0.5 s, asyncio's loop, no provider delay",
        turn_detector="vad",
        event_loop="asyncio",
        vad_min_silence=0.55,
        stt_vad_min_silence=0.55,
        endpointing_delay=0.5,
        max_endpointing_delay=SHIPPED.max_endpointing_delay,
    ),
    SHIPPED,
    replace(
        SHIPPED,
        name="onnx_vad",
        summary="the shipped defaults with VAD_RUNTIME=onnx (livekit-plugins-silero), no provider delay",
        vad_runtime="onnx",
        capacity=False,
        targets=Targets(),
        compare_with="default",
    ),
    replace(
        SHIPPED,
        name="asyncio_loop",
        summary="the shipped defaults with EVENT_LOOP=asyncio (asyncio's own loop, not uvloop), no provider delay",
        event_loop="asyncio",
        capacity=False,
        targets=Targets(),
        compare_with="default",
    ),
    replace(
        SHIPPED,
        name="realistic",
        summary="the shipped defaults with provider delays (model 350, TTS 150, STT 100 ms)",
        provider_delays_ms=PROVIDER_DELAYS_MS,
        capacity=False,
        targets=Targets(p50_ms=1000.0),
        compare_with=None,  # its figures are put beside `default`'s by the provider delay lines
    ),
    replace(
        SHIPPED,
        name="realistic_no_preemptive",
        summary="as realistic, with PREEMPTIVE_GENERATION=false",
        preemptive=False,
        provider_delays_ms=PROVIDER_DELAYS_MS,
        capacity=False,
        targets=Targets(),
        compare_with="realistic",
    ),
)
CONFIG_NAMES = tuple(config.name for config in CONFIGS)


@dataclass(frozen=True)
class Plan:
    single_turns: int  # measured turns of each configuration's one-call run (after one warm-up turn)
    levels: tuple[int, ...]  # concurrent calls; the first must be 1 (the one-call run)
    level_seconds: float  # capacity window per level N > 1
    ttfe_requests: int  # direct API chat requests


FULL = Plan(single_turns=12, levels=(1, 2, 4, 6, 8), level_seconds=20.0, ttfe_requests=20)
QUICK = Plan(single_turns=4, levels=(1, 2, 4), level_seconds=12.0, ttfe_requests=10)
