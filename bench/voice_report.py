"""`VoiceReport`: one configuration's result lines, from its measured turns and window counters."""

from __future__ import annotations

import asyncio
import math
import time

from bench.common import cell, load_average, logger, ms, percentile, ratio, rounded
from bench.voice_callers import Turn
from bench.voice_results import Results
from bench.voice_settings import EXPECTED_REPLY, STAGES, WORKER_CORE, WorkerConfig
from morgana_devtools.openai_server import FakeOpenAIProcess

log = logger("voice-bench")


class VoiceReport:
    """Result lines from what one configuration's run measured. The baseline is its endpointing
    delay (MIN_ENDPOINTING_DELAY)."""

    def __init__(self, res: Results, config: WorkerConfig) -> None:
        self.res = res
        self.config = config
        self.single_latency: dict[str, float] = {}
        self.idle_memory: dict = {}
        self.wall_offset = time.time() - time.monotonic()  # monotonic -> wall clock (fake's times)

    def single(self, turns: list[Turn], counters: dict, first_turn: float | None) -> None:
        """voice_turn: the one-call run's latency, its first turn and the worker's stage means."""
        heard = [t.latency for t in turns if t.clean]
        said = [t.latency_said for t in turns if t.clean and t.latency_said is not None]
        missed = sum(1 for t in turns if t.missed)
        overlapped = sum(1 for t in turns if t.overlapped)
        base_ms = 1000 * self.config.endpointing_delay
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
        self.res.add(
            "voice_turn",
            "worker_cpu",
            100 * counters["worker_cpu_s"] / counters["seconds"],
            None,
            "% of core",
            note="the worker and its job processes during the one-call run (what a call costs in this configuration)",
        )

    async def timeline(self, turns: list[Turn], fake: FakeOpenAIProcess) -> None:
        """The same turns on one clock: when the worker's STT and TTS requests reached the fake
        OpenAI server (its `started_at`, wall clock) between the caller's speech end and the
        reply heard. One call only, so every request belongs to the turn it follows."""
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
        silence_ms = 1000 * self.config.vad_min_silence
        notes = {
            "speech_end_to_stt_request": f"uplink + VAD end of speech (silence {silence_ms:.0f} ms + VAD lag)",
            "stt_request_to_tts_request": "STT + end of turn + API first token + first sentence",
            "tts_request_to_audio_heard": "TTS first byte + agent audio output + downlink + jitter buffer",
        }
        for leg, values in legs.items():
            self.res.add(
                "voice_turn",
                f"timeline_{leg}_mean",
                ms(sum(values) / len(values)) if values else None,
                silence_ms if leg == "speech_end_to_stt_request" else None,
                "ms",
                n=len(values),
                p95_ms=rounded(ms(percentile(values, 95)), 1),
                note=notes[leg],
            )

    def idle(self, idle: dict) -> None:
        """The worker's CPU and memory with no call (`idle`: a closed window)."""
        self.res.add(
            "capacity",
            "worker_idle_cpu",
            100 * idle["worker_cpu_s"] / idle["seconds"],
            None,
            "% of core",
            processes=idle["worker_processes"],
            note="no call: the worker and its pre-started idle job processes",
        )
        self.idle_memory = memory = idle["worker_memory"]
        self.res.add(
            "memory",
            "idle_worker",
            memory["pss_mib"],
            None,
            "MiB PSS",
            worker_memory=memory,
            note=f"no call: main process, forkserver and idle job processes; RSS {cell(memory['rss_mib'])} MiB",
        )

    def per_call(self, memory: dict, calls: int) -> dict:
        """`memory` (the tree with `calls` calls) and its increase over the idle tree, per call."""

        def increase(key: str) -> float | None:
            before, after = self.idle_memory.get(key), memory[key]
            return None if before is None or after is None else rounded((after - before) / calls, 1)

        return {**memory, "per_call_rss_mib": increase("rss_mib"), "per_call_pss_mib": increase("pss_mib")}

    def api_ttfe(self, ttfes: list[float], errors: int) -> None:
        """api_chat: the API's own time to first event, and its share of the one-call turn."""
        p50, p95 = percentile(ttfes, 50), percentile(ttfes, 95)
        share = ratio(p50, self.single_latency.get("p50"))
        for q, value in (("p50", p50), ("p95", p95)):
            self.res.add(
                "api_chat",
                f"ttfe_{q}",
                ms(value),
                None,
                "ms",
                n=len(ttfes),
                errors=errors,
                share_of_turn_p50=rounded(share) if q == "p50" else None,
                note=(
                    "direct SSE request, no call running" + (f"; {100 * share:.1f}% of the turn p50" if share else "")
                )
                if q == "p50"
                else "",
            )

    def level(
        self, calls: int, turns: list[Turn], counters: dict, firsts: list[float | None], replies: set[str]
    ) -> None:
        """capacity: one level (`calls` concurrent calls), from its turns and window counters;
        `replies`: what the agent said in those calls."""
        heard = [t.latency for t in turns if t.clean]
        missed = sum(1 for t in turns if t.missed)
        overlapped = sum(1 for t in turns if t.overlapped)
        underruns = sum(1 for t in turns if t.clean and t.underrun)
        stretches = [t.stretch for t in turns if t.clean and t.stretch is not None]
        p95 = percentile(heard, 95)
        bound = self.config.bound
        passed = bool(heard) and missed == 0 and overlapped == 0 and underruns == 0 and p95 < bound
        cpu_pct = 100 * counters["worker_cpu_s"] / counters["seconds"]
        unexpected = sorted(text for text in replies if text != EXPECTED_REPLY)
        self.res.emit(
            {
                "bench": "capacity",
                "metric": f"calls_{calls}",
                "calls": calls,
                "turns": len(turns),
                "missed": missed,
                "overlapped": overlapped,
                "underruns": underruns,
                "reply_stretch_max_ms": rounded(ms(max(stretches)) if stretches else None, 1),
                "p50_ms": rounded(ms(percentile(heard, 50)), 1),
                "p95_ms": rounded(ms(p95), 1),
                "max_ms": rounded(ms(max(heard)) if heard else None, 1),
                "bound_ms": rounded(1000 * bound, 1),
                "pass": passed,
                "worker_cpu_pct_of_core": rounded(cpu_pct, 1),
                "worker_cpu_pct_per_call": rounded(cpu_pct / calls, 1),
                "worker_main_process_cpu_pct": rounded(100 * counters["worker_main_cpu_s"] / counters["seconds"], 1),
                "worker_processes": counters["worker_processes"],
                "worker_memory": self.per_call(counters["worker_memory"], calls),
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
                "loadavg": load_average(),
                "unexpected_replies": unexpected or None,
            }
        )
        log(
            f"{calls} calls: p50 {cell(ms(percentile(heard, 50)))} ms, p95 {cell(ms(p95))} ms, "
            f"{missed} missed, {overlapped} overlapped and {underruns} with gaps of {len(turns)}, "
            f"worker {cpu_pct:.0f}% of a core"
        )

    def level_failed(self, calls: int, exc: Exception) -> None:
        self.res.add("capacity", f"calls_{calls}_failed", None, None, "error", note=str(exc)[:200])

    def capacity(self, first_turns: list[float | None]) -> None:
        """calls_per_core from the levels reported so far; the calls' first turns."""
        levels = sorted(self.res.levels(), key=lambda item: item["calls"])
        best = 0
        for line in levels:
            if not line["pass"]:
                break
            best = line["calls"]
        tested = levels[-1]["calls"] if levels else 0
        passing = [line for line in levels if line["pass"]]
        per_call = passing[-1]["worker_cpu_pct_per_call"] if passing else None
        bound_ms = 1000 * self.config.bound
        self.res.add(
            "capacity",
            "calls_per_core",
            best,
            None,
            "calls",
            bound_ms=rounded(bound_ms, 1),
            tested=[line["calls"] for line in levels],
            note=f"largest N with p95 < {bound_ms:.0f} ms, no missed, overlapped or gapped turn"
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
        if levels:
            self.memory_per_call(levels[-1])
        missed_firsts = sum(1 for v in first_turns if v is None)
        self.res.add(
            "capacity",
            "first_turn_latency_max",
            ms(max((v for v in first_turns if v is not None), default=math.nan)),
            1000 * self.config.endpointing_delay,
            "ms",
            samples_ms=[rounded(ms(v), 1) for v in first_turns],
            missed=missed_firsts,
            note="each call's first turn, as the calls were added (not in the percentiles)"
            + (f"; {missed_firsts} got no reply before the caller spoke again" if missed_firsts else ""),
        )

    def memory_per_call(self, level: dict) -> None:
        """memory per active call, from the largest level measured (its processes' /proc data)."""
        memory, calls = level["worker_memory"], level["calls"]
        self.res.add(
            "memory",
            "per_call",
            memory["per_call_pss_mib"],
            None,
            "MiB PSS",
            calls=calls,
            per_call_rss_mib=memory["per_call_rss_mib"],
            note=f"(worker tree at {calls} calls - idle tree) / {calls}; "
            f"RSS {cell(memory['per_call_rss_mib'])} MiB per call (counts shared pages again)",
        )
