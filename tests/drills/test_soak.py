"""A three-minute soak (bench.soak; `make bench SOAK_MINUTES=30` runs longer): mixed traffic on one API
process, whose resident memory and open file descriptors must not grow once it has warmed up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.soak import soak
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import ApiProcess

SECONDS = float(os.environ.get("SOAK_SECONDS", "180"))


@pytest.mark.timeout(SECONDS + 180)
def test_a_soak_of_mixed_traffic_grows_neither_memory_nor_open_files(
    api_env: dict, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    fake_openai.set_scenario(tokens=20, delay_ms=5)
    try:
        with ApiProcess(api_env, tmp_path / "api.log") as api:
            assert api.process is not None
            report = soak(api.url, api.process.pid, SECONDS, clients=4, warmup=SECONDS / 4)
    finally:
        fake_openai.reset()
    summary = report.summary()
    print(f"\nsoak: {summary}")
    assert report.server_errors == 0, {k: v for k, v in report.requests.items() if k[1] >= 500}
    statuses = {status for _, status in report.requests}
    assert statuses <= {200, 204, 401, 422}, report.requests
    assert sum(report.requests.values()) > 500, "too little traffic for a soak"
    assert report.rss_growth_mib < 16, summary
    assert report.fd_growth <= 4, summary
