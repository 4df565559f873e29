"""Prometheus' multi-process mode: the directory where each process of a deployable writes its metrics.

prometheus_client opens a file there for every metric as the metric is created, so the
directory must exist before the first module defining one is imported. In a container it is
usually under /tmp, an emptyDir that starts out empty, and nothing else creates it: every
entry point prepares it first, whatever the command (even `migrate` imports metrics).
"""

import os

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector


def prepare_multiprocess_dir(*, clear: bool = False) -> str | None:
    """Create PROMETHEUS_MULTIPROC_DIR if it is set; with `clear`, empty it.

    Clear it only when starting the processes that will fill it (a server, not a one-off
    command): a previous run's files would be summed into the new run's metrics.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return None
    os.makedirs(directory, exist_ok=True)
    if clear:
        for entry in os.scandir(directory):
            if entry.is_file():
                os.remove(entry.path)
    return directory


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on a port of its own, in a thread of this process: every process's metrics,
    summed, when PROMETHEUS_MULTIPROC_DIR is set (the gunicorn arbiter serves its workers')."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    start_http_server(port, addr=host, registry=registry)
