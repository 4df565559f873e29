"""Lines that put the configurations measured in one run side by side: a configuration beside the one
it is compared with, the issue's targets, and how much of the injected provider delay reached the
caller (and in which stage) compared with `default`."""

from __future__ import annotations

from collections.abc import Sequence

from bench.voice_results import Results
from bench.voice_settings import SHIPPED, WorkerConfig

# Where each injected provider delay should show, if nothing hid it: (result line, endpoints).
STAGE_LINES = (
    ("stage_api_time_to_first_token_mean", ("chat",)),
    ("stage_tts_time_to_first_byte_mean", ("speech",)),
    ("timeline_speech_end_to_stt_request_mean", ()),
    ("timeline_stt_request_to_tts_request_mean", ("transcriptions", "chat")),
    ("timeline_tts_request_to_audio_heard_mean", ("speech",)),
)


def compare_configs(res: Results, configs: Sequence[WorkerConfig]) -> None:
    """Each configuration's comparison, target and provider delay lines (those whose figures were
    measured in this run), tagged with that configuration."""
    for config in configs:
        res.config = config.name
        if config.compare_with:
            versus(res, config.name, config.compare_with)
        targets(res, config)
        if config.provider_delays_ms:
            provider_delays(res, config)
    res.config = None


def latency(res: Results, config: str, q: str) -> float | None:
    return res.value(config, "voice_turn", f"latency_{q}")


def difference(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def versus(res: Results, name: str, other: str) -> None:
    """`name`'s one-call latency and worker CPU beside `other`'s, measured in the same run."""
    cpu, base_cpu = (res.value(config, "voice_turn", "worker_cpu") for config in (name, other))
    if cpu is not None and base_cpu is not None:
        res.add(
            "compare",
            f"worker_cpu_vs_{other}",
            cpu,
            base_cpu,
            "% of core",
            note=f"one call, {name} / {other}, same run",
        )
    for q in ("p50", "p95"):
        value, base = latency(res, name, q), latency(res, other, q)
        if value is None or base is None:
            continue
        res.add(
            "compare",
            f"latency_{q}_vs_{other}",
            value,
            base,
            "ms",
            difference_ms=round(value - base, 1),
            note=f"{name} / {other}, same run",
        )


def targets(res: Results, config: WorkerConfig) -> None:
    """The issue's targets for this configuration: absolute latencies, pass or fail."""
    for q, target in (("p50", config.targets.p50_ms), ("p95", config.targets.p95_ms)):
        if target is None:
            continue
        value = latency(res, config.name, q)
        passed = value is not None and value <= target
        res.add(
            "target",
            f"latency_{q}",
            value,
            target,
            "ms",
            **{"pass": passed},
            note=f"issue target {q} <= {target:.0f} ms (absolute): " + ("pass" if passed else "FAIL"),
        )


def provider_delays(res: Results, config: WorkerConfig) -> None:
    """How much of the injected delay the caller heard: p50 over `default`'s p50 (same run), the rest
    hidden (overlapped with the end-of-turn wait); then each stage's mean over `default`'s beside
    the delay injected into it, and speech-to-text's share as the difference of two increases."""
    base = SHIPPED.name
    injected = sum(config.provider_delays_ms.values())
    added = difference(latency(res, config.name, "p50"), latency(res, base, "p50"))
    if added is None:
        return
    res.add(
        "provider_delay",
        "added_p50",
        added,
        injected,
        "ms",
        note=f"{config.name} p50 - {base} p50: the part of the injected {injected:.0f} ms the caller hears",
    )
    res.add(
        "provider_delay",
        "hidden_p50",
        injected - added,
        injected,
        "ms",
        note="injected - added: overlapped with waiting for the end of the turn",
    )
    increases = {}
    for metric, endpoints in STAGE_LINES:
        increases[metric] = increase = difference(
            res.value(config.name, "voice_turn", metric), res.value(base, "voice_turn", metric)
        )
        delay = sum(config.provider_delays_ms.get(e, 0.0) for e in endpoints)
        res.add(
            "provider_delay",
            f"increase_{metric.removesuffix('_mean')}",
            increase,
            delay or None,
            "ms",
            injected_ms=delay,
            note=f"mean over {base}'s (derived from means); injected here: " + (" + ".join(endpoints) or "none"),
        )
    res.add(
        "provider_delay",
        "increase_stt_derived",
        difference(
            increases["timeline_stt_request_to_tts_request_mean"], increases["stage_api_time_to_first_token_mean"]
        ),
        config.provider_delays_ms.get("transcriptions"),
        "ms",
        note="STT request -> TTS request increase minus the API first-token increase (derived from means)",
    )
