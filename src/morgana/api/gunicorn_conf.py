"""gunicorn settings for the API image: uvicorn workers, sized from the environment."""

import multiprocessing
import os
from typing import TYPE_CHECKING

from gunicorn import glogging
from prometheus_client import multiprocess

from morgana.core.logging import configure_logging
from morgana.core.multiprocess import prepare_multiprocess_dir, serve_metrics
from morgana.core.settings import CoreSettings

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config
    from gunicorn.workers.base import Worker

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '8000')}"
worker_class = "uvicorn_worker.UvicornWorker"
workers = int(os.environ.get("WEB_CONCURRENCY", min(4, multiprocessing.cpu_count() * 2)))
# Long SSE streams are normal: the worker timeout must not kill them.
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
# Heartbeat files in memory: works with a read-only root filesystem.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# No `gunicornc` control socket: signals do its job in a container, and its default place
# ($HOME/.gunicorn) cannot be created on a read-only root where the user has no home.
control_socket_disable = True
accesslog = None
forwarded_allow_ips = os.environ.get("FORWARDED_ALLOW_IPS", "127.0.0.1")


class JsonLogger(glogging.Logger):  # type: ignore[misc]  # gunicorn ships no types: its Logger is Any
    """gunicorn's own lines (the arbiter's and the workers') through Morgana's one JSON handler,
    instead of gunicorn's plain-text handlers, which also repeated each line through the root."""

    def setup(self, cfg: "Config") -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                log.removeHandler(handler)
            log.propagate = True
        settings = CoreSettings()
        configure_logging(settings.log_level, settings.log_format)


logger_class = JsonLogger


def on_starting(server: "Arbiter") -> None:
    prepare_multiprocess_dir(clear=True)


def when_ready(server: "Arbiter") -> None:
    # The arbiter serves API_METRICS_PORT: one endpoint summing every worker's metrics.
    if port := int(os.environ.get("API_METRICS_PORT") or 0):
        serve_metrics(port, os.environ.get("HOST", "0.0.0.0"))


def child_exit(server: "Arbiter", worker: "Worker") -> None:
    # Drop a dead worker's live gauges from the multiprocess metrics.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
