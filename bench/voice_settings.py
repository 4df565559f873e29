"""The voice benchmark's settings: what a caller says and hears, how a reply is detected, the cores,
and the size of a run (`Plan`)."""

from __future__ import annotations

from dataclasses import dataclass

# What the caller says, what the fake speech-to-text hears, what the agent answers (the fake
# model echoes "You said: <last user message>").
UTTERANCE = "What time is it?"
TRANSCRIPT = "What time is it"
EXPECTED_REPLY = f"You said: {TRANSCRIPT}"

ENDPOINTING_DELAY = 0.5  # MIN_ENDPOINTING_DELAY given to the worker by default (--min-endpointing-delay)
VAD_MIN_SILENCE = 0.55  # silero.VAD.load() default min_silence_duration (the worker keeps it)
BOUND_OVER_ENDPOINTING = 1.0  # capacity: p95 must stay under the endpointing delay + this
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


@dataclass(frozen=True)
class Plan:
    single_turns: int  # measured turns of the one-call latency run (after one warm-up turn)
    levels: tuple[int, ...]  # concurrent calls; the first must be 1 (the one-call run)
    level_seconds: float  # capacity window per level N > 1
    ttfe_requests: int  # direct API chat requests
    # MIN_ENDPOINTING_DELAY given to the worker: the latency baseline (--min-endpointing-delay)
    endpointing_delay: float = ENDPOINTING_DELAY

    @property
    def bound(self) -> float:
        """capacity: a level passes with its turn latency p95 under this (seconds)."""
        return self.endpointing_delay + BOUND_OVER_ENDPOINTING


FULL = Plan(single_turns=12, levels=(1, 2, 4, 6, 8), level_seconds=20.0, ttfe_requests=20)
QUICK = Plan(single_turns=4, levels=(1, 2, 4), level_seconds=12.0, ttfe_requests=10)
