"""Reading the chat stream as a client would, with httpx-sse."""

import json
from dataclasses import dataclass

import httpx
from httpx_sse import connect_sse

from tests.conftest import bearer


@dataclass
class StreamResult:
    status_code: int
    events: list[tuple[str, dict]]

    @property
    def text(self) -> str:
        return "".join(data["content"] for _, data in self.events)

    @property
    def last(self) -> dict:
        return self.events[-1][1]


def stream_chat(http: httpx.Client, session_token: str, content: str, **extra) -> StreamResult:
    body = {"messages": [{"role": "user", "content": content}], **extra}
    with connect_sse(http, "POST", "/api/v1/chatbot/chat/stream", json=body, headers=bearer(session_token)) as source:
        if source.response.status_code != 200:
            source.response.read()
            return StreamResult(source.response.status_code, [("http", source.response.json())])
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = [(event.event, json.loads(event.data)) for event in source.iter_sse()]
    return StreamResult(200, events)
