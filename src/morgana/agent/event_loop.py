"""The event loop every process of the worker runs on: uvloop, unless EVENT_LOOP=asyncio.

livekit-agents makes each process's loop itself with asyncio.new_event_loop() (the worker's in
its CLI, each call's in its job process), so the choice goes through asyncio's loop policy: set
by morgana.agent.cli before the CLI starts, and by morgana.agent.preload in the forkserver that
every job process is forked from. A call forwards audio frames through many small callbacks;
uvloop runs them for about a tenth less CPU a call (bench.voice_bench, `asyncio_loop`).
"""

import asyncio
from typing import Literal

EventLoop = Literal["uvloop", "asyncio"]


def use_event_loop(kind: EventLoop) -> None:
    """Make asyncio.new_event_loop() return a loop of this kind in this process and its forks."""
    if kind == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        asyncio.set_event_loop_policy(None)  # asyncio's own
