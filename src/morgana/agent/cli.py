"""`morgana-agent`: the voice worker's command line (`start`, `dev`, `download-files`, ...).

Prometheus' multi-process mode is decided when prometheus_client is first imported, so the
directory is set here, before livekit.agents (and its `lk_agents_*` metrics) load.
"""

import atexit
import os
import shutil
import tempfile

# livekit-agents watches every process's event loop for blocks: a heartbeat and a watchdog thread
# each wake every fifth of the warn threshold (100 ms -> 50 wake-ups a second each), 1.3 % of a
# core per process, busy or idle, about a tenth of what a call costs. From 250 ms they wake every
# 50 ms (0.5 %). Job processes inherit the environment from the worker.
LOOP_BLOCK_WARN_ENV = "LIVEKIT_AGENTS_LOOP_BLOCK_WARN_MS"
DEFAULT_LOOP_BLOCK_WARN_MS = "250"


def quieter_loop_monitor() -> None:
    """Warn of event-loop blocks from 250 ms unless the operator chose (0 turns the monitor off)."""
    os.environ.setdefault(LOOP_BLOCK_WARN_ENV, DEFAULT_LOOP_BLOCK_WARN_MS)


# livekit-agents' forkserver otherwise loads its local models: the VAD, which morgana.agent.preload
# loads instead, and its end-of-turn model (244 MB in every worker, never used beside Smart Turn).
PRELOAD_LOCAL_INFERENCE_ENV = "LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE"


def no_unused_models() -> None:
    os.environ[PRELOAD_LOCAL_INFERENCE_ENV] = "0"


def main() -> None:
    from morgana.agent.config import get_settings
    from morgana.agent.event_loop import use_event_loop

    settings = get_settings()
    metrics_dir = settings.prometheus_multiproc_dir
    if not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="morgana-agent-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)  # ours: gone with the worker
    os.makedirs(metrics_dir, exist_ok=True)  # an emptyDir starts empty
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    quieter_loop_monitor()
    no_unused_models()
    use_event_loop(settings.event_loop)
    from livekit.agents import cli

    from morgana.agent.worker import build_server

    cli.run_app(build_server(settings))


if __name__ == "__main__":
    main()
