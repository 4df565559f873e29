"""Rate limits shared by every replica through Redis (in-process when no Redis is set)."""

import math
import time
from dataclasses import dataclass
from typing import cast

from limits import RateLimitItem, parse_many
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from morgana.api.config import ApiSettings
from morgana.api.redis_pool import blocking_pool

LIMIT_NAMES = ("register", "login", "login_account", "session", "chat", "messages", "livekit")


class RateLimitBackendDown(Exception):
    """The shared store could not be reached: the request is refused with a 503."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_seconds: int = 0


class RateLimiter:
    def __init__(self, settings: ApiSettings) -> None:
        self.enabled = settings.rate_limit_enabled
        self.shared = settings.redis_url is not None
        self._storage: Storage
        if settings.redis_url:
            pool = blocking_pool(settings, settings.redis_url)
            # An "async+" scheme always gives an asyncio storage.
            self._storage = cast(
                Storage,
                storage_from_string(
                    f"async+{settings.redis_url}",
                    implementation="redispy",
                    wrap_exceptions=True,
                    key_prefix="morgana-ratelimit",
                    # limits types its options as float | str | bool, yet documents and passes on connection_pool.
                    connection_pool=pool,  # type: ignore[arg-type]
                ),
            )
        else:
            self._storage = MemoryStorage()
        self._strategy = SlidingWindowCounterRateLimiter(self._storage)
        self._limits: dict[str, list[RateLimitItem]] = {
            name: parse_many(getattr(settings, f"rate_limit_{name}")) for name in LIMIT_NAMES
        }

    async def hit(self, name: str, key: str) -> Decision:
        """Count one request by `key` against the named limits."""
        return await self._check(name, key, count=True)

    async def exceeded(self, name: str, key: str) -> Decision:
        """Whether `key` is over the named limits already, without counting a request."""
        return await self._check(name, key, count=False)

    async def _check(self, name: str, key: str, *, count: bool) -> Decision:
        if not self.enabled:
            return Decision(allowed=True)
        check = self._strategy.hit if count else self._strategy.test
        retry_after = 0
        try:
            for item in self._limits[name]:
                if not await check(item, name, key):
                    stats = await self._strategy.get_window_stats(item, name, key)
                    retry_after = max(retry_after, math.ceil(stats.reset_time - time.time()), 1)
        except StorageError as exc:
            raise RateLimitBackendDown(str(exc)) from exc
        return Decision(allowed=retry_after == 0, retry_after_seconds=retry_after)

    async def forget(self, name: str, key: str) -> None:
        """Drop what `key` has counted against the named limits."""
        if not self.enabled:
            return
        try:
            for item in self._limits[name]:
                await self._strategy.clear(item, name, key)
        except StorageError as exc:
            raise RateLimitBackendDown(str(exc)) from exc

    async def healthy(self) -> bool:
        try:
            return await self._storage.check()
        except Exception:
            return False
