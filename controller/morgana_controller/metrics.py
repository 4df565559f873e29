"""Prometheus metrics of the controller, one series per AgentAutoscaler (namespace, autoscaler)."""

from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "morgana_controller"
_LABELS = ["namespace", "autoscaler"]

OBSERVED_ROOMS = Gauge(
    "observed_rooms", "Rooms with at least one caller, at the last LiveKit read.", _LABELS, namespace=NAMESPACE
)
OBSERVED_PARTICIPANTS = Gauge(
    "observed_participants", "Callers (non-agent participants) in those rooms.", _LABELS, namespace=NAMESPACE
)
AGENTLESS_ROOMS = Gauge("agentless_rooms", "Rooms whose callers have no agent with them.", _LABELS, namespace=NAMESPACE)
DESIRED_REPLICAS = Gauge("desired_replicas", "Agent workers the policy asks for.", _LABELS, namespace=NAMESPACE)
CURRENT_REPLICAS = Gauge(
    "current_replicas", "Worker pods the target Deployment has (status.replicas).", _LABELS, namespace=NAMESPACE
)
LIVEKIT_REACHABLE = Gauge(
    "livekit_reachable", "1 if the last LiveKit read succeeded, else 0.", _LABELS, namespace=NAMESPACE
)
DECISION_DURATION = Histogram(
    "decision_duration_seconds",
    "From the start of the LiveKit load read to the decision applied (the scale patch, when there is one).",
    _LABELS,
    namespace=NAMESPACE,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SCALE_EVENTS = Counter(
    "scale_events_total",
    "Scale patches of the target, by direction (up, down).",
    [*_LABELS, "direction"],
    namespace=NAMESPACE,
)
ERROR_KINDS = ("livekit", "credentials", "target", "spec", "scale", "status", "dispatch", "internal")
ERRORS = Counter(
    "errors_total", f"Failed steps by kind: {', '.join(ERROR_KINDS)}.", [*_LABELS, "kind"], namespace=NAMESPACE
)
REDISPATCHES = Counter(
    "redispatches_total", "Agent dispatches sent to rooms whose callers had no agent.", _LABELS, namespace=NAMESPACE
)

_PER_AUTOSCALER = (
    OBSERVED_ROOMS,
    OBSERVED_PARTICIPANTS,
    AGENTLESS_ROOMS,
    DESIRED_REPLICAS,
    CURRENT_REPLICAS,
    LIVEKIT_REACHABLE,
    DECISION_DURATION,
    REDISPATCHES,
)
_WITH_EXTRA_LABEL = ((SCALE_EVENTS, ("up", "down")), (ERRORS, ERROR_KINDS))


def forget(namespace: str, autoscaler: str) -> None:
    """Drop the series of an autoscaler this process no longer serves (deleted, or another replica
    leads now), so dashboards don't show it frozen at its last values."""
    for metric in _PER_AUTOSCALER:
        try:
            metric.remove(namespace, autoscaler)
        except KeyError:
            pass
    for metric, values in _WITH_EXTRA_LABEL:
        for value in values:
            try:
                metric.remove(namespace, autoscaler, value)
            except KeyError:
                pass
