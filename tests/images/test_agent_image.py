"""The agent image, built from images/agent/Dockerfile and run as the chart runs it: the agent
Deployment's container, with the environment `helm template` renders, as user 10001 on a read-only
root with an empty /tmp, beside the API image's container. It registers with LiveKit, takes a call
(logging in with the account the migration Job made from the operator's Secret), answers it with
speech, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import eventually, eventually_async, free_port
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.conftest import OPENAI_KEY
from tests.images.conftest import Release
from tests.images.containers import BuiltImages, image_config, run_in_image


def test_the_image_holds_the_worker_and_its_vad_model(images: BuiltImages) -> None:
    ref = images.refs["agent"]
    config = image_config(ref)
    assert config["User"] == "10001:10001"
    assert (config["Entrypoint"], config["Cmd"]) == (["morgana-agent"], ["start"])
    assert {"8081/tcp", "9100/tcp"} <= set(config["ExposedPorts"])
    for module, why in (
        ("pytest", "test dependencies"),
        ("sqlalchemy", "the API's database stack"),
        ("fastapi", "the API's web framework"),
    ):
        leaked = run_in_image(ref, "python", "-c", f"import {module}")
        assert leaked.returncode != 0, f"{why} ({module}) leaked into the agent image"
    # Silero's VAD models must come with the wheels: the image runs no download step. The native
    # one (the default VAD_RUNTIME) loads from livekit-local-inference's library.
    native = run_in_image(ref, "python", "-c", "from livekit.local_inference import init_vad; init_vad()")
    assert native.returncode == 0, native.stderr
    size = run_in_image(
        ref,
        "python",
        "-c",
        "import importlib.resources as r; "
        "print((r.files('livekit.plugins.silero.resources') / 'silero_vad.onnx').stat().st_size)",
    )
    assert size.returncode == 0 and int(size.stdout) > 1_000_000, size.stderr


def test_the_worker_registers_takes_a_call_and_drains_as_the_chart_runs_it(
    migrated: str, images: BuiltImages, release: Release, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> None:
    api_port, health_port, metrics_port = free_port(), free_port(), free_port()
    rendered = release.rendered(f"agent.backendUrl=http://127.0.0.1:{api_port}")
    api = rendered.container(
        "Deployment", "-api", images, tmp_path, PORT=str(api_port), API_METRICS_PORT=str(free_port())
    )
    # The chart's 8081 and 9100, moved: containers here share the host's network.
    agent = rendered.container(
        "Deployment", "-agent", images, tmp_path, HEALTH_PORT=str(health_port), METRICS_PORT=str(metrics_port)
    )
    with api, agent:

        def registered() -> bool:
            assert agent.running, agent.logs()[-6000:]
            assert api.running, api.logs()[-6000:]
            return "registered worker" in agent.logs()

        eventually(registered, 120, interval=0.5, what="the agent container registered with LiveKit")
        eventually(
            lambda: httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=2).status_code == 200,
            60,
            what="the API container",
        )
        worker = httpx.get(f"http://127.0.0.1:{health_port}/worker", timeout=5).json()
        assert worker["agent_name"] == "morgana-agent", worker

        fake_openai.queue_transcripts("Hello from the container test")
        # No comma: its pause would send the speech to speech-to-text as two requests
        # (STT_VAD_MIN_SILENCE_SECONDS), each answered with the next queued transcript.
        utterance = speech_pcm(fake_openai.root_url, OPENAI_KEY, "Hello can you hear me?")

        async def call() -> Caller:
            caller = Caller(f"http://127.0.0.1:{api_port}")
            await caller.join()
            try:
                await eventually_async(
                    lambda: len(caller.room.remote_participants) > 0,
                    30,
                    what=lambda: f"an agent joined\n{agent.logs()[-6000:]}",
                )
                await caller.silence(1.0)
                spoke_until = await caller.say(utterance)
                await eventually_async(
                    lambda: caller.first_audio_after(spoke_until) is not None,
                    30,
                    what=lambda: f"the agent's answer heard\n{agent.logs()[-6000:]}",
                )
                await eventually_async(lambda: caller.agent_texts(), 10, what="the answer's transcript")
            finally:
                await caller.leave()
            return caller

        caller = asyncio.run(call())
        assert caller.agent_texts() == ["You said: Hello from the container test"], agent.logs()[-6000:]
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert "lk_agents_worker_load" in metrics and "morgana_agent_turn_latency_seconds_count" in metrics

        code = agent.stop(grace=600)  # the Deployment's terminationGracePeriodSeconds: the call has ended
        logs = agent.logs()
    assert code == 0, logs[-6000:]
    assert "Traceback" not in logs, logs[-6000:]
