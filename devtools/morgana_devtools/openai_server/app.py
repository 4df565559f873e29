"""The ASGI app: the OpenAI routes, the control routes and OpenAI-style errors for the rest."""

from __future__ import annotations

from typing import Final

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from morgana_devtools.openai_server.asgi import install_log_filter
from morgana_devtools.openai_server.chat import chat_completions
from morgana_devtools.openai_server.control import control_routes
from morgana_devtools.openai_server.errors import OpenAIError, authorize
from morgana_devtools.openai_server.speech import audio_speech
from morgana_devtools.openai_server.state import FakeOpenAIConfig, FakeOpenAIState, fake_state
from morgana_devtools.openai_server.transcription import audio_transcriptions

OWNER: Final = "morgana-dev"


async def list_models(request: Request) -> Response:
    """``GET /v1/models``."""
    state = fake_state(request)
    try:
        authorize(request, state.config)
    except OpenAIError as exc:
        return exc.response()
    model = {"id": state.config.model, "object": "model", "created": 1700000000, "owned_by": OWNER}
    return JSONResponse({"object": "list", "data": [model]})


def openai_routes() -> list[BaseRoute]:
    """The OpenAI-compatible API surface (add further ``/v1`` endpoints here)."""
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/audio/transcriptions", audio_transcriptions, methods=["POST"]),
        Route("/v1/audio/speech", audio_speech, methods=["POST"]),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos."
        return OpenAIError(404, message, code="unknown_url").response()
    return OpenAIError(status, str(getattr(exc, "detail", exc))).response()


def create_app(config: FakeOpenAIConfig | None = None) -> Starlette:
    """Build the ASGI app; its state lives in ``app.state.fake`` (a ``FakeOpenAIState``)."""
    install_log_filter()
    app = Starlette(
        routes=[*openai_routes(), *control_routes()],
        exception_handlers={HTTPException: _http_error},
    )
    app.state.fake = FakeOpenAIState(config or FakeOpenAIConfig())
    return app
