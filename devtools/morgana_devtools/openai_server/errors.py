"""OpenAI-style errors (``{"error": {...}}`` bodies, the messages real endpoints give) and
bearer-key authentication."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from morgana_devtools.openai_server.state import FakeOpenAIConfig


class OpenAIError(Exception):
    """An error answered with an OpenAI-style ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def _auth_error(presented: str) -> OpenAIError:
    message = (
        f"Incorrect API key provided: {_mask_key(presented)}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    if not presented:
        message = (
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    return OpenAIError(401, message, code="invalid_api_key")


def status_error(status: int, presented_key: str = "") -> OpenAIError:
    """The error a real OpenAI endpoint gives for ``status`` (used by ``status`` scenarios)."""
    if status == 401:
        return _auth_error(presented_key)
    if status == 429:
        message = "Rate limit reached for requests. Please try again in 1s."
        return OpenAIError(
            429, message, "rate_limit_exceeded", code="rate_limit_exceeded", headers={"retry-after": "1"}
        )
    if status == 500:
        message = "The server had an error while processing your request. Sorry about that!"
        return OpenAIError(500, message, "server_error")
    if status == 503:
        return OpenAIError(503, "The server is overloaded or not ready yet.", "service_unavailable")
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    return OpenAIError(status, f"Simulated HTTP {status} error.", type_)


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, if there is one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def authorize(request: Request, config: FakeOpenAIConfig) -> None:
    """Raise OpenAI's 401 unless the request carries the configured API key (if any)."""
    if config.api_key is not None and bearer_token(request) != config.api_key:
        raise _auth_error(bearer_token(request) or "")


def invalid_request(message: str, param: str | None = "messages") -> OpenAIError:
    """A 400 ``invalid_request_error``."""
    return OpenAIError(400, message, param=param)


def unsupported_value(param: str, message: str) -> OpenAIError:
    """A 400 with code ``unsupported_value``."""
    return OpenAIError(400, message, param=param, code="unsupported_value")
