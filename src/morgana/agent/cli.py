"""`morgana-agent`: the voice worker's command line (`start`, `dev`, `download-files`, ...).

Prometheus' multi-process mode is decided when prometheus_client is first imported, so the
directory is set here, before livekit.agents (and its `lk_agents_*` metrics) load.
"""

import os
import tempfile


def main() -> None:
    from morgana.agent.config import get_settings

    settings = get_settings()
    metrics_dir = settings.prometheus_multiproc_dir or tempfile.mkdtemp(prefix="morgana-agent-metrics-")
    os.makedirs(metrics_dir, exist_ok=True)  # an emptyDir starts empty
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from livekit.agents import cli

    from morgana.agent.worker import build_server

    cli.run_app(build_server(settings))


if __name__ == "__main__":
    main()
