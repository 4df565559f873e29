"""The API and the agent worker as child processes (tests, benchmarks, make run)."""

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import httpx

from morgana_devtools.services import eventually, free_port, free_ports


def migrate(env: Mapping[str, str]) -> None:
    """`morgana-api migrate` with `env`, as the chart's migration Job runs it."""
    result = subprocess.run(
        [sys.executable, "-m", "morgana.api.cli", "migrate"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"migration failed:\n{result.stderr}")


class ChildProcess:
    """A command run in the background with its output in a log file, ready when `ready()` is."""

    name = "process"
    ready_timeout = 60.0

    def __init__(self, command: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.command = command
        self.env = dict(env)
        self.log_path = log_path
        self.log_start = 0  # where this run's output begins: logs are appended across runs
        self.process: subprocess.Popen | None = None

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float | None = None) -> "Self":
        timeout = timeout or self.ready_timeout
        with self.log_path.open("ab") as log:
            self.log_start = log.tell()
            self.process = subprocess.Popen(
                self.command, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{self.log_tail()}")
            try:
                return self.ready()
            except (httpx.HTTPError, ValueError):
                return False

        try:
            eventually(up, timeout, interval=0.2)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"{self.name} not ready in {timeout} s:\n{self.log_tail()}") from None
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        """What this run has written to the log (not earlier runs' lines)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def __enter__(self) -> "Self":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class ApiProcess(ChildProcess):
    """`morgana-api serve` on a free loopback port; ready when /health answers."""

    name = "API"

    def __init__(self, env: Mapping[str, str], log_path: Path, workers: int = 1) -> None:
        self.port = free_port()
        super().__init__(
            [sys.executable, "-m", "morgana.api.cli", "serve", "--workers", str(workers)],
            {**env, "HOST": "127.0.0.1", "PORT": str(self.port)},
            log_path,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/health", timeout=1).status_code == 200


class AgentWorker(ChildProcess):
    """`morgana-agent start`; ready once registered with LiveKit."""

    name = "agent worker"
    ready_timeout = 90.0

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        super().__init__([sys.executable, "-m", "morgana.agent.cli", "start"], env, log_path)
        self._given_env = dict(env)
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.health_port, self.metrics_port, self.readiness_port = free_ports(3)
        self.env = {
            **self._given_env,
            "HEALTH_PORT": str(self.health_port),
            "METRICS_PORT": str(self.metrics_port),
            "READINESS_PORT": str(self.readiness_port),
        }

    def start(self, timeout: float | None = None) -> "Self":
        # A port found free can be taken before the worker binds it (any process's outgoing
        # connection may get it): then start again on other ports, twice at most.
        for attempt in range(3):
            try:
                return super().start(timeout)
            except RuntimeError as exc:
                if "address already in use" not in str(exc) or attempt == 2:
                    raise
                self._pick_ports()
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        # The worker's own readiness: 200 only once this process has registered with LiveKit.
        return httpx.get(f"http://127.0.0.1:{self.readiness_port}/ready", timeout=1).status_code == 200
