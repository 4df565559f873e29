"""livekit-agents' event-loop monitor runs in every process of the worker at Morgana's threshold."""

import psutil
import pytest
from livekit.agents.telemetry.loop_monitor import LoopMonitorThresholds

from morgana.agent.cli import LOOP_BLOCK_WARN_ENV, quieter_loop_monitor
from morgana_devtools.processes import AgentWorker


def test_blocks_are_warned_of_from_250_ms_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOOP_BLOCK_WARN_ENV, "")  # recorded, so the variable is restored afterwards
    monkeypatch.delenv(LOOP_BLOCK_WARN_ENV)
    quieter_loop_monitor()
    thresholds = LoopMonitorThresholds.from_env()
    assert thresholds is not None
    assert thresholds.warn == pytest.approx(0.25)
    assert thresholds.error >= thresholds.warn

    monkeypatch.setenv(LOOP_BLOCK_WARN_ENV, "0")  # the operator turned it off: kept
    quieter_loop_monitor()
    assert LoopMonitorThresholds.from_env() is None


def test_every_job_process_of_a_running_worker_has_the_threshold(agent_worker: AgentWorker) -> None:
    assert agent_worker.process is not None
    worker = psutil.Process(agent_worker.process.pid)
    descendants = worker.children(recursive=True)
    assert descendants, "the worker pre-starts its job processes"
    # The worker's own environment block in /proc is the one it was started with; what it set
    # since shows in the processes it started (the forkserver, and the job processes it forks).
    for process in descendants:
        assert process.environ().get(LOOP_BLOCK_WARN_ENV) == "250", process.cmdline()
