"""The model server fails under concurrent streams: errors, aborted streams, stalls."""

from __future__ import annotations

from pathlib import Path

import httpx

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess
from morgana_devtools.services import eventually
from tests.api.test_observability import metric_value
from tests.drills.conftest import Streams, outcome


def test_model_failures_under_load_end_with_error_events_store_nothing_and_leak_no_stream(
    api_env: dict, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    """16 streams at once: 4 answered, 4 refused with a 500, 4 cut after a few tokens, 4 stalled past
    LLM_TIMEOUT_SECONDS (3 s in the tests)."""
    scenarios = (
        [{"tokens": 10}] * 4
        + [{"status": 500}] * 4
        + [{"tokens": 20, "fail_after": 5}] * 4
        + [{"tokens": 20, "stall_after": 3, "stall_seconds": 30}] * 4
    )
    try:
        with ApiProcess(api_env, tmp_path / "api.log") as api, httpx.Client(base_url=api.url, timeout=30) as http:
            streams = Streams(api.url)
            streams.prepare(len(scenarios))
            for scenario in scenarios:
                fake_openai.queue_scenario(**scenario)
            streams.start()
            streams.join()
            outcomes = [outcome(turn) for turn in streams.turns]
            assert outcomes.count("completed") == 4, outcomes
            failed = [o for o in outcomes if o != "completed"]
            assert set(failed) <= {"error:llm_unavailable", "error:llm_timeout"}, outcomes
            assert failed.count("error:llm_timeout") >= 4, outcomes  # the stalls
            for turn in streams.turns:
                stored = streams.history(http, turn)
                if turn.acknowledged:
                    assert turn.result is not None
                    assert stored == [("user", turn.words), ("assistant", turn.result.text)], stored
                else:
                    assert stored == [], stored

            def settled() -> bool:
                text = http.get("/metrics").text
                return (
                    metric_value(text, "morgana_api_chat_streams_open") == 0
                    and metric_value(
                        text,
                        "morgana_api_http_requests_inprogress",
                        'handler="/api/v1/chatbot/chat/stream",method="POST"',
                    )
                    == 0
                )

            eventually(settled, 5, what="no chat stream left open (a leaked gauge?)")
    finally:
        fake_openai.reset()
