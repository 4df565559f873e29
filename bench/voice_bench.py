"""Voice turn latency and calls per core of the agent worker, measured in one run on this machine.

    uv run python -m bench.voice_bench [--quick] [--min-endpointing-delay SECONDS]

Starts real Postgres and Valkey (from wheels), the fake OpenAI-protocol server (chat, speech to
text, text to speech, all with no added delay), a dedicated LiveKit server, the Morgana API
(one uvicorn worker) and ONE agent worker (`morgana-agent start`) pinned to CPU core 1 with
`taskset -c 1` (its job processes inherit the pin). This process and every other service are
pinned to core 0, so the worker has a core to itself (other tenants of a shared machine aside).
Callers are `morgana_devtools.voice_client.Caller`s: each joins through the API's token flow,
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

The parts: bench/voice_run.py (the run), bench/voice_callers.py (the callers and their rooms),
bench/voice_measure.py (window counters and the API probe), bench/voice_system.py (CPU, cores,
the pinned worker), bench/voice_report.py (result lines and tables), bench/voice_settings.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

from bench.common import (
    interrupt_on_sigterm,
    load_average,
    log_problems,
    logger,
    machine_info,
    morgana_env,
    scratch_dir,
    start_services,
)
from bench.voice_report import RESULTS, Results, print_report
from bench.voice_run import VoiceBench
from bench.voice_settings import (
    BENCH_CORE,
    ENDPOINTING_DELAY,
    EXPECTED_REPLY,
    FULL,
    GAP_JITTER_S,
    GAP_S,
    MAX_CALLS,
    QUICK,
    UTTERANCE,
    VAD_MIN_SILENCE,
    WORKER_CORE,
)
from bench.voice_system import PinnedAgentWorker, ProcessTree, Stack, pin_this_process, stop_leftovers
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess, migrate
from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey

COMMAND = "uv run python -m bench.voice_bench"
AGENT_EMAIL = "voice-bench-agent@example.com"
AGENT_PASSWORD = "Voice_Bench_Agent_Passw0rd!"
log = logger("voice-bench")


# --------------------------------------------------------------------------- wiring


def api_env(
    pg: EmbeddedPostgres,
    valkey: EmbeddedValkey,
    fake: FakeOpenAIProcess,
    model_key: str,
    livekit: LiveKitServer,
    agent_name: str,
) -> dict[str, str]:
    return {
        **morgana_env(pg, valkey, fake, model_key),
        "LIVEKIT_URL": livekit.url,
        "LIVEKIT_API_KEY": livekit.api_key,
        "LIVEKIT_API_SECRET": livekit.api_secret,
        "LIVEKIT_AGENT_NAME": agent_name,
        "API_USER_EMAIL": AGENT_EMAIL,  # `migrate` creates the agent's service account
        "API_USER_PASSWORD": AGENT_PASSWORD,
    }


def agent_env(
    api: ApiProcess,
    fake: FakeOpenAIProcess,
    model_key: str,
    livekit: LiveKitServer,
    agent_name: str,
    workdir: Path,
    endpointing_delay: float,
) -> dict[str, str]:
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
        "MIN_ENDPOINTING_DELAY": str(endpointing_delay),
        "DRAIN_TIMEOUT_SECONDS": "5",
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / "agent-metrics"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "NO_PROXY": "127.0.0.1,localhost",
        "LOG_LEVEL": "INFO",  # `AgentWorker` waits for the "registered worker" log line
    }


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
    plan = dataclasses.replace(QUICK if args.quick else FULL, endpointing_delay=args.min_endpointing_delay)
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

    interrupt_on_sigterm()
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
            **machine_info(),
            "worker_core": WORKER_CORE,
            "bench_and_services_core": BENCH_CORE,
            "min_endpointing_delay_s": plan.endpointing_delay,
            "vad_min_silence_s": VAD_MIN_SILENCE,
            "max_concurrent_calls": MAX_CALLS,
            "utterance": UTTERANCE,
            "reply": EXPECTED_REPLY,
            "turn_gap_s": [GAP_S, GAP_S + GAP_JITTER_S],
            "providers": "fake OpenAI server, no added delay (chat, STT, TTS pcm)",
        }
    )

    began = time.monotonic()
    model_key = "sk-bench-" + secrets.token_hex(8)
    agent_name = "morgana-bench-" + secrets.token_hex(4)
    failed = False
    api = worker = livekit = fake = None
    tree: ProcessTree | None = None
    with contextlib.ExitStack() as stack:
        # VOICE_BENCH_KEEP=1 keeps the logs (API, agent, LiveKit) for a look
        workdir = scratch_dir(stack, "morgana-voice-bench-", "VOICE_BENCH_KEEP", log)
        try:
            log("starting Postgres, Valkey, the fake OpenAI server and LiveKit")
            pg, valkey, fake = start_services(stack, workdir, model_key)
            livekit = LiveKitServer("APIvoicebench", "vb-" + secrets.token_hex(24), log_path=workdir / "livekit.log")
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
                agent_env(api, fake, model_key, livekit, agent_name, workdir, plan.endpointing_delay),
                workdir / "agent.log",
                WORKER_CORE,
            )
            stack.callback(lambda: stop_leftovers(tree))
            stack.callback(worker.stop, 20.0)
            worker.start()
            assert worker.process is not None
            tree = ProcessTree(worker.process.pid)
            tree.sample()
            log(f"ready in {time.monotonic() - began:.1f} s (worker pid {worker.process.pid})")

            bench = VoiceBench(res, plan, Stack(api, worker, livekit, fake, valkey, model_key, tree))
            asyncio.run(bench.run())

            problems = {"api": log_problems(api.log_path), "agent": log_problems(worker.log_path)}
            res.emit(
                {
                    "bench": "meta",
                    "api_log_error_lines": len(problems["api"]),
                    "agent_log_error_lines": len(problems["agent"]),
                    "log_sample": (problems["api"] + problems["agent"])[:5],
                    "fake_openai_stats": fake.stats(),
                    "loadavg": load_average(),
                    "seconds": round(time.monotonic() - began, 1),
                }
            )
        except KeyboardInterrupt:
            failed = True
            log("interrupted; stopping everything")
        except Exception as exc:
            failed = True
            log(f"FAILED: {type(exc).__name__}: {exc}")
            for name, proc in (("api", api), ("agent", worker), ("livekit", livekit)):
                with contextlib.suppress(Exception):
                    if proc is not None:
                        log(f"{name} log tail:\n{proc.log_tail()}")
        finally:
            res.write(RESULTS)
            log("stopping everything")
    print_report(res, began, plan)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
