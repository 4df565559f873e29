"""Registration, login, the two token kinds, and session management."""

import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
from jose import jwt

from tests.api.sse import stream_chat
from tests.conftest import JWT_SECRET, STRONG_PASSWORD, bearer, new_session, register, unique_email


def test_register_returns_the_spec_shape(client: httpx.Client) -> None:
    email = unique_email()
    body = register(client, email)
    assert body["email"] == email
    assert isinstance(body["id"], int)
    token = body["token"]
    assert token["token_type"] == "bearer"
    assert token["access_token"].count(".") == 2
    expires_at = datetime.fromisoformat(token["expires_at"].replace("Z", "+00:00"))
    assert expires_at > datetime.now(UTC) + timedelta(days=1)


def test_register_normalises_email_case_and_refuses_duplicates(client: httpx.Client) -> None:
    email = unique_email()
    register(client, email.upper())
    again = client.post("/api/v1/auth/register", json={"email": email, "password": STRONG_PASSWORD})
    assert again.status_code == 409
    assert again.json() == {"detail": "Email already registered"}


def test_register_rejects_invalid_email_and_weak_passwords(client: httpx.Client) -> None:
    bad_email = client.post("/api/v1/auth/register", json={"email": "not-an-email", "password": STRONG_PASSWORD})
    assert bad_email.status_code == 422
    assert bad_email.json()["detail"][0]["loc"] == ["body", "email"]

    for weak, missing in [
        ("short1!A", None),
        ("alllowercase1!", "an uppercase letter"),
        ("NoDigits!!", "a digit"),
        ("NoSymbols123", "a symbol"),
        ("Ab1!", "at least 8"),
    ]:
        response = client.post("/api/v1/auth/register", json={"email": unique_email(), "password": weak})
        if missing is None:
            assert response.status_code == 200, response.text
            continue
        assert response.status_code == 422, weak
        assert missing in response.json()["detail"][0]["msg"]

    missing_fields = client.post("/api/v1/auth/register", json={})
    assert missing_fields.status_code == 422


def test_login_is_form_encoded_and_returns_a_user_token(client: httpx.Client) -> None:
    email = unique_email()
    register(client, email)
    response = client.post("/api/v1/auth/login", data={"username": email.upper(), "password": STRONG_PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_at"}
    # The token it returns works where user tokens belong.
    new_session(client, body["access_token"])

    as_json = client.post("/api/v1/auth/login", json={"username": email, "password": STRONG_PASSWORD})
    assert as_json.status_code == 422


def test_login_accepts_passwords_with_markup_characters(client: httpx.Client) -> None:
    email, password = unique_email(), "Tricky&<>\"'Pass1"
    register(client, email, password)
    response = client.post("/api/v1/auth/login", data={"username": email, "password": password})
    assert response.status_code == 200, response.text


def test_wrong_password_and_unknown_email_get_the_same_answer(client: httpx.Client) -> None:
    email = unique_email()
    register(client, email)
    wrong = client.post("/api/v1/auth/login", data={"username": email, "password": "Wrong_Password1!"})
    unknown = client.post("/api/v1/auth/login", data={"username": unique_email(), "password": STRONG_PASSWORD})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"detail": "Incorrect email or password"}


def test_session_creation_returns_the_spec_shape(client: httpx.Client, user: dict) -> None:
    body = new_session(client, user["token"]["access_token"])
    assert set(body) == {"session_id", "name", "token"}
    uuid.UUID(body["session_id"])
    assert len(body["name"].split("-")) == 3
    assert body["token"]["token_type"] == "bearer"


def test_tokens_are_only_accepted_where_they_belong(client: httpx.Client, user: dict, chat_session: dict) -> None:
    user_token = user["token"]["access_token"]
    session_token = chat_session["token"]["access_token"]

    session_creating_session = client.post("/api/v1/auth/session", headers=bearer(session_token))
    assert session_creating_session.status_code == 403
    assert "user token" in session_creating_session.json()["detail"]

    user_chatting = client.post(
        "/api/v1/chatbot/chat/stream",
        headers=bearer(user_token),
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert user_chatting.status_code == 403
    assert "session token" in user_chatting.json()["detail"]

    for path in ("/api/v1/chatbot/messages",):
        assert client.get(path, headers=bearer(user_token)).status_code == 403
    assert client.post("/api/v1/livekit/token", headers=bearer(user_token)).status_code == 403
    assert client.get("/api/v1/auth/sessions", headers=bearer(session_token)).status_code == 403


def test_missing_forged_and_expired_tokens_are_401(client: httpx.Client, user: dict) -> None:
    no_token = client.post("/api/v1/auth/session")
    assert no_token.status_code == 401
    assert no_token.headers["www-authenticate"] == "Bearer"

    garbage = client.post("/api/v1/auth/session", headers=bearer("not-a-jwt"))
    assert garbage.status_code == 401

    now = int(time.time())
    claims = {"sub": str(user["id"]), "typ": "user", "iat": now - 7200, "exp": now - 3600}
    expired = jwt.encode(claims, JWT_SECRET, algorithm="HS256")
    assert client.post("/api/v1/auth/session", headers=bearer(expired)).status_code == 401

    forged = jwt.encode({**claims, "exp": now + 3600}, "another-secret-" + "x" * 32, algorithm="HS256")
    assert client.post("/api/v1/auth/session", headers=bearer(forged)).status_code == 401

    # An unsigned token ("alg": "none") must never be accepted.
    header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"
    import base64
    import json

    payload = base64.urlsafe_b64encode(json.dumps({**claims, "exp": now + 3600}).encode()).rstrip(b"=").decode()
    assert client.post("/api/v1/auth/session", headers=bearer(f"{header}.{payload}.")).status_code == 401

    untyped = jwt.encode({"sub": str(user["id"]), "exp": now + 3600}, JWT_SECRET, algorithm="HS256")
    assert client.post("/api/v1/auth/session", headers=bearer(untyped)).status_code == 401


def test_sessions_can_be_listed_renamed_and_deleted(client: httpx.Client, user: dict) -> None:
    token = user["token"]["access_token"]
    first = new_session(client, token)
    second = new_session(client, token)

    listed = client.get("/api/v1/auth/sessions", headers=bearer(token))
    assert listed.status_code == 200
    assert [s["session_id"] for s in listed.json()] == [second["session_id"], first["session_id"]]

    renamed = client.patch(
        f"/api/v1/auth/sessions/{first['session_id']}", headers=bearer(token), json={"name": "  Trip planning "}
    )
    assert renamed.status_code == 200
    assert renamed.json()["name"] == "Trip planning"
    assert (
        client.patch(
            f"/api/v1/auth/sessions/{first['session_id']}", headers=bearer(token), json={"name": "   "}
        ).status_code
        == 422
    )

    deleted = client.delete(f"/api/v1/auth/sessions/{first['session_id']}", headers=bearer(token))
    assert deleted.status_code == 204
    assert [s["session_id"] for s in client.get("/api/v1/auth/sessions", headers=bearer(token)).json()] == [
        second["session_id"]
    ]
    # The deleted session's token is dead with it.
    gone = client.get("/api/v1/chatbot/messages", headers=bearer(first["token"]["access_token"]))
    assert gone.status_code == 401
    assert client.delete(f"/api/v1/auth/sessions/{first['session_id']}", headers=bearer(token)).status_code == 404


def test_a_new_token_for_an_existing_session_continues_its_conversation(client: httpx.Client, user: dict) -> None:
    """A client with the user's token but not the session's (another device, a reloaded page)."""
    token = user["token"]["access_token"]
    session = new_session(client, token)
    said = stream_chat(client, session["token"]["access_token"], "remember this")
    assert said.status_code == 200
    again = client.post(f"/api/v1/auth/sessions/{session['session_id']}/token", headers=bearer(token))
    assert again.status_code == 200, again.text
    assert (again.json()["session_id"], again.json()["name"]) == (session["session_id"], session["name"])
    fresh = again.json()["token"]["access_token"]
    assert fresh != session["token"]["access_token"]
    history = client.get("/api/v1/chatbot/messages", headers=bearer(fresh)).json()["messages"]
    assert [m["content"] for m in history] == ["remember this", "You said: remember this"]
    # A session token cannot ask for one; nor can anybody for a session that is not theirs.
    assert client.post(f"/api/v1/auth/sessions/{session['session_id']}/token", headers=bearer(fresh)).status_code == 403
    assert client.post(f"/api/v1/auth/sessions/{uuid.uuid4()}/token", headers=bearer(token)).status_code == 404


def test_users_cannot_touch_each_others_sessions(client: httpx.Client, user: dict) -> None:
    mine = new_session(client, user["token"]["access_token"])
    stranger = register(client)["token"]["access_token"]
    path = f"/api/v1/auth/sessions/{mine['session_id']}"
    assert client.patch(path, headers=bearer(stranger), json={"name": "mine now"}).status_code == 404
    assert client.delete(path, headers=bearer(stranger)).status_code == 404
    assert client.post(f"{path}/token", headers=bearer(stranger)).status_code == 404
    assert client.get("/api/v1/auth/sessions", headers=bearer(stranger)).json() == []
    assert (
        client.patch("/api/v1/auth/sessions/not-a-uuid", headers=bearer(stranger), json={"name": "x"}).status_code
        == 422
    )


def test_logout_revokes_every_token_of_the_account(client: httpx.Client) -> None:
    user = register(client)
    user_token = user["token"]["access_token"]
    session_token = new_session(client, user_token)["token"]["access_token"]
    other_device = client.post("/api/v1/auth/login", data={"username": user["email"], "password": STRONG_PASSWORD})
    other_token = other_device.json()["access_token"]

    assert client.post("/api/v1/auth/logout", headers=bearer(user_token)).status_code == 204
    for token in (user_token, other_token):
        refused = client.get("/api/v1/auth/sessions", headers=bearer(token))
        assert refused.status_code == 401
        assert refused.json()["detail"].startswith("This token was revoked")
    assert client.get("/api/v1/chatbot/messages", headers=bearer(session_token)).status_code == 401
    # Creating a session checks the token and inserts in one statement: refused, nothing created.
    created = client.post("/api/v1/auth/session", headers=bearer(user_token))
    assert created.status_code == 401 and created.json()["detail"].startswith("This token was revoked")
    # Logging in again gives a token that works.
    again = client.post("/api/v1/auth/login", data={"username": user["email"], "password": STRONG_PASSWORD})
    listed = client.get("/api/v1/auth/sessions", headers=bearer(again.json()["access_token"]))
    assert listed.status_code == 200 and len(listed.json()) == 1


def test_a_password_change_revokes_the_old_tokens_and_the_old_password(client: httpx.Client) -> None:
    user = register(client)
    user_token = user["token"]["access_token"]
    session_token = new_session(client, user_token)["token"]["access_token"]
    new_password = "A_New_Password_456?"

    wrong = client.post(
        "/api/v1/auth/password",
        headers=bearer(user_token),
        json={"current_password": "Not_The_Passw0rd!", "new_password": new_password},
    )
    assert wrong.status_code == 401 and wrong.json()["detail"] == "Incorrect current password"
    weak = client.post(
        "/api/v1/auth/password",
        headers=bearer(user_token),
        json={"current_password": STRONG_PASSWORD, "new_password": "weak"},
    )
    assert weak.status_code == 422
    changed = client.post(
        "/api/v1/auth/password",
        headers=bearer(user_token),
        json={"current_password": STRONG_PASSWORD, "new_password": new_password},
    )
    assert changed.status_code == 200, changed.text
    assert client.get("/api/v1/auth/sessions", headers=bearer(changed.json()["access_token"])).status_code == 200
    assert client.get("/api/v1/auth/sessions", headers=bearer(user_token)).status_code == 401
    assert client.get("/api/v1/chatbot/messages", headers=bearer(session_token)).status_code == 401
    old = client.post("/api/v1/auth/login", data={"username": user["email"], "password": STRONG_PASSWORD})
    assert old.status_code == 401
    new = client.post("/api/v1/auth/login", data={"username": user["email"], "password": new_password})
    assert new.status_code == 200
