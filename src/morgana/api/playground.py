"""The playground: the reference browser client (web/playground/), served at /playground.

Off unless PLAYGROUND_ENABLED (`make run` turns it on). The page is static files built by
scripts/build-playground.sh into playground_static/, which ships inside the package; it calls the
API on its own origin, so it needs no CORS, and its Content-Security-Policy lets it reach only
the API and the LiveKit server the token endpoint hands out.
"""

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from morgana.api.config import ApiSettings, ConfigurationError

PLAYGROUND_PATH = "/playground"
STATIC_DIR = Path(__file__).parent / "playground_static"


def livekit_origins(url: str) -> list[str]:
    """The origins a LiveKit client reaches for `url`: its WebSocket and the HTTP(S) twin that
    livekit-client asks when a connection fails (ws -> http, wss -> https)."""
    parts = urlsplit(url)
    if not parts.netloc:
        return []
    secure = parts.scheme in ("wss", "https")
    return [f"{'wss' if secure else 'ws'}://{parts.netloc}", f"{'https' if secure else 'http'}://{parts.netloc}"]


def security_headers(settings: ApiSettings) -> list[tuple[bytes, bytes]]:
    connect = ["'self'"]
    if settings.livekit_configured:
        connect += livekit_origins(settings.livekit_client_url)
    policy = "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src {' '.join(connect)}",
            # The agent's audio plays from MediaStreams (livekit-client's track.attach()).
            "media-src 'self' blob: mediastream:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )
    headers = {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Permissions-Policy": "microphone=(self), camera=(), geolocation=()",
        # Revalidated each time (StaticFiles answers 304 from its ETag): a new build shows at once.
        "Cache-Control": "no-cache",
    }
    return [(name.lower().encode(), value.encode()) for name, value in headers.items()]


class _WithHeaders:
    """An ASGI app with fixed headers added to each of its responses."""

    def __init__(self, app: ASGIApp, headers: list[tuple[bytes, bytes]]) -> None:
        self.app = app
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def mount_playground(app: FastAPI, settings: ApiSettings) -> None:
    """Serve the built playground at /playground/ (/playground redirects there)."""
    if not (STATIC_DIR / "index.html").is_file():
        raise ConfigurationError(
            f"PLAYGROUND_ENABLED is set but the playground is not built ({STATIC_DIR}): run scripts/build-playground.sh"
        )
    files = StaticFiles(directory=STATIC_DIR, html=True)
    app.mount(PLAYGROUND_PATH, _WithHeaders(files, security_headers(settings)), name="playground")
