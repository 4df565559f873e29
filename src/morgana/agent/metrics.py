"""Morgana's own voice metrics, beside the framework's `lk_agents_*`.

Created on first use, not at import. In Prometheus' multi-process mode an unlabelled metric
opens its value file when it is created, and every later metric of the same type in that
process shares the file. livekit-agents empties PROMETHEUS_MULTIPROC_DIR when the worker starts,
after the worker's modules are imported: a metric created at import in the main process would
write to a deleted file from then on, taking the framework's own `lk_agents_active_job_count`
and `lk_agents_proc_initialize_duration_seconds` with it. So job processes create these when a
call first records one, and the main process (`POD_COST_ERRORS`) when the worker has started.
"""

from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "morgana_agent"
_LATENCY = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13)


def _histogram(name: str, documentation: str) -> Histogram:
    return Histogram(name, documentation, namespace=NAMESPACE, buckets=_LATENCY)


_FACTORIES: dict[str, Callable[[], Counter | Gauge | Histogram]] = {
    "ACTIVE_CALLS": lambda: Gauge(
        "active_calls", "Calls this worker process is serving.", namespace=NAMESPACE, multiprocess_mode="livesum"
    ),
    "END_OF_TURN_DELAY": lambda: _histogram(
        "end_of_turn_delay_seconds", "From the end of the caller's speech to the decision that the turn ended."
    ),
    "API_TIME_TO_FIRST_TOKEN": lambda: _histogram(
        "api_time_to_first_token_seconds", "From sending a turn to the API until its first reply text."
    ),
    "TTS_TIME_TO_FIRST_BYTE": lambda: _histogram(
        "tts_time_to_first_byte_seconds", "From sending text to speech synthesis until its first audio."
    ),
    "TURN_LATENCY": lambda: _histogram(
        "turn_latency_seconds",
        "From the caller's last sound to the agent's first audio as the caller hears it: the worker's span plus "
        "the jitter buffers on the way (its own measured, the caller's taken to be the same).",
    ),
    "API_ERRORS": lambda: Counter(
        "api_errors_total", "Failed calls to the Morgana API by kind.", ["kind"], namespace=NAMESPACE
    ),
    "APOLOGIES": lambda: Counter(
        "apologies_total", "Turns answered with the apology because the API failed.", namespace=NAMESPACE
    ),
    "TURNS_WITHDRAWN": lambda: Counter(
        "turns_withdrawn_total",
        "Replies prepared but never played (the caller went on speaking), taken back from the conversation.",
        namespace=NAMESPACE,
    ),
    "POD_COST_ERRORS": lambda: Counter(
        "pod_cost_errors_total",
        "Failed reads or writes of this worker's pod-deletion-cost annotation (retried).",
        namespace=NAMESPACE,
    ),
}


if TYPE_CHECKING:
    # What `__getattr__` gives for each name in _FACTORIES.
    ACTIVE_CALLS: Gauge
    END_OF_TURN_DELAY: Histogram
    API_TIME_TO_FIRST_TOKEN: Histogram
    TTS_TIME_TO_FIRST_BYTE: Histogram
    TURN_LATENCY: Histogram
    API_ERRORS: Counter
    APOLOGIES: Counter
    TURNS_WITHDRAWN: Counter
    POD_COST_ERRORS: Counter


@cache
def _metric(name: str) -> Counter | Gauge | Histogram:
    return _FACTORIES[name]()


def __getattr__(name: str) -> Counter | Gauge | Histogram:
    if name in _FACTORIES:
        return _metric(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
