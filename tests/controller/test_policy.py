"""The scaling policy on its own: examples, then properties over arbitrary load histories."""

import math
from itertools import pairwise

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from morgana_controller.policy import (
    Direction,
    PolicyParams,
    ScalePolicy,
    needed_replicas,
    recommended_replicas,
)

PARAMS = PolicyParams(
    rooms_per_worker=4, min_replicas=1, max_replicas=10, headroom=1, scale_down_stabilization_seconds=120
)


def run(policy: ScalePolicy, params: PolicyParams, steps: list[tuple[float, int]], current: int) -> list:
    """Closed loop: each decision becomes the next tick's current replicas. (time, replicas, decision)."""
    trace = []
    for now, rooms in steps:
        decision = policy.decide(now, rooms, current, params)
        trace.append((now, rooms, decision))
        current = decision.desired
    return trace


# --- examples ---------------------------------------------------------------------------------


def test_recommendation_is_rooms_plus_headroom_over_rooms_per_worker_within_bounds() -> None:
    assert recommended_replicas(0, PARAMS) == 1  # headroom alone needs one worker
    assert recommended_replicas(3, PARAMS) == 1  # 3 calls + 1 free slot fit in 4
    assert recommended_replicas(4, PARAMS) == 2  # the 5th slot needs a second worker
    assert recommended_replicas(200, PARAMS) == 10  # max bound
    assert recommended_replicas(0, PolicyParams(min_replicas=3)) == 3  # min bound
    assert recommended_replicas(0, PolicyParams(min_replicas=0, headroom=0)) == 0
    assert needed_replicas(9, 4) == 3


def test_scale_up_is_immediate_and_scale_down_waits_for_the_window() -> None:
    policy = ScalePolicy()
    up = policy.decide(0.0, 11, current=1, params=PARAMS)
    assert (up.desired, up.direction) == (3, Direction.UP)
    # The rooms empty out: nothing moves until the need of 3 has left the 120 s window.
    for now in range(5, 120, 5):
        assert policy.decide(float(now), 0, current=3, params=PARAMS).desired == 3
    down = policy.decide(121.0, 0, current=3, params=PARAMS)
    assert (down.desired, down.direction) == (1, Direction.DOWN)
    assert "highest need of the last 120 s is 1" in down.reason


def test_scale_down_goes_only_to_the_highest_need_of_the_window() -> None:
    policy = ScalePolicy()
    policy.decide(0.0, 20, current=1, params=PARAMS)  # 6 workers
    policy.decide(60.0, 10, current=6, params=PARAMS)  # need 3, remembered
    down = policy.decide(125.0, 0, current=6, params=PARAMS)  # the 6 has left the window, the 3 has not
    assert down.desired == 3
    # ... and the next step down waits a full window after this one.
    assert policy.decide(185.0, 0, current=3, params=PARAMS).desired == 3
    assert policy.decide(246.0, 0, current=3, params=PARAMS).desired == 1


def test_a_new_policy_does_not_scale_down_before_watching_a_full_window() -> None:
    policy = ScalePolicy()  # e.g. the controller restarted, or another replica took over
    assert policy.decide(1000.0, 0, current=5, params=PARAMS).desired == 5
    assert policy.decide(1119.0, 0, current=5, params=PARAMS).desired == 5
    assert policy.decide(1121.0, 0, current=5, params=PARAMS).desired == 1


def test_holding_keeps_replicas_and_an_outage_does_not_end_in_an_unstabilised_drop() -> None:
    policy = ScalePolicy()
    policy.decide(0.0, 20, current=1, params=PARAMS)
    for now in range(10, 600, 10):  # LiveKit unreachable for ten minutes
        held = policy.hold(float(now), current=6, params=PARAMS, why="LiveKit down")
        assert (held.desired, held.direction) == (6, Direction.NONE)
    # Back, and the rooms are gone (LiveKit restarted): a full window after the last held tick
    # (590 s) passes before going down.
    assert policy.decide(600.0, 0, current=6, params=PARAMS).desired == 6
    assert policy.decide(709.0, 0, current=6, params=PARAMS).desired == 6
    assert policy.decide(711.0, 0, current=6, params=PARAMS).desired == 1


def test_holding_still_enforces_bounds() -> None:
    assert ScalePolicy().hold(0.0, current=0, params=PARAMS, why="x").desired == 1
    assert ScalePolicy().hold(0.0, current=40, params=PARAMS, why="x").desired == 10


def test_bounds_changed_under_a_remembered_window_still_hold() -> None:
    policy = ScalePolicy()
    policy.decide(0.0, 36, current=1, params=PARAMS)  # 10 workers remembered
    tighter = PolicyParams(
        rooms_per_worker=4, min_replicas=1, max_replicas=4, headroom=1, scale_down_stabilization_seconds=120
    )
    assert policy.decide(5.0, 36, current=10, params=tighter).desired == 4


def test_invalid_params_are_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        PolicyParams(min_replicas=5, max_replicas=2)
    with pytest.raises(ValueError):
        PolicyParams(rooms_per_worker=0)


# --- properties -------------------------------------------------------------------------------

params_strategy = st.builds(
    lambda rpw, lo, span, headroom, window: PolicyParams(
        rooms_per_worker=rpw,
        min_replicas=lo,
        max_replicas=max(lo + span, 1),
        headroom=headroom,
        scale_down_stabilization_seconds=window,
    ),
    rpw=st.integers(1, 8),
    lo=st.integers(0, 5),
    span=st.integers(0, 20),
    headroom=st.integers(0, 6),
    window=st.sampled_from([0.0, 1.0, 10.0, 60.0, 120.0, 300.0]),
)


@st.composite
def load_histories(draw: st.DrawFn, max_rooms: int = 120) -> list[tuple[float, int]]:
    """(time, rooms) ticks at irregular intervals, like polls that sometimes run late."""
    gaps = draw(st.lists(st.floats(0.5, 30.0, allow_nan=False), min_size=1, max_size=80))
    rooms = draw(st.lists(st.integers(0, max_rooms), min_size=len(gaps), max_size=len(gaps)))
    times = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    return list(zip(times, rooms, strict=True))


@settings(max_examples=300, deadline=None)
@given(params=params_strategy, steps=load_histories(), start=st.integers(0, 40))
def test_bounds_always_hold(params: PolicyParams, steps: list[tuple[float, int]], start: int) -> None:
    for _, _, decision in run(ScalePolicy(), params, steps, start):
        assert params.min_replicas <= decision.desired <= params.max_replicas


@settings(max_examples=300, deadline=None)
@given(params=params_strategy, steps=load_histories(), start=st.integers(0, 40))
def test_scale_up_never_waits(params: PolicyParams, steps: list[tuple[float, int]], start: int) -> None:
    """Whenever the rooms of now need more than is running, the very same tick asks for it."""
    current = start
    policy = ScalePolicy()
    for now, rooms in steps:
        decision = policy.decide(now, rooms, current, params)
        if recommended_replicas(rooms, params) > current:
            assert decision.desired >= recommended_replicas(rooms, params)
            assert decision.direction is Direction.UP
        current = decision.desired


@settings(max_examples=300, deadline=None)
@given(params=params_strategy, steps=load_histories(), start=st.integers(0, 40))
def test_never_below_what_the_load_needs(params: PolicyParams, steps: list[tuple[float, int]], start: int) -> None:
    for _, rooms, decision in run(ScalePolicy(), params, steps, start):
        assert decision.desired >= min(params.max_replicas, needed_replicas(rooms, params.rooms_per_worker))
        assert decision.desired >= recommended_replicas(rooms, params)


@settings(max_examples=300, deadline=None)
@given(params=params_strategy, steps=load_histories(), start=st.integers(0, 40))
def test_scale_downs_are_a_window_apart_and_a_window_after_any_higher_need(
    params: PolicyParams, steps: list[tuple[float, int]], start: int
) -> None:
    window = params.scale_down_stabilization_seconds
    trace = run(ScalePolicy(), params, steps, start)
    downs = [now for now, _, d in trace if d.direction is Direction.DOWN]
    assert all(later - earlier >= window for earlier, later in pairwise(downs))
    # A scale-down to N only happens if no tick of the last window needed more than N.
    for i, (now, _, decision) in enumerate(trace):
        if decision.direction is Direction.DOWN:
            recent = [recommended_replicas(r, params) for t, r, _ in trace[: i + 1] if t >= now - window]
            assert decision.desired >= max(recent)


@settings(max_examples=200, deadline=None)
@given(
    params=params_strategy,
    low=st.integers(0, 60),
    width=st.integers(0, 40),
    noise=st.lists(st.floats(0, 1), min_size=200, max_size=200),
    poll=st.sampled_from([1.0, 5.0, 15.0]),
)
def test_noisy_load_in_a_band_does_not_oscillate(
    params: PolicyParams, low: int, width: int, noise: list[float], poll: float
) -> None:
    """Load jumping around inside [low, low+width]: at most one scale-down per window, so at most
    one down-and-up-again per window."""
    assume(params.scale_down_stabilization_seconds > 0)
    window = params.scale_down_stabilization_seconds
    steps = [(i * poll, low + round(x * width)) for i, x in enumerate(noise)]
    trace = run(ScalePolicy(), params, steps, recommended_replicas(low, params))
    windows = 1 + math.floor(steps[-1][0] / window)
    downs = [now for now, _, d in trace if d.direction is Direction.DOWN]
    assert len(downs) <= windows
    directions = [d.direction for _, _, d in trace if d.changes]
    reversals = sum(1 for a, b in pairwise(directions) if (a, b) == (Direction.DOWN, Direction.UP))
    assert reversals <= windows


def test_load_swinging_faster_than_the_window_never_scales_down() -> None:
    """Peaks every 30 s against a 120 s window: the workers for the peak stay."""
    steps = [(float(t), 30 if (t // 15) % 2 == 0 else 2) for t in range(0, 900, 5)]
    trace = run(ScalePolicy(), PARAMS, steps, current=1)
    assert [d.direction for _, _, d in trace if d.changes] == [Direction.UP]
    assert trace[-1][2].desired == 8


@settings(max_examples=200, deadline=None)
@given(params=params_strategy, rooms=st.integers(0, 120), start=st.integers(0, 40))
def test_steady_load_converges_to_its_recommendation_and_stays(params: PolicyParams, rooms: int, start: int) -> None:
    window = params.scale_down_stabilization_seconds
    steps = [(float(t), rooms) for t in range(0, int(3 * window) + 30, 5)]
    trace = run(ScalePolicy(), params, steps, start)
    target = recommended_replicas(rooms, params)
    assert trace[-1][2].desired == target
    settled = [d for t, _, d in trace if t > 2 * window + 10]
    assert all(d.desired == target and not d.changes for d in settled)
