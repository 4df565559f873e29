"""Serving the app with uvicorn, and the command line (``python -m morgana_devtools.openai_server``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import anyio
import uvicorn

from morgana_devtools.openai_server.app import create_app
from morgana_devtools.openai_server.asgi import install_log_filter
from morgana_devtools.openai_server.state import DEFAULT_MODEL, DEFAULT_TRANSCRIPT, FakeOpenAIConfig

LISTENING_PREFIX: Final = "LISTENING "


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"fake OpenAI server: cannot listen on {host}:{port}: {exc}") from exc
    return sock


def _public_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _write_atomically(path: str, text: str) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(target)


def _uvicorn_impls() -> tuple[str, str]:
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    return loop, http


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


async def serve(
    config: FakeOpenAIConfig, host: str = "127.0.0.1", port: int = 0, ready_file: str | None = None
) -> None:
    """Serve until stopped; announce ``LISTENING <url>`` on stdout once accepting connections."""
    sock = _bind(host, port)
    loop, http = _uvicorn_impls()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_level="warning",
            access_log=False,
            loop=loop,
            http=http,
            lifespan="off",
            timeout_graceful_shutdown=1,
            backlog=4096,
        )
    )
    install_log_filter()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise SystemExit("fake OpenAI server failed to start")
        await asyncio.sleep(0.01)
    url = _public_url(sock)
    print(f"{LISTENING_PREFIX}{url}", flush=True)
    if ready_file:
        _write_atomically(ready_file, url)
    # import the audio libraries now, not on the first audio request (~0.3 s)
    warm = asyncio.create_task(anyio.to_thread.run_sync(_warm_audio_imports))
    await task
    warm.cancel()


def _warm_audio_imports() -> None:
    for module in ("numpy", "av"):
        with contextlib.suppress(ImportError):
            __import__(module)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m morgana_devtools.openai_server",
        description="A stand-in for the OpenAI API (chat, speech, transcriptions) for tests and local runs.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require this bearer token on /v1 endpoints")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model listed by /v1/models")
    parser.add_argument("--default-tokens", type=int, default=None, help="reply length (default: echo)")
    parser.add_argument("--first-delay-ms", type=float, default=0.0, help="default delay before the first token")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="default delay between tokens")
    parser.add_argument(
        "--transcript", default=DEFAULT_TRANSCRIPT, help="transcript answered when none is queued or set"
    )
    parser.add_argument("--ready-file", default=None, help="write the server URL here once listening")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    args = _parser().parse_args(argv)
    config = FakeOpenAIConfig(
        model=args.model,
        api_key=args.api_key,
        default_tokens=args.default_tokens,
        first_delay_ms=args.first_delay_ms,
        delay_ms=args.delay_ms,
        transcript=args.transcript,
    )
    coro = serve(config, args.host, args.port, args.ready_file)
    with contextlib.suppress(KeyboardInterrupt):
        if _uvicorn_impls()[0] == "uvloop":
            import uvloop

            uvloop.run(coro)
        else:
            asyncio.run(coro)
