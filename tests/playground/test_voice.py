"""A voice call from the playground: Chromium's fake microphone plays real speech (espeak-ng) into
a real LiveKit room, the real agent worker answers aloud, and the page shows its transcript and
state, then the call's turns in the session's history."""

import re
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import Browser, Playwright, expect

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.processes import AgentWorker, ApiProcess
from morgana_devtools.voice_client import SAMPLE_RATE, speech_pcm
from tests.conftest import OPENAI_KEY
from tests.playground.conftest import ARTIFACTS, Steps, sign_up_with_a_session

pytestmark = pytest.mark.timeout(240)

SAID = "What is the weather like"

# Every state the agent's badge shows, in order.
RECORD_AGENT_STATES = """
() => {
  window.agentStates = [];
  const badge = document.getElementById("agent-state");
  new MutationObserver(() => window.agentStates.push(badge.textContent))
    .observe(badge, { subtree: true, childList: true, characterData: true });
}
"""


@pytest.fixture(scope="module")
def voice_playground_api(voice_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    # Beside the voice API the agent worker uses: the same database, LiveKit and secrets.
    env = {**voice_env, "PLAYGROUND_ENABLED": "true"}
    with ApiProcess(env, tmp_path_factory.mktemp("voice-playground-api") / "api.log") as process:
        yield process


def speech_wav(fake_openai: FakeOpenAIProcess, path: Path) -> Path:
    """The utterance between silences: Chromium loops the file, so the silence after it is long
    enough for the agent's answer before the caller speaks again."""
    speech = speech_pcm(fake_openai.root_url, OPENAI_KEY, SAID + "?")
    silence = np.zeros(SAMPLE_RATE * 2, dtype=np.int16)
    samples = np.concatenate([silence, speech, silence, silence, silence, silence, silence])
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())
    return path


@pytest.fixture
def call_browser(
    playwright: Playwright, chromium_path: str, fake_openai: FakeOpenAIProcess, tmp_path: Path
) -> Iterator[Browser]:
    """Chromium whose microphone is the WAV file, granted without asking."""
    wav = speech_wav(fake_openai, tmp_path / "caller.wav")
    browser = playwright.chromium.launch(
        executable_path=chromium_path,
        headless=True,
        args=[
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}",
            "--autoplay-policy=no-user-gesture-required",
        ],
    )
    yield browser
    browser.close()


def test_a_call_from_the_page_is_heard_answered_and_transcribed(
    call_browser: Browser,
    voice_playground_api: ApiProcess,
    agent_worker: AgentWorker,
    fake_openai: FakeOpenAIProcess,
    request: pytest.FixtureRequest,
) -> None:
    fake_openai.queue_transcripts(SAID)
    context = call_browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.set_default_timeout(30_000)
    steps = Steps(page, ARTIFACTS / re.sub(r"[^\w.-]", "_", request.node.name))
    try:
        sign_up_with_a_session(page, voice_playground_api.url)
        page.evaluate(RECORD_AGENT_STATES)

        page.click("#call")
        expect(page.locator("#call")).to_have_text("End call")
        expect(page.locator("#status")).to_have_text(re.compile(r"^In call"))
        steps.shot("joined")
        # The agent's transcript of the caller, then its answer, both as the page shows them.
        expect(page.locator('[data-testid="transcript-you"]').first).to_have_text(SAID)
        expect(page.locator('[data-testid="transcript-agent"]').first).to_have_text(f"You said: {SAID}")
        steps.shot("answered")
        # Its state went through listening and speaking (lk.agent.state), and its audio plays here.
        expect(page.locator("#agent-state")).to_have_text("listening", timeout=30_000)
        states = page.evaluate("window.agentStates")
        assert "speaking" in states and "listening" in states, states
        # The agent's track is attached to an <audio> element that plays (livekit-client's attach()).
        assert page.evaluate(
            "[...document.querySelectorAll('#call-audio audio')].some(a => !a.paused && a.srcObject !== null)"
        )

        page.click("#call")
        expect(page.locator("#call")).to_have_text("Start voice call")
        expect(page.locator("#status")).to_have_text("Call ended (client_initiated)")
        # The call continued the session: its turns are in the history, marked voice.
        page.click("#reload-history")
        expect(page.locator("#messages .message .text").first).to_have_text(SAID)
        expect(page.locator("#messages .message.assistant .text").first).to_have_text(f"You said: {SAID}")
        expect(page.locator("#messages .message small").first).to_have_text("voice")
        steps.shot("history")
    finally:
        steps.shot("last")
        context.close()
    assert not errors, errors
