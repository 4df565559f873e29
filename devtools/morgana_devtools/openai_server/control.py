"""Test-control endpoints (``/_control/...``, unauthenticated): scenarios, transcripts,
recorded requests, counters."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from morgana_devtools.openai_server.asgi import load_json
from morgana_devtools.openai_server.errors import OpenAIError, invalid_request
from morgana_devtools.openai_server.scenarios import ENDPOINTS, Scenario, ScenarioError, scenario_for_endpoint
from morgana_devtools.openai_server.state import FakeOpenAIState, fake_state


async def _scenario_from(request: Request) -> tuple[str, Scenario]:
    data = load_json(await request.body())
    if not isinstance(data, dict):
        raise invalid_request("Expected a JSON object describing a scenario.", None)
    try:
        return scenario_for_endpoint(data)
    except ScenarioError as exc:
        raise invalid_request(str(exc), None) from exc


async def set_scenario(request: Request) -> Response:
    """``POST /_control/scenario``: set (or with ``{}``) clear an endpoint's sticky scenario."""
    state = fake_state(request)
    try:
        endpoint, scenario = await _scenario_from(request)
    except OpenAIError as exc:
        return exc.response()
    state.stickies[endpoint] = scenario if scenario.to_json() else None
    return JSONResponse({"endpoint": endpoint, "scenario": scenario.to_json()})


async def get_scenarios(request: Request) -> Response:
    """``GET /_control/scenario``: sticky scenarios and one-shot queues (top level: chat's)."""
    state = fake_state(request)

    def view(endpoint: str) -> dict[str, object]:
        sticky = state.stickies[endpoint]
        return {"sticky": sticky.to_json() if sticky else None, "queue": [s.to_json() for s in state.queues[endpoint]]}

    return JSONResponse({**view("chat"), "endpoints": {e: view(e) for e in ENDPOINTS}})


async def queue_scenario(request: Request) -> Response:
    """``POST /_control/queue``: append a one-shot scenario for an endpoint's next request."""
    state = fake_state(request)
    try:
        endpoint, scenario = await _scenario_from(request)
    except OpenAIError as exc:
        return exc.response()
    state.queues[endpoint].append(scenario)
    return JSONResponse({"endpoint": endpoint, "queued": len(state.queues[endpoint])})


def _transcripts_view(state: FakeOpenAIState) -> dict[str, object]:
    return {"queue": list(state.transcripts), "sticky": state.transcript, "default": state.config.transcript}


async def queue_transcripts(request: Request) -> Response:
    """``POST /_control/transcripts {"texts": [...]}``: append transcripts, one per transcription."""
    state = fake_state(request)
    data = load_json(await request.body())
    texts = data.get("texts") if isinstance(data, dict) else None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return invalid_request('Expected {"texts": [<string>, ...]}.', "texts").response()
    state.transcripts.extend(texts)
    return JSONResponse(_transcripts_view(state))


async def set_transcript(request: Request) -> Response:
    """``POST /_control/transcript {"text": ...}``: the sticky transcript (``null`` clears it)."""
    state = fake_state(request)
    data = load_json(await request.body())
    if not isinstance(data, dict) or "text" not in data or not isinstance(data["text"], str | None):
        return invalid_request('Expected {"text": <string or null>}.', "text").response()
    state.transcript = data["text"]
    return JSONResponse(_transcripts_view(state))


async def get_transcripts(request: Request) -> Response:
    """``GET /_control/transcripts``: the queue, the sticky transcript and the default."""
    return JSONResponse(_transcripts_view(fake_state(request)))


async def reset(request: Request) -> Response:
    """``POST /_control/reset``: clear scenarios, transcripts, recorded requests and counters."""
    fake_state(request).reset()
    return JSONResponse({"reset": True})


async def recorded_requests(request: Request) -> Response:
    """``GET /_control/requests``: the last recorded chat requests, oldest first."""
    return JSONResponse([r.to_json() for r in fake_state(request).records])


async def recorded_audio_requests(request: Request) -> Response:
    """``GET /_control/audio_requests[?endpoint=transcriptions|speech]``: oldest first."""
    endpoint = request.query_params.get("endpoint")
    if endpoint not in (None, "transcriptions", "speech"):
        return invalid_request("endpoint must be 'transcriptions' or 'speech'.", "endpoint").response()
    records = fake_state(request).audio_records
    return JSONResponse([r.to_json() for r in records if endpoint is None or r.endpoint == endpoint])


async def stats(request: Request) -> Response:
    """``GET /_control/stats``: request counters and currently open streams."""
    return JSONResponse(fake_state(request).stats())


def control_routes() -> list[BaseRoute]:
    """Test-control endpoints (no authentication)."""
    return [
        Route("/_control/scenario", set_scenario, methods=["POST"]),
        Route("/_control/scenario", get_scenarios, methods=["GET"]),
        Route("/_control/queue", queue_scenario, methods=["POST"]),
        Route("/_control/reset", reset, methods=["POST"]),
        Route("/_control/requests", recorded_requests, methods=["GET"]),
        Route("/_control/audio_requests", recorded_audio_requests, methods=["GET"]),
        Route("/_control/transcripts", queue_transcripts, methods=["POST"]),
        Route("/_control/transcripts", get_transcripts, methods=["GET"]),
        Route("/_control/transcript", set_transcript, methods=["POST"]),
        Route("/_control/stats", stats, methods=["GET"]),
    ]
