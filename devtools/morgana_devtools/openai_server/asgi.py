"""ASGI plumbing shared by the endpoints: compact JSON, headers, disconnect handling and the
simulated connection drops."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping

import anyio
from starlette.types import Receive


def dumps(value: object) -> str:
    """Compact JSON, as OpenAI sends it."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def load_json(raw: bytes) -> object:
    """A decoded JSON body, or ``None`` if it is not JSON."""
    try:
        return json.loads(raw)
    except ValueError:
        return None


def header_list(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI wants them."""
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class SimulatedAbort(Exception):
    """Raised to make the ASGI server drop the connection mid-response (``fail_mode=abort``)."""


class _QuietSimulatedAborts(logging.Filter):
    """Keeps uvicorn from logging a traceback for aborts we cause on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SimulatedAbort))


def install_log_filter() -> None:
    """Keep uvicorn's error log free of tracebacks for ``SimulatedAbort`` (idempotent)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietSimulatedAborts) for f in logger.filters):
        logger.addFilter(_QuietSimulatedAborts())


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(produce: Callable[[], Awaitable[None]], receive: Receive) -> bool:
    """Run ``produce``; cancel it if the client goes away. True if it ran to the end.

    Watching ``receive`` ourselves (rather than relying on StreamingResponse) makes
    disconnects cancel the reply promptly even while it sleeps, on any ASGI spec version.
    """
    finished = False
    error: Exception | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await _wait_for_disconnect(receive)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            await produce()
            finished = True
        except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup)
            error = exc
        group.cancel_scope.cancel()
    if error is not None:
        raise error
    return finished
