"""A real LiveKit server as a child process, for tests and `make run`.

The binary is livekit-server built from its Go module at a pinned release by
`scripts/build-livekit-server.sh` and cached outside the repo (see `ensure_binary`).
`LiveKitServer` runs it in dev mode on 127.0.0.1 with free ports picked at start-up, so
it can run beside a developer's own server on 7880:

    with LiveKitServer() as lk:
        api = livekit.api.LiveKitAPI(url=lk.http_url, api_key=lk.api_key, api_secret=lk.api_secret)

Everything is set through one YAML config (`--config-body`, written as JSON, which is
YAML), and the LiveKit variables of our own environment are kept from the child.
"""

import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from morgana_devtools.services import eventually, free_ports

LIVEKIT_SERVER_VERSION = os.environ.get("LIVEKIT_SERVER_VERSION", "v1.13.5")
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-livekit-server.sh"
# Variables livekit-server reads itself (all its LIVEKIT_* flags, plus these): not inherited.
_SERVER_ENV = ("NODE_IP", "UDP_PORT", "REDIS_HOST", "REDIS_PASSWORD")


def cached_binary(version: str = LIVEKIT_SERVER_VERSION) -> Path:
    """Where the build script puts `version` (the binary may not exist yet)."""
    tools = os.environ.get("MORGANA_TOOLS_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "morgana" / "tools"
    )
    return Path(tools) / f"livekit-server-{version}" / "livekit-server"


def ensure_binary() -> Path:
    """$LIVEKIT_SERVER_BIN, else the cached pinned build, else build it now (minutes, once)."""
    if explicit := os.environ.get("LIVEKIT_SERVER_BIN"):
        path = Path(explicit)
        if not os.access(path, os.X_OK):
            raise FileNotFoundError(f"LIVEKIT_SERVER_BIN={explicit} is not an executable file")
        return path
    path = cached_binary()
    if os.access(path, os.X_OK):
        return path
    if not BUILD_SCRIPT.is_file():
        raise FileNotFoundError(f"no livekit-server at {path} and no build script at {BUILD_SCRIPT}")
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        env={**os.environ, "LIVEKIT_SERVER_VERSION": LIVEKIT_SERVER_VERSION},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building livekit-server failed:\n{result.stderr[-4000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


class LiveKitServer:
    """livekit-server --dev on 127.0.0.1: HTTP/WS on `.port`, ICE on `.rtc_tcp_port` and `.udp_port`.

    Ports are chosen once, in the constructor, and kept by `restart()`. `config` is merged
    over the generated config (e.g. `{"room": {"empty_timeout": 5}}`). Use as a context
    manager, or call `start()` / `stop()`.
    """

    def __init__(
        self,
        api_key: str = "devkey",
        api_secret: str = "secret",
        *,
        log_path: Path | None = None,
        config: dict[str, Any] | None = None,
        log_level: str = "info",
        binary: Path | None = None,
        ports: tuple[int, int, int] | None = None,
    ) -> None:
        self.api_key = api_key
        self.api_secret = api_secret
        self.binary = binary
        # (HTTP/WS, RTC TCP, RTC UDP); free ones unless given (make run uses LiveKit's 7880-7882).
        self.port, self.rtc_tcp_port, self.udp_port = ports or free_ports(3)
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="livekit-")) / "livekit-server.log"
        self.config = _merge(
            {
                "port": self.port,
                "bind_addresses": ["127.0.0.1"],
                "keys": {api_key: api_secret},
                "rtc": {
                    "tcp_port": self.rtc_tcp_port,
                    "udp_port": self.udp_port,
                    "node_ip": "127.0.0.1",
                    "use_external_ip": False,
                    "enable_loopback_candidate": True,
                },
                "logging": {"level": log_level},
            },
            config or {},
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """What LiveKit clients and agent workers connect to (LIVEKIT_URL)."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """What server APIs (Twirp, `livekit.api.LiveKitAPI`) are called on."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def start(self, timeout: float = 30.0) -> "LiveKitServer":
        if self.pid is not None:
            return self
        self.binary = self.binary or ensure_binary()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIVEKIT_") and k not in _SERVER_ENV}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "--dev", "--config-body", json.dumps(self.config)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until GET / answers 200 "OK"; raise with the log's tail if it never does."""

        def up() -> bool:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise RuntimeError(f"livekit-server is not running (exit {code}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.http_url + "/", timeout=1) as response:
                    return bool(response.status == 200 and response.read().strip() == b"OK")
            except (urllib.error.URLError, OSError):
                return False

        try:
            eventually(up, timeout)
        except AssertionError:
            raise TimeoutError(f"livekit-server not ready in {timeout} s:\n{self.log_tail()}") from None
        # The server answers ~100 ms before it marks itself running, and ignores a SIGTERM in
        # that window (v1.13.5 server.go): let it pass.
        time.sleep(0.25)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (LiveKit drains: it waits for participants to leave); 2 s later a second
        SIGTERM, which forces it; SIGKILL if it is still up `timeout` seconds after that."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for wait in (min(2.0, timeout), timeout):
            process.terminate()
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait()

    def restart(self, timeout: float = 30.0) -> "LiveKitServer":
        """Stop and start again on the same ports and keys (rooms are lost: no Redis)."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> "LiveKitServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
