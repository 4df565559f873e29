"""The agent image's build and start commands, run on this machine (no Docker engine here).

The `uv sync` lines, the entry point and the command are read from the Dockerfile itself,
so the image and this test cannot drift apart; the result must register with a real
LiveKit server, serve health and metrics, and exit cleanly on SIGTERM, as Kubernetes runs it.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from morgana.devtools.livekit_server import LiveKitServer
from morgana.devtools.services import free_port
from tests.images.dockerfile import ROOT, build_image_venv, container_env_here, exec_form, runtime_env, runtime_stage

DOCKERFILE = ROOT / "images" / "agent" / "Dockerfile"


def wait_for(condition, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-6000:]
            raise AssertionError(f"agent exited with {process.returncode}:\n{tail}")
        try:
            if condition():
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"agent not ready in {timeout} s:\n{log.read_text(errors='replace')[-6000:]}")


def test_image_installs_the_locked_agent_and_its_worker_registers_serves_and_drains(tmp_path: Path) -> None:
    venv = build_image_venv(DOCKERFILE, tmp_path, extra="agent")
    python = venv / "bin" / "python"
    for module, why in (("pytest", "test dependencies"), ("sqlalchemy", "the API's database stack"),
                        ("fastapi", "the API's web framework")):
        leaked = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        assert leaked.returncode != 0, f"{why} ({module}) leaked into the agent image"
    # Silero's VAD model must come with the wheel: the image runs no download step.
    model = subprocess.run([python, "-c", "import importlib.resources as r; "
                            "print(r.files('livekit.plugins.silero.resources') / 'silero_vad.onnx')"],
                           capture_output=True, text=True, check=True)
    assert Path(model.stdout.strip()).stat().st_size > 1_000_000

    entrypoint, command = exec_form(DOCKERFILE, "ENTRYPOINT"), exec_form(DOCKERFILE, "CMD")
    assert (entrypoint, command) == (["morgana-agent"], ["start"])
    assert [args for op, args in runtime_stage(DOCKERFILE) if op == "USER"] == ["10001:10001"]
    declared = runtime_env(DOCKERFILE)
    assert declared["ENVIRONMENT"] == "production", declared
    assert {declared["HEALTH_PORT"], declared["METRICS_PORT"]} == {"8081", "9100"}, declared
    exposed = [args.split() for op, args in runtime_stage(DOCKERFILE) if op == "EXPOSE"]
    assert exposed == [["8081", "9100"]], exposed

    container_tmp = tmp_path / "container-tmp"
    container_tmp.mkdir()

    health_port, metrics_port = free_port(), free_port()
    workdir = tmp_path / "run"  # no stray .env from the checkout
    workdir.mkdir()
    log = tmp_path / "agent.log"
    with LiveKitServer("APIimagetest", "image-test-secret-" + "7" * 32,
                       log_path=tmp_path / "livekit.log") as livekit:
        image_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "PROMETHEUS_"))},
            **container_env_here(declared, venv, container_tmp),
            "LIVEKIT_URL": livekit.url, "LIVEKIT_API_KEY": livekit.api_key,
            "LIVEKIT_API_SECRET": livekit.api_secret,
            "HEALTH_PORT": str(health_port), "METRICS_PORT": str(metrics_port),
            "MORGANA_BACKEND_URL": "http://127.0.0.1:9", "API_USER_PASSWORD": "image-test-password",
        }
        with log.open("ab") as out:
            process = subprocess.Popen([str(venv / "bin" / entrypoint[0]), *entrypoint[1:], *command],
                                       cwd=workdir, env=image_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "registered worker" in log.read_text(errors="replace"), 90, process, log)
            with httpx.Client(base_url=f"http://127.0.0.1:{health_port}", timeout=5) as http:
                assert http.get("/").status_code == 200
                worker = http.get("/worker").json()
            assert worker["agent_name"] == "morgana-agent", worker
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
            assert metrics.status_code == 200
            assert "lk_agents_worker_load" in metrics.text
            assert "morgana_agent_active_calls 0.0" in metrics.text
            # The job processes' metrics go under /tmp, the only writable place in the pod.
            assert list(container_tmp.rglob("*.db")), sorted(container_tmp.rglob("*"))

            # No calls in flight, so the drain is immediate and the exit clean.
            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(30)
            except subprocess.TimeoutExpired:
                tail = log.read_text(errors="replace")[-6000:]
                raise AssertionError(f"agent did not exit within 30 s of SIGTERM:\n{tail}") from None
            assert code == 0, log.read_text(errors="replace")[-6000:]
            # The worker removed the metrics directory it made.
            assert not list(container_tmp.glob("morgana-agent-metrics-*")), sorted(container_tmp.rglob("*"))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
