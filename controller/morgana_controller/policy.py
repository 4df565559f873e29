"""How many agent workers to run: a pure policy, no I/O, the clock passed in.

- The recommendation is the fewest workers that serve every room with a human in it plus
  `headroom` free call slots, ceil((rooms + headroom) / roomsPerWorker), clamped to
  [minReplicas, maxReplicas].
- Scale-up is immediate: a caller waiting for a worker is the failure this exists to prevent.
- Scale-down is stabilised as the HPA does it: only down to the highest recommendation of the
  last `scaleDownStabilizationSeconds`, which is never below what the rooms of now need.
- At most one scale-down per window: after one, the next waits a full window. Together with
  the window this bounds flapping: every direction change down needs a window of calm.
- A fresh policy (controller start, leader change) counts the current replicas as a
  recommendation made now, so nothing is scaled down before it has watched a full window;
  so does `hold` (LiveKit unreachable), so an outage never ends in an unstabilised drop.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    NONE = "none"


@dataclass(frozen=True)
class PolicyParams:
    rooms_per_worker: int = 4
    min_replicas: int = 1
    max_replicas: int = 10
    headroom: int = 1
    scale_down_stabilization_seconds: float = 120.0

    def __post_init__(self) -> None:
        if self.rooms_per_worker < 1:
            raise ValueError("roomsPerWorker must be at least 1")
        if self.min_replicas < 0 or self.max_replicas < 1:
            raise ValueError("minReplicas must be at least 0 and maxReplicas at least 1")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) exceeds maxReplicas ({self.max_replicas})")
        if self.headroom < 0 or self.scale_down_stabilization_seconds < 0:
            raise ValueError("headroom and scaleDownStabilizationSeconds must not be negative")

    def clamp(self, replicas: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, replicas))


def needed_replicas(rooms: int, rooms_per_worker: int) -> int:
    """Workers the rooms of now occupy, with no headroom and no bounds."""
    return math.ceil(max(rooms, 0) / rooms_per_worker)


def recommended_replicas(rooms: int, params: PolicyParams) -> int:
    return params.clamp(needed_replicas(max(rooms, 0) + params.headroom, params.rooms_per_worker))


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    recommended: int
    direction: Direction
    reason: str

    @property
    def changes(self) -> bool:
        return self.desired != self.current


@dataclass
class ScalePolicy:
    """One autoscaler's memory: recent recommendations and its last scale-down."""

    history: deque[tuple[float, int]] = field(default_factory=deque)
    last_scale_down_at: float | None = None

    def decide(self, now: float, rooms: int, current: int, params: PolicyParams) -> Decision:
        recommended = recommended_replicas(rooms, params)
        self._remember(now, current, recommended, params)
        load = f"{rooms} rooms at {params.rooms_per_worker} per worker, headroom {params.headroom}"
        if recommended > current:
            return self._decided(now, current, recommended, recommended, params, f"{load} need {recommended}")
        stabilised = max(r for _, r in self.history)
        window = params.scale_down_stabilization_seconds
        cooling = self.last_scale_down_at is not None and now - self.last_scale_down_at < window
        if stabilised < current and not cooling:
            return self._decided(
                now,
                current,
                stabilised,
                recommended,
                params,
                f"{load} need {recommended}; the highest need of the last {window:g} s is {stabilised}",
            )
        return self._decided(now, current, current, recommended, params, f"{load} need {recommended}")

    def hold(self, now: float, current: int, params: PolicyParams, why: str) -> Decision:
        """Keep the current replicas (within bounds) while the load cannot be read."""
        held = params.clamp(current)
        self._remember(now, current, held, params)
        return self._decided(now, current, held, held, params, f"holding: {why}")

    def _remember(self, now: float, current: int, recommended: int, params: PolicyParams) -> None:
        if not self.history:
            self.history.append((now, params.clamp(current)))
        self.history.append((now, recommended))
        horizon = now - params.scale_down_stabilization_seconds
        while len(self.history) > 1 and self.history[0][0] < horizon:
            self.history.popleft()

    def _decided(
        self, now: float, current: int, desired: int, recommended: int, params: PolicyParams, reason: str
    ) -> Decision:
        # Never below what the rooms of now need; bounds always hold, even against a window
        # remembered under older bounds.
        desired = params.clamp(max(desired, recommended))
        direction = Direction.UP if desired > current else Direction.DOWN if desired < current else Direction.NONE
        if direction is Direction.DOWN:
            self.last_scale_down_at = now
        return Decision(desired=desired, current=current, recommended=recommended, direction=direction, reason=reason)
