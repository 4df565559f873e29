"""Which agentless rooms to send an agent to now: pure bookkeeping, the clock passed in.

LiveKit neither queues nor retries a job that found no available worker, so a caller who
arrived while every worker was full stays alone in the room. Once there is capacity again
the controller (in Kubernetes) or the API (elsewhere: morgana.api.services.agentless) dispatches
the agent to such rooms itself, the longest-waiting first.

- A room is agentless from the first read that saw callers and no agent in it (the
  controller's own clock: no skew with LiveKit's), and is due after `grace` seconds, which
  leaves the normal dispatch (from the caller's token) time to land.
- A room dispatched to is not sent another agent before `retry_after(attempts)`: doubling
  from max(grace, min_retry) (MIN_RETRY_SECONDS unless given) up to MAX_RETRY_SECONDS, so a slow
  job never gets a twin.
- Free capacity is ready workers x rooms per worker, less rooms that have an agent, less
  dispatches still in flight (sent, not yet joined, not yet retryable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from morgana.core.livekit_rooms import Load

MIN_RETRY_SECONDS = 10.0
MAX_RETRY_SECONDS = 300.0


@dataclass
class _Attempts:
    count: int
    last_at: float


@dataclass
class DispatchPlanner:
    agentless_since: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, _Attempts] = field(default_factory=dict)
    min_retry: float = MIN_RETRY_SECONDS

    def observe(self, load: Load, now: float) -> None:
        """Track agentless rooms; forget rooms that got an agent, emptied or closed."""
        agentless = {room.name for room in load.agentless}
        for name in agentless:
            self.agentless_since.setdefault(name, now)
        for name in set(self.agentless_since) - agentless:
            del self.agentless_since[name]
        for name in set(self.attempts) - agentless:
            del self.attempts[name]

    def retry_after(self, attempts: int, grace: float) -> float:
        base = max(grace, self.min_retry)
        factor: int = 2 ** max(attempts - 1, 0)  # typeshed says Any: a negative exponent would give a float
        return min(base * factor, MAX_RETRY_SECONDS)

    def in_flight(self, now: float, grace: float) -> int:
        return sum(1 for a in self.attempts.values() if now - a.last_at < self.retry_after(a.count, grace))

    def due(
        self, load: Load, now: float, grace: float, ready_workers: int | None = None, rooms_per_worker: int = 1
    ) -> list[str]:
        """Rooms to dispatch to now, oldest first, no more than the free capacity (when the ready
        workers are known: LiveKit drops a dispatch that finds no worker, and it is retried)."""
        free = len(self.agentless_since)
        if ready_workers is not None:
            free = ready_workers * rooms_per_worker - load.with_agent - self.in_flight(now, grace)
        if free <= 0:
            return []
        waiting = []
        for name, since in self.agentless_since.items():
            if now - since < grace:
                continue
            tried = self.attempts.get(name)
            if tried and now - tried.last_at < self.retry_after(tried.count, grace):
                continue
            waiting.append((since, name))
        return [name for _, name in sorted(waiting)[:free]]

    def attempts_at(self, room: str) -> int:
        """How many times the agent was sent to `room` since it became agentless."""
        tried = self.attempts.get(room)
        return tried.count if tried else 0

    def dispatched(self, room: str, now: float) -> None:
        tried = self.attempts.get(room)
        self.attempts[room] = _Attempts(count=(tried.count if tried else 0) + 1, last_at=now)

    def waiting_longer_than(self, now: float, grace: float) -> int:
        return sum(1 for since in self.agentless_since.values() if now - since >= grace)
