"""/metrics, request ids, secret-free JSON logs, OTLP traces, and the gunicorn entry point."""

import json
import secrets
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from morgana_devtools.processes import ApiProcess, migrate
from morgana_devtools.services import eventually, free_port
from tests.api.sse import stream_chat
from tests.conftest import bearer, new_session, register, unique_email


def metric_value(text: str, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{prefix} not in /metrics")


def test_an_open_chat_stream_is_counted_in_flight(client: httpx.Client, chat_session: dict, fake_openai) -> None:
    token = chat_session["token"]["access_token"]
    stream = 'handler="/api/v1/chatbot/chat/stream",method="POST"'
    fake_openai.queue_scenario(tokens=40, delay_ms=50)
    with client.stream(
        "POST",
        "/api/v1/chatbot/chat/stream",
        headers=bearer(token),
        json={"messages": [{"role": "user", "content": "a slow one"}]},
    ) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # the reply is streaming now
        during = client.get("/metrics").text
        assert metric_value(during, "morgana_api_http_requests_inprogress", stream) == 1
        assert metric_value(during, "morgana_api_chat_streams_open") == 1
        for _ in lines:
            pass

    def idle() -> str:
        text = client.get("/metrics").text
        return text if metric_value(text, "morgana_api_http_requests_inprogress", stream) == 0 else ""

    after = eventually(idle, 3, interval=0.05, what="no chat stream request in progress")
    assert metric_value(after, "morgana_api_chat_streams_open") == 0


def test_metrics_cover_routes_streams_model_and_pool(client: httpx.Client, chat_session: dict) -> None:
    token = chat_session["token"]["access_token"]
    before = client.get("/metrics").text
    ttft_before = metric_value(before, "morgana_api_llm_time_to_first_token_seconds_count")
    tokens_before = metric_value(before, "morgana_api_llm_tokens_streamed_total")
    stream_chat(client, token, "count my tokens please")
    client.get("/api/v1/chatbot/messages", headers=bearer(token))

    # Metrics of a request are recorded just after its response is sent: poll briefly.
    def settled() -> str:
        text = client.get("/metrics").text
        return (
            text
            if (
                'handler="/api/v1/chatbot/messages"' in text
                and metric_value(text, "morgana_api_db_pool_checked_out") == 0
            )
            else ""
        )

    after = eventually(settled, 3, interval=0.05, what="the history request's metrics, the pool idle")
    assert metric_value(after, "morgana_api_llm_time_to_first_token_seconds_count") == ttft_before + 1
    # The stand-in reports usage like OpenAI: "You said: count my tokens please" is 6 tokens.
    assert metric_value(after, "morgana_api_llm_tokens_streamed_total") == tokens_before + 6
    assert metric_value(after, "morgana_api_chat_streams_open") == 0
    assert metric_value(after, "morgana_api_db_pool_size") == 10
    assert metric_value(after, "morgana_api_db_pool_checked_out") == 0
    # Route templates, not raw paths, label the HTTP metrics.
    assert 'handler="/api/v1/chatbot/messages"' in after
    assert 'handler="/api/v1/chatbot/chat/stream"' in after
    assert "morgana_api_http_request_duration_seconds_bucket" in after
    assert chat_session["session_id"] not in after


def test_every_response_carries_a_request_id(client: httpx.Client) -> None:
    response = client.get("/health")
    assert len(response.headers["x-request-id"]) >= 16
    echoed = client.get("/health", headers={"X-Request-ID": "0123456789abcdef0123456789abcdef"})
    assert echoed.headers["x-request-id"] == "0123456789abcdef0123456789abcdef"


def test_logs_are_json_with_request_ids_and_never_hold_secrets(api: ApiProcess, client: httpx.Client) -> None:
    email, password = unique_email(), "Log_Secret_Pass_99!"
    user = register(client, email, password)
    login = client.post("/api/v1/auth/login", data={"username": email, "password": password}).json()
    session = new_session(client, login["access_token"])
    stream_chat(client, session["token"]["access_token"], "hello logs")
    # The same route twice (the second's template from the middleware's cache), and no route.
    deleted = [
        client.delete(f"/api/v1/auth/sessions/{uuid.uuid4()}", headers=bearer(login["access_token"])) for _ in range(2)
    ]
    unrouted = client.get("/api/v1/no/such/route")
    wrong = client.post("/api/v1/auth/login", data={"username": email, "password": "Wrong_" + password})

    def logged() -> str:
        """The log, once it has the wrong login's access line (written just after the response)."""
        text = api.log_path.read_text()
        records = [json.loads(line) for line in text.splitlines() if line.startswith("{") and line.endswith("}")]
        return (
            text
            if any(
                r.get("logger") == "morgana.api.access" and r.get("request_id") == wrong.headers["x-request-id"]
                for r in records
            )
            else ""
        )

    text = eventually(logged, 5, interval=0.05, what="the wrong login's access log line")
    for secret in (password, user["token"]["access_token"], login["access_token"], session["token"]["access_token"]):
        assert secret not in text
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    requests = [r for r in records if r.get("logger") == "morgana.api.access"]
    assert requests, "no access log records"
    login_lines = [r for r in requests if r["route"] == "/api/v1/auth/login"]
    assert {r["status"] for r in login_lines} >= {200, 401}
    assert all(r["request_id"] for r in requests)
    by_id = {r["request_id"]: r for r in requests}
    assert [by_id[r.headers["x-request-id"]]["route"] for r in deleted] == ["/api/v1/auth/sessions/{session_id}"] * 2
    assert [by_id[r.headers["x-request-id"]]["status"] for r in deleted] == [404, 404]
    assert by_id[unrouted.headers["x-request-id"]]["route"] == "unmatched"
    assert by_id[wrong.headers["x-request-id"]]["route"] == "/api/v1/auth/login"


def test_redaction_filter_masks_tokens_and_passwords() -> None:
    from morgana.core.logging import redact

    jwt_like = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    assert jwt_like not in redact(f"got {jwt_like}")
    assert "hunter2" not in redact("password=hunter2&user=x")
    assert "abc123" not in redact("Authorization: Bearer abc123")
    assert redact("nothing secret here") == "nothing secret here"


class _Collector(BaseHTTPRequestHandler):
    spans: ClassVar[list[tuple[str, str]]] = []
    links: ClassVar[list[tuple[str, bytes, bytes, bytes]]] = []  # name, trace, span, parent span

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    _Collector.spans.append((service, span.name))
                    _Collector.links.append((span.name, span.trace_id, span.span_id, span.parent_span_id))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def otlp_collector():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Collector.spans = []
    _Collector.links = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_traces_of_requests_db_and_model_calls_are_exported_over_otlp(
    api_env: dict, otlp_collector: str, tmp_path
) -> None:
    env = {**api_env, "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector, "OTEL_BSP_SCHEDULE_DELAY": "200"}
    with ApiProcess(env, tmp_path / "api.log") as process, httpx.Client(base_url=process.url, timeout=20) as http:
        user = register(http)
        session = new_session(http, user["token"]["access_token"])
        stream_chat(http, session["token"]["access_token"], "trace me")
        eventually(
            lambda: "llm.chat" in {n for _, n in _Collector.spans}, 10, interval=0.2, what="an llm.chat span exported"
        )
    names = {name for _, name in _Collector.spans}
    assert {service for service, _ in _Collector.spans} == {"morgana-api"}
    assert "llm.chat" in names
    assert "POST /api/v1/chatbot/chat/stream" in names
    # The model call is part of the request's trace, under one of its spans.
    spans = {name: (trace_id, parent) for name, trace_id, _, parent in _Collector.links}
    request_trace, _ = spans["POST /api/v1/chatbot/chat/stream"]
    llm_trace, llm_parent = spans["llm.chat"]
    assert llm_trace == request_trace
    assert llm_parent in {span_id for _, trace_id, span_id, _ in _Collector.links if trace_id == request_trace}
    assert any(name.startswith(("INSERT", "SELECT")) for name in names), "\n".join(sorted(names))


def test_gunicorn_with_uvicorn_workers_serves_and_sums_metrics(api_env: dict, tmp_path) -> None:
    env = {**api_env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    with (
        ApiProcess(env, tmp_path / "api.log", workers=2) as process,
        httpx.Client(base_url=process.url, timeout=20) as http,
    ):
        # Ready means one worker answers; the other may still be starting. Each sets its pool's
        # size at start-up, and the gauges of live workers are summed: 10 each.
        eventually(
            lambda: metric_value(http.get("/metrics").text, "morgana_api_db_pool_size") == 20,
            60,
            what=lambda: f"both workers started\n{process.log_tail()}",
        )
        labels = 'handler="/health",method="GET",status="200"'
        before = metric_value(http.get("/metrics").text, "morgana_api_http_requests_total", labels)
        for _ in range(20):
            assert http.get("/health").status_code == 200
        # Two workers, one /metrics: counts from both are summed, whichever answers.
        text = http.get("/metrics").text
        assert metric_value(text, "morgana_api_http_requests_total", labels) == before + 20
        workers = {line for line in process.log_path.read_text().splitlines() if "Booting worker" in line}
        assert len(workers) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_every_command_starts_with_an_empty_tmp_and_no_home(api_env: dict, tmp_path, workers: int) -> None:
    """As in the image's pods: PROMETHEUS_MULTIPROC_DIR under an empty /tmp, and no home directory.
    `migrate` and `serve` (uvicorn alone, or gunicorn) make the metrics directory themselves, and
    gunicorn's own lines are JSON like every other line, once each, with no control socket."""
    home = tmp_path / "not-a-directory"
    home.touch()
    env = {
        **api_env,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "migrate-tmp" / "prometheus"),
        "HOME": str(home),
        "API_USER_EMAIL": f"agent-{secrets.token_hex(4)}@example.com",
        "API_USER_PASSWORD": secrets.token_hex(16),
    }
    migrate(env)  # creating the agent's account imports the API's metrics
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "serve-tmp" / "prometheus")
    log = tmp_path / "api.log"
    with ApiProcess(env, log, workers=workers) as process, httpx.Client(base_url=process.url, timeout=20) as http:
        assert http.get("/health").status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "morgana_api_chat_streams_open" in metrics.text
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert not [r for r in records if r["level"] in ("ERROR", "CRITICAL")], records
    if workers > 1:
        messages = [r["message"] for r in records if r["logger"] == "gunicorn.error"]
        assert sum(m.startswith("Listening at:") for m in messages) == 1, messages


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_port_keeps_metrics_and_docs_off_the_api_port(api_env: dict, tmp_path, workers: int) -> None:
    """As the chart runs it: API_METRICS_PORT serves /metrics (every gunicorn worker's, summed), the
    API's own port, the one an Ingress routes to, serves neither metrics nor docs."""
    metrics_port = free_port()
    env = {
        **api_env,
        "API_METRICS_PORT": str(metrics_port),
        "DOCS_ENABLED": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
    }
    with (
        ApiProcess(env, tmp_path / "api.log", workers=workers) as process,
        httpx.Client(base_url=process.url, timeout=20) as http,
    ):
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert http.get(path).status_code == 404, path
        labels = 'handler="/health",method="GET",status="200"'

        def counted() -> float:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            return metric_value(text, "morgana_api_http_requests_total", labels)

        before = counted()  # the start-up's readiness polls
        for _ in range(10):
            assert http.get("/health").status_code == 200
        assert eventually(lambda: counted() == before + 10, 5, what="10 more /health requests on API_METRICS_PORT")
