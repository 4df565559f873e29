"""``FakeOpenAIProcess``: runs the server in a subprocess and drives its control API."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from queue import Empty, Queue
from types import TracebackType
from typing import IO, Any, Self

from morgana_devtools.openai_server.server import LISTENING_PREFIX


class FakeOpenAIProcess:
    """Runs the fake server in a subprocess (context manager) and drives its control API.

    ``base_url`` ends in ``/v1`` (what ``OPENAI_BASE_URL`` / ``base_url=`` expect);
    ``root_url`` is the bare origin.
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model: str | None = None,
        default_tokens: int | None = None,
        first_delay_ms: float | None = None,
        delay_ms: float | None = None,
        transcript: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 20.0,
    ) -> None:
        options = {
            "--api-key": api_key,
            "--model": model,
            "--default-tokens": default_tokens,
            "--first-delay-ms": first_delay_ms,
            "--delay-ms": delay_ms,
            "--transcript": transcript,
        }
        self._args = ["--host", host, "--port", str(port)]
        for flag, value in options.items():
            if value is not None:
                self._args += [flag, str(value)]
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[str] | None = None
        self._stderr: IO[bytes] | None = None
        self._root_url: str | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def root_url(self) -> str:
        if self._root_url is None:
            raise RuntimeError("fake OpenAI server is not running")
        return self._root_url

    @property
    def base_url(self) -> str:
        return self.root_url + "/v1"

    def start(self) -> Self:
        """Launch the server and wait for its ``LISTENING`` line."""
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "morgana_devtools.openai_server", *self._args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        lines: Queue[str] = Queue()
        threading.Thread(target=_pump_lines, args=(self._process.stdout, lines), daemon=True).start()
        self._root_url = self._await_listening(lines)
        return self

    def _await_listening(self, lines: Queue[str]) -> str:
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.05)
            except Empty:
                if self._process.poll() is not None:
                    break
                continue
            if line.startswith(LISTENING_PREFIX):
                return line[len(LISTENING_PREFIX) :].strip()
        code = self._process.poll()
        reason = f"exited with code {code}" if code is not None else f"not listening after {self._startup_timeout}s"
        stderr = self._stderr_text()
        self.stop()
        raise RuntimeError(f"fake OpenAI server failed to start ({reason}); stderr:\n{stderr}")

    def _stderr_text(self) -> str:
        if self._stderr is None or self._stderr.closed:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
        self._root_url = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # control API -------------------------------------------------------------

    def _control(self, method: str, path: str, payload: object = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.root_url + path, data=data, method=method, headers={"content-type": "application/json"}
        )
        with self._opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def set_scenario(self, **params: object) -> None:
        """Set the sticky scenario (no arguments clears it).

        ``endpoint="transcriptions"`` or ``"speech"`` targets an audio endpoint (default: chat).
        """
        self._control("POST", "/_control/scenario", params)

    def queue_scenario(self, **params: object) -> None:
        """Queue a one-shot scenario for the next chat request (or ``endpoint=...``'s)."""
        self._control("POST", "/_control/queue", params)

    def queue_transcripts(self, *texts: str) -> None:
        """Queue transcripts: each successful transcription answers (and consumes) the next."""
        self._control("POST", "/_control/transcripts", {"texts": list(texts)})

    def set_transcript(self, text: str | None) -> None:
        """Set the sticky transcript used when the queue is empty (``None`` clears it)."""
        self._control("POST", "/_control/transcript", {"text": text})

    def transcripts(self) -> dict[str, Any]:
        """``{"queue": [...], "sticky": str | None, "default": str}``."""
        result: dict[str, Any] = self._control("GET", "/_control/transcripts")
        return result

    def audio_requests(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Recorded audio requests (``"transcriptions"``, ``"speech"`` or both), oldest first."""
        query = "" if endpoint is None else "?" + urllib.parse.urlencode({"endpoint": endpoint})
        result: list[dict[str, Any]] = self._control("GET", "/_control/audio_requests" + query)
        return result

    def reset(self) -> None:
        """Clear scenarios, transcripts, recorded requests and counters."""
        self._control("POST", "/_control/reset", {})

    def requests(self) -> list[dict[str, Any]]:
        """Recorded chat requests, oldest first."""
        result: list[dict[str, Any]] = self._control("GET", "/_control/requests")
        return result

    def stats(self) -> dict[str, int]:
        """Counters: requests, completed, client_disconnected, failed, error_status, open_streams
        (chat); the same five prefixed ``transcriptions_`` and ``speech_``; speech_bytes_sent and
        open_speech_streams."""
        result: dict[str, int] = self._control("GET", "/_control/stats")
        return result


def _pump_lines(stream: IO[str] | None, lines: Queue[str]) -> None:
    if stream is None:
        return
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            lines.put(line)


def _pythonpath() -> str:
    src = str(Path(__file__).resolve().parents[2])  # the directory holding morgana_devtools
    existing = os.environ.get("PYTHONPATH")
    return src if not existing else os.pathsep.join([src, existing])
