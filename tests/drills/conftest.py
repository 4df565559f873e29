"""Fault drills: load runs while a real dependency breaks; afterwards nothing acknowledged is lost
and the system has recovered by itself. Each drill breaks a server of its own (never the
session's shared ones), so the rest of the suite is not disturbed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from morgana_devtools.services import EmbeddedPostgres
from tests.api.sse import StreamResult, stream_chat
from tests.conftest import bearer, new_session, register


@pytest.fixture
def own_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("drill-pg") / "data", delete_on_stop=True).start()
    yield server
    server.stop()


@dataclass
class Turn:
    """One chat turn sent during a drill, and what its stream said."""

    session_token: str
    words: str
    result: StreamResult | None = None
    error: str | None = None  # the HTTP exchange itself failed (not an error event)

    @property
    def acknowledged(self) -> bool:
        """The client saw `done: true` without an error: the turn must be in the history."""
        return (
            self.result is not None
            and self.result.status_code == 200
            and self.result.events[-1][1].get("done") is True
            and "error" not in self.result.events[-1][1]
        )


@dataclass
class Streams:
    """Chat streams sent at once from threads, each on its own session, for a drill to break."""

    url: str
    turns: list[Turn] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def prepare(self, count: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            user_token = register(http)["token"]["access_token"]
            self.turns = [
                Turn(new_session(http, user_token)["token"]["access_token"], f"drill turn {n}") for n in range(count)
            ]

    def start(self) -> None:
        def send(turn: Turn) -> None:
            try:
                with httpx.Client(base_url=self.url, timeout=60) as http:
                    turn.result = stream_chat(http, turn.session_token, turn.words)
            except httpx.HTTPError as exc:
                turn.error = f"{type(exc).__name__}: {exc}"

        self.threads = [threading.Thread(target=send, args=(turn,), daemon=True) for turn in self.turns]
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float = 60) -> None:
        for thread in self.threads:
            thread.join(timeout)
        assert not any(thread.is_alive() for thread in self.threads), "a stream never ended"

    def history(self, http: httpx.Client, turn: Turn) -> list[tuple[str, str]]:
        response = http.get("/api/v1/chatbot/messages", headers=bearer(turn.session_token))
        assert response.status_code == 200, response.text
        return [(m["role"], m["content"]) for m in response.json()["messages"]]


def outcome(turn: Turn) -> str:
    """How a stream ended, for assertions and messages: completed, error:<code>, http:<status>, or
    broken (the connection failed without an answer)."""
    if turn.error is not None or turn.result is None:
        return "broken"
    if turn.result.status_code != 200:
        return f"http:{turn.result.status_code}"
    last = turn.result.events[-1][1]
    if "error" in last:
        return f"error:{last['error']['code']}"
    return "completed" if last.get("done") else "unfinished"


def ready(http: httpx.Client) -> bool:
    """Whether /ready answers 200; False too if the request itself fails (a drill breaks things)."""
    try:
        return http.get("/ready").status_code == 200
    except httpx.HTTPError:
        return False
