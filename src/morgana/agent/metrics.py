"""Morgana's own voice metrics, beside the framework's `lk_agents_*`."""

from prometheus_client import Counter, Gauge, Histogram

NAMESPACE = "morgana_agent"
_LATENCY = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 13)

ACTIVE_CALLS = Gauge("active_calls", "Calls this worker process is serving.", namespace=NAMESPACE,
                     multiprocess_mode="livesum")
END_OF_TURN_DELAY = Histogram("end_of_turn_delay_seconds",
                              "From the end of the caller's speech to the decision that the turn ended.",
                              namespace=NAMESPACE, buckets=_LATENCY)
API_TIME_TO_FIRST_TOKEN = Histogram("api_time_to_first_token_seconds",
                                    "From sending a turn to the API until its first reply text.",
                                    namespace=NAMESPACE, buckets=_LATENCY)
TTS_TIME_TO_FIRST_BYTE = Histogram("tts_time_to_first_byte_seconds",
                                   "From sending text to speech synthesis until its first audio.",
                                   namespace=NAMESPACE, buckets=_LATENCY)
TURN_LATENCY = Histogram("turn_latency_seconds",
                         "From the end of the caller's speech to the agent's first audio (end to end).",
                         namespace=NAMESPACE, buckets=_LATENCY)
API_ERRORS = Counter("api_errors_total", "Failed calls to the Morgana API by kind.", ["kind"],
                     namespace=NAMESPACE)
APOLOGIES = Counter("apologies_total", "Turns answered with the apology because the API failed.",
                    namespace=NAMESPACE)
