"""`morgana-agent`: the voice worker's command line (`start`, `dev`, `download-files`, ...).

Prometheus' multi-process mode is decided when prometheus_client is first imported, so the
directory is set here, before livekit.agents (and its `lk_agents_*` metrics) load.
"""

import atexit
import os
import shutil
import tempfile


def main() -> None:
    from morgana.agent.config import get_settings

    settings = get_settings()
    metrics_dir = settings.prometheus_multiproc_dir
    if not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="morgana-agent-metrics-")
        atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)  # ours: gone with the worker
    os.makedirs(metrics_dir, exist_ok=True)  # an emptyDir starts empty
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from livekit.agents import cli

    from morgana.agent.worker import build_server

    cli.run_app(build_server(settings))


if __name__ == "__main__":
    main()
