"""Which agentless rooms get an agent, when: the planner on its own, the clock passed in."""

from livekit import api

from morgana.core.livekit_rooms import Load, RoomLoad, room_load
from morgana.core.redispatch import MAX_RETRY_SECONDS, MIN_RETRY_SECONDS, DispatchPlanner


def load(*rooms: tuple[str, int, int]) -> Load:
    return Load(rooms=tuple(RoomLoad(name, humans, agents) for name, humans, agents in rooms))


def test_callers_are_told_from_agents_and_leavers() -> None:
    kinds = api.ParticipantInfo.Kind
    participants = [
        api.ParticipantInfo(identity="web", kind=kinds.STANDARD),
        api.ParticipantInfo(identity="phone", kind=kinds.SIP),
        api.ParticipantInfo(identity="gone", kind=kinds.STANDARD, state=api.ParticipantInfo.State.DISCONNECTED),
        api.ParticipantInfo(identity="recorder", kind=kinds.EGRESS),
    ]
    room = room_load("r", participants)
    assert (room.humans, room.agents, room.agentless) == (2, 0, True)
    room = room_load("r", [*participants, api.ParticipantInfo(identity="agent", kind=kinds.AGENT)])
    assert (room.humans, room.agents, room.agentless) == (2, 1, False)
    # A room its caller left still holds the agent's slot, but is no call to scale for.
    snapshot = load(("call", 1, 1), ("leftover", 0, 1), ("waiting", 1, 0))
    assert (snapshot.room_count, snapshot.with_agent, [r.name for r in snapshot.agentless]) == (2, 2, ["waiting"])


def test_a_room_is_due_after_the_grace_and_only_with_free_capacity() -> None:
    planner = DispatchPlanner()
    snapshot = load(("a", 1, 0), ("b", 1, 0), ("served", 1, 1))
    planner.observe(snapshot, now=0.0)
    assert planner.due(snapshot, now=9.0, grace=10, ready_workers=4, rooms_per_worker=4) == []  # in its grace
    # 2 workers x 1 room, 1 taken by the served room: one free slot, for the room waiting longest.
    planner.observe(load(("a", 1, 0), ("b", 1, 0), ("served", 1, 1), ("c", 1, 0)), now=5.0)
    assert planner.due(snapshot, now=11.0, grace=10, ready_workers=2, rooms_per_worker=1) == ["a"]
    assert planner.due(snapshot, now=11.0, grace=10, ready_workers=1, rooms_per_worker=1) == []  # no capacity
    assert planner.due(snapshot, now=16.0, grace=10, ready_workers=10, rooms_per_worker=1) == ["a", "b", "c"]


def test_a_dispatched_room_is_not_sent_a_twin_and_its_retries_back_off() -> None:
    planner = DispatchPlanner()
    snapshot = load(("a", 1, 0))
    planner.observe(snapshot, now=0.0)
    planner.dispatched("a", now=2.0)
    assert planner.in_flight(now=3.0, grace=1) == 1
    assert planner.due(snapshot, now=3.0, grace=1, ready_workers=5, rooms_per_worker=4) == []
    first_retry = 2.0 + MIN_RETRY_SECONDS
    assert planner.due(snapshot, now=first_retry - 0.1, grace=1, ready_workers=5, rooms_per_worker=4) == []
    assert planner.due(snapshot, now=first_retry, grace=1, ready_workers=5, rooms_per_worker=4) == ["a"]
    planner.dispatched("a", now=first_retry)
    assert planner.retry_after(2, grace=1) == 2 * MIN_RETRY_SECONDS
    assert planner.retry_after(30, grace=1) == MAX_RETRY_SECONDS
    # An agent arrives: the room is forgotten, and a later agentless spell starts from scratch.
    planner.observe(load(("a", 1, 1)), now=first_retry + 1)
    assert planner.attempts == {} and planner.agentless_since == {}
