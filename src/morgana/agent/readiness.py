"""`GET /ready` on READINESS_PORT: 200 once this worker has registered with LiveKit, 503 before.

livekit-agents' own health endpoint (`/` on HEALTH_PORT) answers 200 from start-up, seconds
before the worker registers. A pod Ready in that window is one LiveKit cannot send calls to yet:
a rollout would let old workers go before new ones can take a call, and `make run` would say
"ready" to a caller who then joins a room no worker is dispatched to. The framework's routes are
built inside its run loop, so this is a server of its own, started with the worker.
"""

import asyncio
import logging

from aiohttp import web
from livekit.agents import AgentServer

log = logging.getLogger(__name__)


class Readiness:
    def __init__(self, port: int, host: str = "0.0.0.0") -> None:  # probed by the kubelet: all interfaces
        self.port = port
        self.host = host
        self.worker_id: str | None = None
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None

    def attach(self, server: AgentServer) -> None:
        def started() -> None:
            self._task = asyncio.get_running_loop().create_task(self.serve(), name="readiness")

        def registered(worker_id: str, *_: object) -> None:
            self.worker_id = worker_id

        server.on("worker_started", started)
        server.on("worker_registered", registered)

    async def ready(self, _: web.Request) -> web.Response:
        if self.worker_id is None:
            return web.json_response({"status": "starting", "detail": "not registered with LiveKit yet"}, status=503)
        return web.json_response({"status": "ready", "worker_id": self.worker_id})

    async def serve(self) -> None:
        app = web.Application()
        app.router.add_get("/ready", self.ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError as exc:
            # Never Ready then: said plainly, not left to an unretrieved task exception.
            log.error("readiness endpoint cannot listen", extra={"port": self.port, "error": str(exc)})
            raise
        log.info("readiness endpoint listening", extra={"port": self.port})
