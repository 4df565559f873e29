"""Run the real API as a child process (tests, benchmarks): real sockets, real workers."""

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from morgana.devtools.services import free_port


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


class ApiProcess:
    """`morgana-api serve` on a free loopback port, with its log kept in a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, workers: int = 1) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.workers = workers
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.command = [sys.executable, "-m", "morgana.api.cli", "serve", "--workers", str(workers)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> "ApiProcess":
        env = {**os.environ, **self.env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"API exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"API did not become healthy in {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "ApiProcess":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class AgentWorker:
    """`morgana-agent start` as a child process; ready once registered with LiveKit."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.health_port, self.metrics_port = free_port(), free_port()
        self.env = {**os.environ, **env, "HEALTH_PORT": str(self.health_port),
                    "METRICS_PORT": str(self.metrics_port)}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "AgentWorker":
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "morgana.agent.cli", "start"],
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"agent worker exited:\n{self.log_tail()}")
            try:
                worker = httpx.get(f"http://127.0.0.1:{self.health_port}/worker", timeout=1).json()
                if worker.get("worker_id") or worker.get("agent_name"):
                    if self._registered():
                        return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"agent worker did not register in {timeout} s:\n{self.log_tail()}")

    def _registered(self) -> bool:
        return "registered worker" in self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
