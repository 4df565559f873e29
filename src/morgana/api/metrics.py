"""Prometheus metrics of the API beyond the per-route HTTP ones.

Under gunicorn every worker writes to PROMETHEUS_MULTIPROC_DIR and /metrics sums them;
gauges say how to combine workers ("livesum": only live workers, summed).
"""

from prometheus_client import Counter, Gauge, Histogram

from morgana.core.multiprocess import prepare_multiprocess_dir

# Each metric opens its file in PROMETHEUS_MULTIPROC_DIR as it is created: whatever imports
# this module (the server, `migrate`, a script), the directory must exist by then.
prepare_multiprocess_dir()

NAMESPACE = "morgana_api"

CHAT_STREAMS_OPEN = Gauge(
    "chat_streams_open",
    "Server-Sent Event chat streams currently open.",
    namespace=NAMESPACE,
    multiprocess_mode="livesum",
)
CHAT_TURNS = Counter(
    "chat_turns_total",
    "Chat turns by outcome (completed, error, cancelled, withdrawn) and transport (stream, json).",
    ["outcome", "transport"],
    namespace=NAMESPACE,
)
CHAT_STREAM_RESUMES = Counter(
    "chat_stream_resumes_total",
    "Chat streams picked up again by Last-Event-ID, by outcome (resumed, gone, unavailable).",
    ["outcome"],
    namespace=NAMESPACE,
)
CHAT_STREAM_LOG_ERRORS = Counter(
    "chat_stream_log_errors_total",
    "Chat streams whose events could not be kept for resuming (the event log was unreachable).",
    namespace=NAMESPACE,
)
LLM_TIME_TO_FIRST_TOKEN = Histogram(
    "llm_time_to_first_token_seconds",
    "Time from sending a turn to the model until its first content token.",
    namespace=NAMESPACE,
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30),
)
LLM_DURATION = Histogram(
    "llm_request_duration_seconds",
    "Time from sending a turn to the model until its last token.",
    namespace=NAMESPACE,
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)
LLM_TOKENS_STREAMED = Counter(
    "llm_tokens_streamed_total",
    "Completion tokens received from the model (provider usage when reported, else chunks).",
    namespace=NAMESPACE,
)
LLM_ERRORS = Counter(
    "llm_errors_total",
    "Failed model calls by reason (timeout, rate_limited, unavailable, auth, bad_request, other).",
    ["reason"],
    namespace=NAMESPACE,
)
RATE_LIMITED = Counter(
    "rate_limited_total",
    "Requests refused with 429, by limit name.",
    ["limit"],
    namespace=NAMESPACE,
)
DB_POOL_SIZE = Gauge(
    "db_pool_size",
    "Configured persistent connections in the database pool.",
    namespace=NAMESPACE,
    multiprocess_mode="livesum",
)
DB_POOL_CHECKED_OUT = Gauge(
    "db_pool_checked_out",
    "Database connections currently in use.",
    namespace=NAMESPACE,
    multiprocess_mode="livesum",
)
