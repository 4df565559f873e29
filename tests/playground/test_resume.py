"""The playground picks a dropped chat stream up again (GET /chatbot/chat/stream, Last-Event-ID).

The connection is dropped by a small TCP proxy between the browser and the API, which the test
resets mid-reply, as a network would: Chromium sees the reply's body end in a connection reset
(a network error in the page's fetch), and the API sees its client go away.
"""

import re
import socket
import struct
import threading
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Page, Request, Route, expect

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess
from tests.conftest import bearer
from tests.playground.conftest import Steps, sign_up_with_a_session

STREAM_PATH = "/api/v1/chatbot/chat/stream"


class CuttableProxy:
    """Forwards loopback TCP connections to a port; `cut()` resets every connection open now."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # cut, or the other side went away

    def cut(self) -> int:
        """Drop both ends of every open connection; how many there were."""
        with self.lock:
            cut, self.open = self.open, []
        for sock in cut:
            try:
                # shutdown wakes the pump blocked in recv (a close alone would not, and would not
                # end the connection while that recv holds the socket); no linger: a reset.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        return len(cut) // 2

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(playground_api: ApiProcess) -> Iterator[CuttableProxy]:
    running = CuttableProxy(playground_api.port)
    yield running
    running.close()


def session_token(page: Page) -> str:
    tokens: dict[str, dict[str, str]] = page.evaluate('JSON.parse(localStorage.getItem("morgana.sessionTokens"))')
    (token,) = tokens.values()
    return token["access_token"]


def test_a_dropped_reply_is_picked_up_again(
    page: Page, steps: Steps, proxy: CuttableProxy, playground_api: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    sign_up_with_a_session(page, proxy.url)
    resumes: list[str | None] = []  # the Last-Event-ID of each GET of the stream

    def watch(request: Request) -> None:
        if request.method == "GET" and request.url.endswith(STREAM_PATH):
            resumes.append(request.headers.get("last-event-id"))

    page.on("request", watch)

    # A reply of 32 tokens, 80 ms apart: cut after the first few words are shown.
    message = "resume " + " ".join(f"w{i:02d}" for i in range(30))
    fake_openai.queue_scenario(delay_ms=80)
    page.fill("#message", message)
    page.press("#message", "Enter")
    reply = page.locator('[data-testid="message-assistant"]').last
    expect(reply).to_contain_text("w03")
    steps.shot("streaming")
    assert proxy.cut() >= 1
    shown_at_cut = reply.inner_text()
    assert "w29" not in shown_at_cut, shown_at_cut  # the drop happened mid-reply

    # The page says it reconnects, and goes on in the same bubble.
    expect(page.locator("#status")).to_have_text(re.compile(r"^Connection lost: reconnecting… \(attempt 1\)$"))
    expect(reply).to_have_class(re.compile(r"\bstreaming\b"))
    steps.shot("reconnecting")
    expect(page.locator("#status")).to_have_text("Reply complete (reconnected after the connection dropped)")
    steps.shot("reconnected")
    # The whole reply, once: nothing lost at the cut, nothing sent twice.
    expect(reply).to_have_text(f"You said: {message}")
    expect(reply).not_to_have_class(re.compile(r"\b(streaming|failed)\b"))
    expect(page.locator('[data-testid="message-assistant"]')).to_have_count(1)
    assert len(resumes) == 1 and re.fullmatch(r"[\w-]+:\d+", resumes[0] or ""), resumes

    # One model call for the message, and the turn stored once.
    calls = [r for r in fake_openai.requests() if r["messages"][-1]["content"] == message]
    assert len(calls) == 1, calls
    with httpx.Client(base_url=playground_api.url, timeout=30) as http:
        stored = http.get("/api/v1/chatbot/messages", headers=bearer(session_token(page))).json()["messages"]
    assert [m["content"] for m in stored] == [message, f"You said: {message}"]
    page.reload()
    page.locator('[data-testid="session-name"]').click()
    expect(page.locator("#messages .message .text")).to_have_text([message, f"You said: {message}"])
    expect(page.locator("#history-count")).to_have_text("2 stored")
    steps.shot("history")


def test_a_stream_no_longer_kept_falls_back_to_the_history(
    page: Page, steps: Steps, proxy: CuttableProxy, playground_api: ApiProcess, fake_openai: FakeOpenAIProcess
) -> None:
    sign_up_with_a_session(page, proxy.url)
    message = "gone " + " ".join(f"w{i:02d}" for i in range(20))

    def gone(route: Route) -> None:
        if route.request.method != "GET":
            route.fallback()
            return
        # What the API answers once the stream's events have expired (CHAT_STREAM_RESUME_SECONDS);
        # answered when the reply, which went on without its client, is stored.
        with httpx.Client(base_url=playground_api.url, timeout=30) as http:
            token = route.request.headers["authorization"].removeprefix("Bearer ")
            for _ in range(100):
                if len(http.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"]) == 2:
                    break
                page.wait_for_timeout(100)
        route.fulfill(
            status=410,
            json={"detail": "This stream's events are no longer kept.", "history": "/api/v1/chatbot/messages"},
        )

    page.route(f"**{STREAM_PATH}", gone)
    fake_openai.queue_scenario(delay_ms=80)
    page.fill("#message", message)
    page.press("#message", "Enter")
    reply = page.locator('[data-testid="message-assistant"]').last
    expect(reply).to_contain_text("w03")
    assert proxy.cut() >= 1
    expect(page.locator("#status")).to_have_text(
        "The connection dropped and the reply's stream is gone: reloaded the history"
    )
    expect(page.locator("#messages .message .text")).to_have_text([message, f"You said: {message}"])
    expect(page.locator("#history-count")).to_have_text("2 stored")
    steps.shot("history-reloaded")
