"""The Morgana API as the agent uses it: log in, join each caller's session, stream replies."""

import json
import logging
import ssl
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

import httpx
from httpx_sse import aconnect_sse

log = logging.getLogger(__name__)


class ApiError(Exception):
    """The API could not serve a request; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class ChatSession:
    session_id: str
    token: str


class MorganaApi:
    """One HTTP client per job process; the user token is renewed on expiry (401)."""

    def __init__(
        self, base_url: str, email: str, password: str, timeout: float = 30.0, tls: ssl.SSLContext | bool = True
    ) -> None:
        self._email = email
        self._password = password
        self._user_token: str | None = None
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, verify=tls)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def login(self) -> None:
        response = await self._request(
            "POST", "/api/v1/auth/login", data={"username": self._email, "password": self._password}
        )
        self._user_token = response.json()["access_token"]

    async def join_call(self, credential: str, room: str) -> ChatSession:
        """The caller's own session, for this call: trades the call credential from the job's
        dispatch metadata for a voice token that adds the call's turns to their conversation."""
        return await self._session_request("/api/v1/livekit/call-session", {"credential": credential, "room": room})

    async def create_session(self) -> ChatSession:
        """A session of the agent's own account, for a room opened without the API's token."""
        return await self._session_request("/api/v1/auth/session")

    async def _session_request(self, path: str, body: Mapping[str, str] | None = None) -> ChatSession:
        # Logs in first, and once more if the user token expired (401).
        for attempt in range(2):
            if self._user_token is None:
                await self.login()
            try:
                response = await self._request("POST", path, json_body=body, headers=_bearer(self._user_token or ""))
            except ApiError as exc:
                if exc.status == 401 and attempt == 0:
                    self._user_token = None
                    continue
                raise
            answer = response.json()
            return ChatSession(session_id=answer["session_id"], token=answer["token"]["access_token"])
        raise ApiError("could not get a session", retryable=False)

    async def stream_reply(
        self, session: ChatSession, text: str, turn_id: str | None = None
    ) -> AsyncGenerator[str, None]:
        """Send one user turn and yield the reply's text as the API streams it. With a `turn_id`,
        the API stores the turn at most once, and `withdraw_turn` can take it back.

        Closing the generator closes the HTTP stream, which cancels the model call upstream (a
        caller who speaks over the reply leaves nothing to pick up).
        """
        body: dict[str, object] = {"messages": [{"role": "user", "content": text}], "on_disconnect": "cancel"}
        if turn_id is not None:
            body["turn_id"] = turn_id
        try:
            async with aconnect_sse(
                self._http,
                "POST",
                "/api/v1/chatbot/chat/stream",
                json=body,
                headers=_bearer(session.token),
            ) as source:
                if source.response.status_code != 200:
                    await source.response.aread()
                    raise _status_error(source.response)
                async for event in source.aiter_sse():
                    data = json.loads(event.data)
                    if error := data.get("error"):
                        if error.get("code") == "turn_withdrawn":
                            return  # this worker took the turn back: nobody waits for its reply
                        raise ApiError(f"{error.get('code')}: {error.get('message')}")
                    if data.get("content"):
                        yield data["content"]
                    if data.get("done"):
                        return
            raise ApiError("the reply stream ended without done")
        except httpx.HTTPError as exc:
            raise ApiError(f"API unreachable: {type(exc).__name__}") from exc

    async def withdraw_turn(self, session: ChatSession, turn_id: str) -> int:
        """Take back a turn sent with `turn_id`: deleted if stored, never stored if its reply is
        still running. How many messages were deleted."""
        response = await self._request("DELETE", f"/api/v1/chatbot/turns/{turn_id}", headers=_bearer(session.token))
        return int(response.json()["deleted"])

    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: Mapping[str, str] | None = None,
        json_body: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = await self._http.request(method, path, data=data, json=json_body, headers=headers)
        except httpx.HTTPError as exc:
            raise ApiError(f"API unreachable: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise _status_error(response)
        return response


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _status_error(response: httpx.Response) -> ApiError:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text[:200]
    status = response.status_code
    return ApiError(f"API answered {status}: {detail}", status=status, retryable=status in (408, 429) or status >= 500)
