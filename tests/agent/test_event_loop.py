"""Every process of the agent worker runs its event loop on uvloop, unless EVENT_LOOP=asyncio."""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from morgana_devtools.processes import AgentWorker

# A call's process, as livekit-agents starts one: forked from a forkserver that imported the
# worker's PRELOAD_MODULES (here only morgana.agent.preload), then asyncio.new_event_loop().
_CALL_PROCESS = """
import asyncio
import multiprocessing


def loop_class() -> str:
    loop = asyncio.new_event_loop()
    try:
        return f"{type(loop).__module__}.{type(loop).__name__}"
    finally:
        loop.close()


if __name__ == "__main__":
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["morgana.agent.preload"])
    with context.Pool(1) as pool:
        print(pool.apply(loop_class))
"""


@pytest.mark.parametrize(
    ("choice", "loop_class"),
    [("uvloop", "uvloop.Loop"), ("asyncio", "asyncio.unix_events._UnixSelectorEventLoop")],
)
def test_a_call_process_runs_the_chosen_loop(choice: str, loop_class: str, tmp_path: Path) -> None:
    script = tmp_path / "call_process.py"
    script.write_text(_CALL_PROCESS)
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**_environment_without_dotenv(tmp_path), "EVENT_LOOP": choice},
        cwd=tmp_path,  # no .env here: only EVENT_LOOP decides
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == loop_class


def test_an_unknown_loop_is_refused_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "morgana.agent.cli", "start"],
        env={**_environment_without_dotenv(tmp_path), "EVENT_LOOP": "trio"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "event_loop" in done.stderr and "uvloop" in done.stderr, done.stderr


def test_every_process_of_a_running_worker_has_loaded_uvloop(agent_worker: AgentWorker) -> None:
    assert agent_worker.process is not None
    worker = psutil.Process(agent_worker.process.pid)
    # Not multiprocessing's resource tracker: it runs no event loop.
    processes = [worker] + [
        child for child in worker.children(recursive=True) if "resource_tracker" not in " ".join(child.cmdline())
    ]
    assert len(processes) > 2, "the worker pre-starts its forkserver and job processes"
    for process in processes:
        mapped = {region.path for region in process.memory_maps()}
        assert any("/uvloop/" in path for path in mapped), process.cmdline()


def _environment_without_dotenv(home: Path) -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != "EVENT_LOOP"} | {"HOME": str(home)}
