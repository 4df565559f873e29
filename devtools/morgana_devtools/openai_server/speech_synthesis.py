"""Real speech for ``/v1/audio/speech``: ``espeak-ng`` (a system package), resampled to
OpenAI's 24 kHz mono 16-bit PCM."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import wave
from collections.abc import Mapping
from typing import Final

import anyio

from morgana_devtools.openai_server.audio import AUDIO_SAMPLE_RATE, resample_linear

SPEECH_VOICES: Final[Mapping[str, str]] = {  # OpenAI voice -> espeak-ng voice+variant
    "alloy": "en-us+f2",
    "ash": "en-us+m3",
    "ballad": "en-gb+m2",
    "coral": "en-us+f3",
    "echo": "en-us+m1",
    "fable": "en-gb+m4",
    "nova": "en-us+f4",
    "onyx": "en-us+m7",
    "sage": "en-us+f1",
    "shimmer": "en-us+f5",
    "verse": "en-us+m2",
    "marin": "en-us+f3",
    "cedar": "en-us+m6",
}
ESPEAK_WPM: Final = 175  # espeak-ng's default speaking rate; OpenAI's speed scales it
ESPEAK_TIMEOUT: Final = 30.0
ESPEAK_MISSING: Final = (
    "espeak-ng is not installed, so the fake OpenAI server cannot synthesise speech; "
    "run scripts/install-test-deps.sh (or apt-get install espeak-ng)"
)


class SpeechSynthesisError(RuntimeError):
    """espeak-ng is missing or failed."""


def espeak_available() -> bool:
    """True if the ``espeak-ng`` binary that ``/v1/audio/speech`` needs is on ``PATH``."""
    return shutil.which("espeak-ng") is not None


def _espeak_voice(voice: object) -> str:
    return SPEECH_VOICES.get(voice, "en-us") if isinstance(voice, str) else "en-us"


def _espeak_command(voice: object, speed: float) -> list[str]:
    wpm = min(450, max(80, round(ESPEAK_WPM * speed)))
    return ["espeak-ng", "--stdout", "-v", _espeak_voice(voice), "-s", str(wpm)]


def _espeak_wav_to_pcm(wav_bytes: bytes) -> bytes:
    """espeak-ng's WAV (22050 Hz, mono, s16) -> raw s16le mono at 24 kHz."""
    import numpy as np

    try:
        with wave.open(io.BytesIO(wav_bytes), "rb") as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise SpeechSynthesisError(f"espeak-ng produced unreadable audio: {exc}") from exc
    if width != 2:
        raise SpeechSynthesisError(f"espeak-ng produced {8 * width}-bit audio, expected 16-bit")
    samples = np.frombuffer(raw[: len(raw) // (2 * channels) * 2 * channels], "<i2")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return bytes(resample_linear(samples, rate, AUDIO_SAMPLE_RATE).astype("<i2").tobytes())


async def synthesize_pcm_async(text: str, voice: object = "alloy", speed: float = 1.0) -> bytes:
    """Speak ``text`` with espeak-ng: raw s16le mono PCM at 24 kHz (``SpeechSynthesisError`` if not)."""
    if not espeak_available():
        raise SpeechSynthesisError(ESPEAK_MISSING)
    try:
        process = await asyncio.create_subprocess_exec(
            *_espeak_command(voice, speed),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise SpeechSynthesisError(f"cannot run espeak-ng: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(text.encode()), ESPEAK_TIMEOUT)
    except TimeoutError as exc:
        process.kill()
        await process.wait()
        raise SpeechSynthesisError(f"espeak-ng took longer than {ESPEAK_TIMEOUT:.0f}s") from exc
    if process.returncode != 0:
        detail = err.decode(errors="replace").strip()
        raise SpeechSynthesisError(f"espeak-ng failed with exit code {process.returncode}: {detail}")
    return await anyio.to_thread.run_sync(_espeak_wav_to_pcm, out)
