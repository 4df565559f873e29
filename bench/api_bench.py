"""Morgana API vs a raw Starlette baseline, measured in one run on this machine.

    uv run python -m bench.api_bench [--quick]      (or: make bench [BENCH_ARGS=--quick])

Starts real Postgres and Valkey (from wheels), the fake OpenAI-protocol model server, the
Morgana API (one uvicorn worker; a second one with two gunicorn workers, for `scaling`) and the
baseline (`bench/baseline_app.py`, a plain Starlette app doing the same I/O with no framework
logic), then measures both with the same client:

1. session_create  POST /api/v1/auth/session  vs  POST /session (one INSERT)
2. chat_stream     POST /api/v1/chatbot/chat/stream  vs  POST /chat/stream (relay of the model's
                   SSE), 200-token replies: time to first event (sequential) and streams/s (c=8)
3. open_streams    N concurrent long-lived streams (500; --quick 100): errors, peak open,
                   server RSS per open stream; open_streams_large: 2000 (full run only)
4. scaling         chat streams/s of a second Morgana API with two gunicorn workers vs the
                   one-worker API (the baseline column), concurrency 8 per worker

Results: one JSON object per line on stdout and in bench-results/api.jsonl, then a table.
Progress goes to stderr. Every process started here is stopped in `finally` blocks.

The parts: bench/api_load.py (the client side: targets, one timed request, closed-loop load),
bench/api_scenarios.py (the benchmarks), bench/api_report.py (result lines and table).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import httpx

from bench.api_load import (
    SESSION_ROTATE_EVERY,
    SessionPool,
    Target,
    client_session,
    create_sessions,
    raise_fd_limit,
    rotating_headers,
)
from bench.api_report import RESULTS, Results, print_report
from bench.api_scenarios import (
    FULL,
    QUICK,
    Plan,
    bench_chat,
    bench_open_streams,
    bench_scaling,
    bench_sessions,
    open_many,
)
from bench.common import (
    MODEL,
    REPO,
    interrupt_on_sigterm,
    load_average,
    log_problems,
    logger,
    machine_info,
    morgana_env,
    scratch_dir,
    start_services,
)
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess, ChildProcess, migrate
from morgana_devtools.services import free_port

COMMAND = "uv run python -m bench.api_bench"  # what `make bench` runs
LONG_WARMUP = 20  # streams that warm a fresh process before its long-reply burst
PASSWORD = "A_Strong_Password123!"
log = logger("bench")


class Baseline(ChildProcess):
    """bench/baseline_app.py under uvicorn in its own process; ready when /health answers."""

    name = "baseline"
    ready_timeout = 30.0

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.baseline_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        super().__init__(command, {**env, "PYTHONPATH": pythonpath}, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=1).status_code == 200


async def run_benchmarks(
    res: Results,
    plan: Plan,
    api: ApiProcess,
    baseline: Baseline,
    fake: FakeOpenAIProcess,
    api_workers: ApiProcess | None,
    fresh_pair: Callable[[str], tuple[ApiProcess, Baseline]],
) -> None:
    assert api.process is not None and baseline.process is not None
    async with client_session(16) as http:
        email = f"bench-{uuid.uuid4().hex[:12]}@example.com"
        async with http.post(f"{api.url}/api/v1/auth/register", json={"email": email, "password": PASSWORD}) as resp:
            body = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"register failed: {resp.status} {body}")
        user_token = body["token"]["access_token"]
        # Chat sessions for every Morgana stream phase, created before any timing starts.
        rotations = (plan.ttfe_pairs + plan.stream_requests) // SESSION_ROTATE_EVERY
        needed = rotations + plan.stream_concurrency * (plan.rounds + 1) + 20 + plan.open_streams
        # ... and for the second burst, and the scaling rounds (a session per load worker and round)
        scaling = plan.stream_concurrency * plan.scaling_workers * (plan.rounds + 1) * 2
        needed += plan.open_streams_large + scaling + 2 * plan.stream_requests // SESSION_ROTATE_EVERY + 20
        needed += plan.open_streams_long + LONG_WARMUP
        log(f"creating {needed} Morgana chat sessions for the stream benchmarks")
        pool = SessionPool(await create_sessions(http, api.url, user_token, needed))

    morgana = Target(
        "morgana",
        api.url,
        api.process.pid,
        "/api/v1/auth/session",
        "/api/v1/chatbot/chat/stream",
        session_headers={"Authorization": f"Bearer {user_token}"},
    )
    base = Target("baseline", baseline.url, baseline.process.pid, "/session", "/chat/stream")
    targets = [morgana, base]

    await bench_sessions(res, plan, targets)

    # Each load worker (task) has its own chat session, replaced every SESSION_ROTATE_EVERY turns.
    morgana.stream_headers = rotating_headers(pool)
    await bench_chat(res, plan, targets, fake)

    await bench_open_streams(res, plan, targets, fake, pool, plan.open_streams)
    if plan.open_streams_large:
        await bench_open_streams(res, plan, targets, fake, pool, plan.open_streams_large, "open_streams_large")
    if plan.open_streams_long:
        await bench_long_replies(res, plan, fake, pool, fresh_pair)

    if api_workers is not None:
        assert api_workers.process is not None
        many = Target(
            f"morgana_{plan.scaling_workers}_workers",
            api_workers.url,
            api_workers.process.pid,
            morgana.session_path,
            morgana.stream_path,
            stream_headers=rotating_headers(pool),
        )
        morgana.stream_headers = rotating_headers(pool)
        await bench_scaling(res, plan, morgana, many, plan.scaling_workers)


async def bench_long_replies(
    res: Results,
    plan: Plan,
    fake: FakeOpenAIProcess,
    pool: SessionPool,
    fresh_pair: Callable[[str], tuple[ApiProcess, Baseline]],
) -> None:
    """`open_streams_long`: a burst of full-length replies to a fresh API and baseline, each warmed
    by a small burst first (the memory a reply holds grows with its length; a process that served
    a larger burst before would show no growth)."""
    log("open_streams_long: starting a fresh API and baseline")
    api, baseline = fresh_pair("long")  # blocks a few seconds; nothing else is running
    assert api.process is not None and baseline.process is not None
    morgana = Target("morgana", api.url, api.process.pid, "/api/v1/auth/session", "/api/v1/chatbot/chat/stream")
    morgana.stream_headers = rotating_headers(pool)
    base = Target("baseline", baseline.url, baseline.process.pid, "/session", "/chat/stream")
    fake.set_scenario(tokens=plan.open_tokens, delay_ms=10)
    for t in (morgana, base):
        await open_many(t, LONG_WARMUP, plan.open_tokens)
    await bench_open_streams(
        res,
        plan,
        [morgana, base],
        fake,
        pool,
        plan.open_streams_long,
        "open_streams_long",
        plan.long_tokens,
        plan.long_delay_ms,
    )
    api.stop()
    baseline.stop(10.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (~1 minute)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    interrupt_on_sigterm()
    raise_fd_limit()

    res = Results()
    res.emit(
        {
            "bench": "meta",
            "command": COMMAND + (" --quick" if args.quick else ""),
            "make": "make bench" + (" BENCH_ARGS=--quick" if args.quick else ""),
            "quick": args.quick,
            **machine_info(implementation=True),
        }
    )

    began = time.monotonic()
    model_key = "sk-bench-" + secrets.token_hex(8)
    failed = False
    api = baseline = fake = None  # type: ignore[assignment]
    with contextlib.ExitStack() as stack:
        workdir = scratch_dir(stack, "morgana-bench-")
        try:
            log("starting Postgres, Valkey and the fake model server")
            pg, valkey, fake = start_services(stack, workdir, model_key)

            env = morgana_env(pg, valkey, fake, model_key)
            log("migrating")
            migrate(env)
            api = ApiProcess(env, workdir / "api.log", workers=1)
            stack.callback(api.stop)
            api.start()
            api_workers = None
            if plan.scaling_workers:
                api_workers = ApiProcess(env, workdir / "api-workers.log", workers=plan.scaling_workers)
                stack.callback(api_workers.stop)
                api_workers.start()
            baseline_env = {
                "BASELINE_DATABASE_URL": "postgresql+psycopg" + pg.url()[len("postgresql") :],
                "BASELINE_MODEL_URL": fake.base_url,
                "BASELINE_MODEL_KEY": model_key,
                "BASELINE_MODEL_NAME": MODEL,
                "NO_PROXY": "127.0.0.1,localhost",
            }
            baseline = Baseline(baseline_env, workdir / "baseline.log")
            stack.callback(baseline.stop, 10.0)
            baseline.start()

            def fresh_pair(tag: str) -> tuple[ApiProcess, Baseline]:
                fresh_api = ApiProcess(env, workdir / f"api-{tag}.log", workers=1)
                stack.callback(fresh_api.stop)
                fresh_api.start()
                fresh_baseline = Baseline(baseline_env, workdir / f"baseline-{tag}.log")
                stack.callback(fresh_baseline.stop, 10.0)
                fresh_baseline.start()
                return fresh_api, fresh_baseline

            log(
                f"morgana {api.url} (pid {api.process.pid}), baseline {baseline.url} "
                f"(pid {baseline.process.pid}), setup {time.monotonic() - began:.1f} s"
            )

            runner = _uvloop_run()
            runner(run_benchmarks(res, plan, api, baseline, fake, api_workers, fresh_pair))

            logs = (api.log_path, workdir / "api-long.log")
            problems = [line for path in logs for line in log_problems(path, "TimeoutError")]
            res.emit(
                {
                    "bench": "meta",
                    "api_log_error_lines": len(problems),
                    "api_log_sample": problems[:5],
                    "fake_model_stats": fake.stats(),
                    "loadavg": load_average(),
                    "seconds": round(time.monotonic() - began, 1),
                }
            )
            if problems:
                log(f"the API logged {len(problems)} error lines, e.g.:\n" + "\n".join(problems[:5]))
        except KeyboardInterrupt:
            failed = True
            log("interrupted; stopping everything")
        except Exception as exc:
            failed = True
            log(f"FAILED: {type(exc).__name__}: {exc}")
            for name, proc in (("api", api), ("baseline", baseline)):
                with contextlib.suppress(Exception):
                    log(f"{name} log tail:\n{proc.log_tail()}")
            with contextlib.suppress(Exception):
                alive = fake._process is not None and fake._process.poll() is None
                log(f"fake model server alive={alive}; stderr:\n{fake._stderr_text()[-3000:]}")
        finally:
            res.write(RESULTS)
    print_report(res, began)
    return 1 if failed else 0


def _uvloop_run() -> Callable[[Awaitable[None]], None]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run  # type: ignore[return-value]
    return uvloop.run  # type: ignore[return-value]


if __name__ == "__main__":
    raise SystemExit(main())
