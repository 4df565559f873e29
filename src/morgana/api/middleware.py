"""Pure ASGI middleware (safe for streaming responses): access log and body-size cap.

The body cap is ours rather than FastAPI's `max_body_size` so that a 413 is JSON like every
other error.
"""

import json
import logging
import time

from prometheus_fastapi_instrumentator.routing import get_route_name
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("morgana.api.access")


class AccessLogMiddleware:
    """One structured line per request: method, route template, status, duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Each matched route's template, found once: finding it matches the path against every
        # route again (30 us a request with this API's routes).
        # Keyed by id: routes compare by value (unhashable), and live as long as the app.
        self._templates: dict[int, str] = {}

    def _template(self, scope: Scope) -> str:
        # Set by the router once it has matched one; a mount has a template per path below it.
        route = scope.get("route")
        cacheable = route is not None and not isinstance(route, Mount)
        if cacheable and (known := self._templates.get(id(route))) is not None:
            return known
        template = get_route_name(Request(scope), should_include_root_path=False) or "unmatched"
        if cacheable:
            self._templates[id(route)] = template
        return template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            log.info(
                "request",
                extra={
                    "method": scope["method"],
                    # The template, never the raw path: no ids or query strings in logs.
                    "route": self._template(scope),
                    "status": status_code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )


class BodySizeLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a 413 before they are buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI turns an HTTPException raised while reading the body into its response.
                    raise HTTPException(413, self._detail)
            return message

        await self.app(scope, limited_receive, send)

    @property
    def _detail(self) -> str:
        return f"Request body larger than {self.max_bytes} bytes"

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": self._detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
