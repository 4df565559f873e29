"""What the API refuses cleanly, and what never leaves it: no 5xx for text Postgres or UTF-8 cannot
carry, no echo of what was sent in a 422, and no password or chat content in its logs, even when
a turn fails to be stored."""

import json
import secrets
from pathlib import Path

import httpx
import pytest

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess
from tests.conftest import STRONG_PASSWORD, bearer, new_session, register, unique_email

CHAT = "/api/v1/chatbot/chat/stream"
BAD_TEXT = {"NUL": "before\x00after", "lone surrogate": "half a pair \ud800"}


def post_json(http: httpx.Client, method: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    """JSON as any client may send it: json.dumps escapes a lone surrogate, which httpx refuses to encode."""
    return http.request(
        method, path, content=json.dumps(body), headers={**(headers or {}), "content-type": "application/json"}
    )


@pytest.mark.parametrize("bad", list(BAD_TEXT), ids=list(BAD_TEXT))
def test_text_postgres_or_utf8_cannot_carry_is_a_422_everywhere(
    client: httpx.Client, chat_session: dict, user: dict, bad: str
) -> None:
    text = BAD_TEXT[bad]
    user_token = user["token"]["access_token"]
    session_id, session_token = chat_session["session_id"], chat_session["token"]["access_token"]
    responses = {
        "register password": post_json(
            client, "POST", "/api/v1/auth/register", {"email": unique_email(), "password": "Aa1!" + text}
        ),
        "session name": post_json(
            client, "PATCH", f"/api/v1/auth/sessions/{session_id}", {"name": text}, bearer(user_token)
        ),
        "chat content": post_json(
            client, "POST", CHAT, {"messages": [{"role": "user", "content": text}]}, bearer(session_token)
        ),
    }
    if bad == "NUL":  # a form cannot carry a lone surrogate: it arrives as U+FFFD
        responses |= {
            "login username": client.post("/api/v1/auth/login", data={"username": text, "password": STRONG_PASSWORD}),
            "login password": client.post(
                "/api/v1/auth/login", data={"username": unique_email(), "password": STRONG_PASSWORD + text}
            ),
        }
    statuses = {where: response.status_code for where, response in responses.items()}
    assert set(statuses.values()) == {422}, statuses
    for response in responses.values():
        assert response.json()["detail"][0]["msg"]


def test_a_422_never_echoes_what_was_sent(client: httpx.Client) -> None:
    secret = "Secret_1" + secrets.token_hex(8) + "!"
    responses = [
        client.post("/api/v1/auth/register", json={"email": "not-an-email", "password": secret}),
        # A missing field's error once carried the whole body as its `input`, password and all.
        client.post("/api/v1/auth/register", json={"password": secret}),
        post_json(client, "POST", "/api/v1/auth/register", {"email": unique_email(), "password": secret + "\ud800"}),
        client.post("/api/v1/auth/login", data={"username": "x\x00y", "password": secret}),
    ]
    for response in responses:
        assert response.status_code == 422, response.text
        assert secret not in response.text
        assert all(set(error) <= {"type", "loc", "msg"} for error in response.json()["detail"]), response.text


def test_logs_of_failing_requests_hold_no_password_and_no_chat_content(
    api_env: dict, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """A run full of failures: refused registrations and logins, and a turn whose storing fails
    (its session deleted while the reply streamed), which logs the database error."""
    secret = "Secret_1" + secrets.token_hex(8) + "!"
    words = "my private words " + secrets.token_hex(8)
    log = tmp_path / "api.log"
    with ApiProcess(api_env, log) as api, httpx.Client(base_url=api.url, timeout=30) as http:
        post_json(http, "POST", "/api/v1/auth/register", {"email": unique_email(), "password": secret + "\ud800"})
        http.post("/api/v1/auth/register", json={"password": secret})
        http.post("/api/v1/auth/login", data={"username": "x\x00y", "password": secret})
        assert http.post("/api/v1/auth/login", data={"username": unique_email(), "password": secret}).status_code == 401

        email = unique_email()
        register(http, email, secret)
        user_token = http.post("/api/v1/auth/login", data={"username": email, "password": secret}).json()[
            "access_token"
        ]
        session = new_session(http, user_token)
        fake_openai.queue_scenario(tokens=30, delay_ms=40)
        with http.stream(
            "POST",
            CHAT,
            headers=bearer(session["token"]["access_token"]),
            json={"messages": [{"role": "user", "content": words}]},
        ) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            deleted = http.delete(f"/api/v1/auth/sessions/{session['session_id']}", headers=bearer(user_token))
            assert deleted.status_code == 204, deleted.text
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert events[-1]["error"]["code"] == "history_unavailable", events
    text = log.read_text()
    assert "could not store a completed turn" in text  # the failure is logged ...
    assert words not in text and secret not in text  # ... without what was said or the password
    assert "You said" not in text
