"""Voice turn latency and calls per core of the agent worker: several configurations, one run on this machine.

    uv run python -m bench.voice_bench [--quick] [--only CONFIG ...]

Starts real Postgres and Valkey (from wheels), the fake OpenAI-protocol server (chat, speech to
text, text to speech), a dedicated LiveKit server and the Morgana API (one uvicorn worker). Then,
for each configuration in turn, ONE agent worker (`morgana-agent start`) pinned to CPU core 1 with
`taskset -c 1` (its job processes inherit the pin) is started, measured and stopped; everything
else stays up. This process and every other service are pinned to core 0, so the worker has a core
to itself (other tenants of a shared machine aside). Callers are
`morgana_devtools.voice_client.Caller`s: each joins through the API's token flow, speaks real
espeak-ng speech as its microphone (48 kHz, in real time) and records what it hears.

The configurations (bench/voice_settings.py; `--only` picks some, in this order):

  today                 TURN_DETECTOR=vad, VAD_MIN_SILENCE_SECONDS=0.55, MIN_ENDPOINTING_DELAY=0.5:
                        silence alone ends a turn, as before Smart Turn, on asyncio's loop. No
                        provider delay.
  default               the worker's shipped defaults (Smart Turn, VAD 0.15 s, endpointing 0.2 s), no provider
                        delay. Also the capacity levels and the API alone. Targets: p50 <= 650 ms,
                        p95 <= 800 ms.
  onnx_vad              the shipped defaults with VAD_RUNTIME=onnx (livekit-plugins-silero on
                        onnxruntime, as before 2026-12-01): one call's CPU beside `default`'s.
  asyncio_loop          the shipped defaults with EVENT_LOOP=asyncio (asyncio's own loop, as
                        before 2026-12-01, rather than uvloop): one call's CPU beside `default`'s.
  realistic             the shipped defaults with the fake server's first chat token 350 ms, first
                        TTS byte 150 ms and transcription 100 ms late. Target: p50 <= 1000 ms.
  realistic_no_preemptive  as realistic, with PREEMPTIVE_GENERATION=false.

Per configuration:

1. voice_turn  one call, 12 turns (--quick 4) after a warm-up turn: the latency a caller feels,
               from the end of its speech (when the last speech frame leaves the caller's audio
               source) to the onset of the agent's reply heard at the client, p50/p95, as
               overhead over the configuration's endpointing delay (MIN_ENDPOINTING_DELAY).
               Broken down by stage with the worker's own Prometheus histograms (means of
               _sum/_count deltas over the same window) and on one clock with the arrival times
               of the worker's STT and TTS requests at the fake server.
   memory      RSS and PSS of the idle worker's process tree (main process, forkserver, idle job
               processes).

`default` only:

2. api_chat    the API's chat time to first event, measured directly (raw SSE requests with a
               session token, no call running), to show how much of a turn is the API.
3. capacity    calls one worker sustains on one core: calls are added one after another, each
               taking a turn every 4.4-5.4 s, and for N = 1, 2, 4, 6, 8 (--quick 1, 2, 4) the turn
               latency p50/p95, missed and overlapped turns, the CPU and memory of the worker and
               its job processes, the worker's stage means and the API's own latency (a direct
               request every 2 s) are measured. calls_per_core = the largest N (all smaller N
               passing too) whose p95 stays under 1.5 s (the issue's bound) with every turn
               answered before the caller speaks again and no reply heard with gaps (heard
               for more than 60 ms longer than its audio lasts: an underrun).

After them (bench/voice_floor.py):

4. media_floor  4 bare LiveKit calls (a process each on core 1, no agent code: the agent's track
                published, the caller's audio read): their CPU per call, the most calls any
                livekit-agents worker could carry on this core, and `default`'s call beside it.

Across configurations (bench/voice_compare.py): `default` beside `today`, `onnx_vad` and
`asyncio_loop` beside `default` (and `realistic_no_preemptive` beside `realistic`), latency and
one call's worker CPU; the targets with pass/fail; and for the realistic configurations how much
of the injected 600 ms reached the caller (p50 over `default`'s) and in which stage (means over
`default`'s).

Results: one JSON object per line on stdout and in bench-results/voice.jsonl (the first line is
the command and machine info; every line measured for a configuration has `"config"`), then the
tables: every line, the configurations side by side, the capacity levels, the worker's memory.
Progress goes to stderr. Every process started here is stopped in `finally` blocks.
VOICE_BENCH_KEEP=1 keeps the logs (API, each configuration's agent, LiveKit).

The parts: bench/voice_run.py (one configuration's run), bench/voice_callers.py (the callers and
their rooms), bench/voice_measure.py (window counters and the API probe), bench/voice_system.py
(CPU, memory, cores, the pinned worker), bench/voice_report.py (a configuration's result lines),
bench/voice_compare.py (lines across configurations), bench/voice_floor.py (the media floor),
bench/voice_results.py (result lines and tables), bench/voice_settings.py (settings and the
configurations).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
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
from bench.voice_compare import compare_configs
from bench.voice_floor import measure_media_floor
from bench.voice_results import RESULTS, Results, print_report
from bench.voice_run import VoiceBench
from bench.voice_settings import (
    BENCH_CORE,
    CONFIG_NAMES,
    CONFIGS,
    EXPECTED_REPLY,
    FULL,
    GAP_JITTER_S,
    GAP_S,
    MAX_CALLS,
    QUICK,
    UTTERANCE,
    WORKER_CORE,
    Plan,
    WorkerConfig,
)
from bench.voice_system import Stack, pin_this_process, pinned_worker
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess, migrate
from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey

COMMAND = "uv run python -m bench.voice_bench"
AGENT_EMAIL = "voice-bench-agent@example.com"
AGENT_PASSWORD = "Voice_Bench_Agent_Passw0rd!"
log = logger("voice-bench")


# --------------------------------------------------------------------------- wiring


@dataclass
class Services:
    """What stays up for the whole run: only the agent worker is restarted between configurations."""

    api: ApiProcess
    livekit: LiveKitServer
    fake: FakeOpenAIProcess
    valkey: EmbeddedValkey
    model_key: str
    agent_name: str
    workdir: Path


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


def agent_env(services: Services, config: WorkerConfig) -> dict[str, str]:
    # The job processes' metrics files, a directory per configuration (a new worker must not sum
    # the last one's); created here, removed with the run's temporary directory.
    metrics_dir = services.workdir / f"agent-metrics-{config.name}"
    metrics_dir.mkdir(parents=True, exist_ok=True)
    return {
        "LIVEKIT_URL": services.livekit.url,
        "LIVEKIT_API_KEY": services.livekit.api_key,
        "LIVEKIT_API_SECRET": services.livekit.api_secret,
        "LIVEKIT_AGENT_NAME": services.agent_name,
        "MORGANA_BACKEND_URL": services.api.url,
        "API_USER_EMAIL": AGENT_EMAIL,
        "API_USER_PASSWORD": AGENT_PASSWORD,
        "OPENAI_API_KEY": services.model_key,
        "OPENAI_BASE_URL": services.fake.base_url,
        "TTS_RESPONSE_FORMAT": "pcm",
        "MAX_CONCURRENT_CALLS": str(MAX_CALLS),
        **config.env(),
        "DRAIN_TIMEOUT_SECONDS": "5",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "NO_PROXY": "127.0.0.1,localhost",
        "LOG_LEVEL": "INFO",
    }


def measure(res: Results, plan: Plan, config: WorkerConfig, services: Services) -> bool:
    """One configuration with a worker of its own, stopped afterwards. False (and a `failed` line)
    if it broke off: the run goes on with the next configuration."""
    res.config = config.name
    log_path = services.workdir / f"agent-{config.name}.log"
    log(f"{config.name}: starting the agent worker on core {WORKER_CORE} (taskset): {config.summary}")
    try:
        with pinned_worker(agent_env(services, config), log_path, WORKER_CORE) as (worker, tree):
            assert worker.process is not None
            res.emit({"bench": "meta", **config.describe(), "worker_pid": worker.process.pid})
            stack = Stack(
                services.api, worker, services.livekit, services.fake, services.valkey, services.model_key, tree
            )
            asyncio.run(VoiceBench(res, plan, config, stack).run())
        return True
    except Exception as exc:
        log(f"{config.name}: FAILED: {type(exc).__name__}: {exc}")
        with contextlib.suppress(OSError):
            log(
                f"{config.name}: agent log tail:\n" + "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
            )
        res.add("run", "failed", None, None, "error", note=f"{type(exc).__name__}: {exc}"[:200])
        return False
    finally:
        problems = log_problems(log_path)
        res.emit({"bench": "meta", "log": "agent", "log_error_lines": len(problems), "log_sample": problems[:5]})
        res.config = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.voice_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer turns and levels (about 4 minutes)")
    parser.add_argument(
        "--only",
        action="append",
        choices=CONFIG_NAMES,
        metavar="CONFIG",
        help=f"measure this configuration only (repeatable; default: all of {', '.join(CONFIG_NAMES)})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    configs = [config for config in CONFIGS if not args.only or config.name in args.only]
    command = COMMAND + (" --quick" if args.quick else "") + "".join(f" --only {c.name}" for c in configs if args.only)
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
            "configs": [config.describe() for config in configs],
            "max_concurrent_calls": MAX_CALLS,
            "utterance": UTTERANCE,
            "reply": EXPECTED_REPLY,
            "turn_gap_s": [GAP_S, GAP_S + GAP_JITTER_S],
            "providers": "fake OpenAI server (chat, STT, TTS pcm); added delays per configuration",
        }
    )

    began = time.monotonic()
    model_key = "sk-bench-" + secrets.token_hex(8)
    agent_name = "morgana-bench-" + secrets.token_hex(4)
    failed = False
    api = livekit = None
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
            log(f"ready in {time.monotonic() - began:.1f} s; configurations: {', '.join(c.name for c in configs)}")

            services = Services(api, livekit, fake, valkey, model_key, agent_name, workdir)
            for config in configs:
                failed = not measure(res, plan, config, services) or failed
            compare_configs(res, configs)
            # The worker of the last configuration is gone: its core is free for the floor.
            failed = not measure_media_floor(res, livekit, plan.level_seconds) or failed

            problems = log_problems(api.log_path)
            res.emit({"bench": "meta", "log": "api", "log_error_lines": len(problems), "log_sample": problems[:5]})
            res.emit(
                {
                    "bench": "meta",
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
            for name, proc in (("api", api), ("livekit", livekit)):
                with contextlib.suppress(Exception):
                    if proc is not None:
                        log(f"{name} log tail:\n{proc.log_tail()}")
        finally:
            res.write(RESULTS)
            log("stopping everything")
    print_report(res, began, configs)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
