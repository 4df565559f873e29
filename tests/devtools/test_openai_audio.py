"""The fake OpenAI server's audio endpoints, driven through the real ``openai`` SDK and the real
``livekit-plugins-openai`` STT/TTS.

Speech comes from espeak-ng (a system package): without it these tests fail, they never skip;
run ``scripts/install-test-deps.sh`` first.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import time
import urllib.error
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import openai
import pytest
from livekit import rtc
from livekit.agents.utils import http_context
from livekit.plugins import openai as lk_openai
from openai.types.audio import Transcription, TranscriptionVerbose

from morgana_devtools.openai_server import FakeOpenAIProcess, analyze_audio, espeak_available
from morgana_devtools.services import eventually

API_KEY = "sk-test-fake-openai-audio"
DEFAULT_TRANSCRIPT = "Default words"
SENTENCE = "Hello there, this is Morgana speaking."
TTS_MODEL = "gpt-4o-mini-tts"
STT_MODEL = "gpt-4o-mini-transcribe"
MIN_RMS = 0.02  # espeak-ng speech sits around 0.07-0.1 of full scale; silence is 0


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAIProcess]:
    with FakeOpenAIProcess(api_key=API_KEY, transcript=DEFAULT_TRANSCRIPT) as process:
        yield process


@pytest.fixture(autouse=True)
def _clean(fake: FakeOpenAIProcess) -> None:
    if not espeak_available():
        pytest.fail(
            "espeak-ng is not installed, so the fake OpenAI server cannot synthesise speech: "
            "run scripts/install-test-deps.sh (as root), then re-run the tests"
        )
    fake.reset()


def client(fake: FakeOpenAIProcess, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key=API_KEY, max_retries=0, **kwargs)


def level(samples: np.ndarray) -> float:
    """RMS of float samples in [-1, 1]."""
    return float(np.sqrt(np.mean(np.square(samples.astype(np.float64))))) if samples.size else 0.0


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(float samples, rate) of a mono 16-bit WAV."""
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth()) == (1, 2)
        rate = wav.getframerate()
        raw = wav.readframes(wav.getnframes())
    return np.frombuffer(raw, "<i2") / 32768.0, rate


def read_pcm(data: bytes) -> tuple[np.ndarray, int]:
    assert len(data) % 2 == 0
    return np.frombuffer(data, "<i2") / 32768.0, 24000


def read_compressed(data: bytes) -> tuple[np.ndarray, int]:
    """Decode mp3/ogg/aac/flac with PyAV to mono float samples."""
    chunks: list[np.ndarray] = []
    rate = 0
    with av.open(io.BytesIO(data), "r") as container:
        resampler = av.AudioResampler(format="flt", layout="mono")
        for frame in container.decode(audio=0):
            rate = frame.sample_rate
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
    return np.concatenate(chunks), rate


def tone_wav(seconds: float = 0.5, rate: int = 16000, amplitude: float = 0.3) -> bytes:
    """A 440 Hz sine as a 16-bit mono WAV (RMS = amplitude / sqrt 2)."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (amplitude * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return buffer.getvalue()


def transcribe(c: openai.OpenAI, data: bytes, name: str = "speech.wav", **kwargs: Any) -> Any:
    kwargs.setdefault("model", STT_MODEL)
    return c.audio.transcriptions.create(file=(name, data, "audio/wav"), **kwargs)


# --------------------------------------------------------------------------- speech


@pytest.mark.parametrize(
    ("response_format", "content_type", "decode"),
    [
        ("wav", "audio/wav", read_wav),
        ("pcm", "audio/pcm", read_pcm),
        ("mp3", "audio/mpeg", read_compressed),
        ("opus", "audio/ogg", read_compressed),
        ("aac", "audio/aac", read_compressed),
        ("flac", "audio/flac", read_compressed),
    ],
)
def test_speech_is_real_audio(
    fake: FakeOpenAIProcess,
    response_format: str,
    content_type: str,
    decode: Callable[[bytes], tuple[np.ndarray, int]],
) -> None:
    response = client(fake).audio.speech.create(
        model=TTS_MODEL,
        voice="coral",
        input=SENTENCE,
        response_format=response_format,  # type: ignore[arg-type]
    )
    assert response.response.headers["content-type"] == content_type
    samples, rate = decode(response.content)
    duration = samples.size / rate
    assert rate in (24000, 48000)  # Opus always decodes at 48 kHz
    assert 1.0 < duration < 6.0, duration
    assert level(samples) > MIN_RMS

    record = fake.audio_requests("speech")[-1]
    assert record["input"] == SENTENCE
    assert (record["voice"], record["response_format"], record["outcome"]) == ("coral", response_format, "completed")
    assert record["bytes_sent"] == record["bytes_total"] == len(response.content)
    assert record["audio_seconds"] == pytest.approx(duration, abs=0.15)  # codecs pad a little


def test_speech_wav_header_is_24khz_mono_16bit(fake: FakeOpenAIProcess) -> None:
    data = client(fake).audio.speech.create(model="tts-1", voice="alloy", input="Hi", response_format="wav").content
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() * 2 == len(data) - 44  # a true length, not a streaming placeholder


def test_speech_sse_carries_the_same_audio(fake: FakeOpenAIProcess) -> None:
    c = client(fake)
    raw = c.audio.speech.create(model=TTS_MODEL, voice="ash", input=SENTENCE, response_format="pcm").content
    sse = c.audio.speech.create(
        model=TTS_MODEL, voice="ash", input=SENTENCE, response_format="pcm", stream_format="sse"
    )
    assert sse.response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == raw  # espeak-ng is deterministic
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    assert done["usage"]["total_tokens"] == done["usage"]["input_tokens"] + done["usage"]["output_tokens"] > 0


def test_speech_speed_changes_duration(fake: FakeOpenAIProcess) -> None:
    c = client(fake)
    normal = c.audio.speech.create(model=TTS_MODEL, voice="echo", input=SENTENCE, response_format="pcm")
    fast = c.audio.speech.create(model=TTS_MODEL, voice="echo", input=SENTENCE, response_format="pcm", speed=2.0)
    assert len(fast.content) < 0.75 * len(normal.content)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"response_format": "ogg"}, "response_format"),
        ({"voice": "nobody"}, "voice"),
        ({"input": ""}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"speed": 5.0}, "speed"),
        ({"model": "tts-1", "stream_format": "sse"}, "stream_format"),
    ],
)
def test_speech_rejects_bad_requests(fake: FakeOpenAIProcess, params: dict[str, Any], param: str) -> None:
    request = {"model": TTS_MODEL, "voice": "alloy", "input": "hi", **params}
    with pytest.raises(openai.BadRequestError) as caught:
        client(fake).audio.speech.create(**request)
    assert caught.value.body["param"] == param  # type: ignore[index]
    assert fake.audio_requests("speech")[-1]["outcome"] == "error_status"


def test_speech_scenarios_are_separate_from_chat(fake: FakeOpenAIProcess) -> None:
    c = client(fake)
    fake.queue_scenario(endpoint="speech", status=429)
    fake.queue_scenario(endpoint="speech", status=500)
    reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "You said: hi"  # chat did not take a speech scenario
    with pytest.raises(openai.RateLimitError):
        c.audio.speech.create(model=TTS_MODEL, voice="alloy", input="hi")
    with pytest.raises(openai.InternalServerError):
        c.audio.speech.create(model=TTS_MODEL, voice="alloy", input="hi")
    assert c.audio.speech.create(model=TTS_MODEL, voice="alloy", input="hi", response_format="pcm").content
    assert [r["status"] for r in fake.audio_requests("speech")] == [429, 500, 200]
    stats = fake.stats()
    assert (stats["speech_error_status"], stats["speech_completed"], stats["completed"]) == (2, 1, 1)


def test_speech_first_delay_and_dropped_stream(fake: FakeOpenAIProcess) -> None:
    c = client(fake)
    fake.queue_scenario(endpoint="speech", first_delay_ms=400)
    started = time.monotonic()
    c.audio.speech.create(model=TTS_MODEL, voice="alloy", input="hi", response_format="pcm")
    assert time.monotonic() - started >= 0.4

    fake.queue_scenario(endpoint="speech", fail_after=1)
    with pytest.raises(openai.APIConnectionError):
        c.audio.speech.create(model=TTS_MODEL, voice="alloy", input=SENTENCE, response_format="pcm")
    eventually(
        lambda: fake.audio_requests("speech")[-1]["outcome"] == "failed",
        3,
        interval=0.05,
        what="the dropped speech stream recorded as failed",
    )
    assert fake.audio_requests("speech")[-1]["chunks_sent"] == 1


def test_speech_scenario_validation(fake: FakeOpenAIProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        fake.set_scenario(endpoint="speech", tokens=3)
    assert caught.value.code == 400
    with pytest.raises(urllib.error.HTTPError):
        fake.queue_scenario(endpoint="transcriptions", delay_ms=5)
    with pytest.raises(urllib.error.HTTPError):
        fake.queue_scenario(endpoint="nowhere", status=500)


def test_speech_without_espeak_fails_loudly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # the server runs sys.executable, so only espeak-ng is lost
    with FakeOpenAIProcess(api_key=API_KEY) as bare:
        with pytest.raises(openai.InternalServerError) as caught:
            client(bare).audio.speech.create(model=TTS_MODEL, voice="alloy", input="hi", response_format="wav")
        assert "espeak-ng" in caught.value.message
        assert caught.value.body["code"] == "espeak_ng_not_installed"  # type: ignore[index]
        assert bare.audio_requests()[-1]["status"] == 500


# --------------------------------------------------------------------------- transcriptions


def test_transcripts_come_from_queue_then_sticky_then_default(fake: FakeOpenAIProcess) -> None:
    c, audio = client(fake), tone_wav()
    fake.queue_transcripts("first words", "second words")
    texts = [transcribe(c, audio, language="en").text for _ in range(3)]
    assert texts == ["first words", "second words", DEFAULT_TRANSCRIPT]
    fake.set_transcript("sticky words")
    assert [transcribe(c, audio).text for _ in range(2)] == ["sticky words"] * 2
    fake.set_transcript(None)
    assert transcribe(c, audio).text == DEFAULT_TRANSCRIPT

    record = fake.audio_requests("transcriptions")[0]
    assert (record["model"], record["language"], record["transcript"]) == (STT_MODEL, "en", "first words")
    assert (record["audio_format"], record["sample_rate"], record["channels"]) == ("wav", 16000, 1)
    assert record["duration"] == pytest.approx(0.5)
    assert record["rms"] == pytest.approx(0.3 / math.sqrt(2), rel=0.01)
    assert fake.stats()["transcriptions_completed"] == 6


def test_transcription_response_formats(fake: FakeOpenAIProcess) -> None:
    c, audio = client(fake), tone_wav(seconds=1.2)
    fake.set_transcript("format words")

    as_json = transcribe(c, audio)
    assert isinstance(as_json, Transcription)
    assert as_json.usage is not None and as_json.usage.type == "tokens"  # gpt-4o-* bill tokens

    whisper = transcribe(c, audio, model="whisper-1")
    assert whisper.usage is not None and whisper.usage.type == "duration"
    assert whisper.usage.seconds == 2  # whole seconds, rounded up

    assert transcribe(c, audio, response_format="text").strip() == "format words"

    verbose = transcribe(c, audio, model="whisper-1", response_format="verbose_json", language="en")
    assert isinstance(verbose, TranscriptionVerbose)
    assert (verbose.text, verbose.language, verbose.duration) == ("format words", "english", 1.2)
    assert verbose.segments is not None and verbose.segments[0].end == 1.2

    for model, response_format in ((STT_MODEL, "verbose_json"), ("whisper-1", "srt"), ("whisper-1", "vtt")):
        with pytest.raises(openai.BadRequestError) as caught:
            transcribe(c, audio, model=model, response_format=response_format)
        assert caught.value.body["param"] == "response_format"  # type: ignore[index]


def test_transcription_rejects_what_is_not_audio(fake: FakeOpenAIProcess) -> None:
    c = client(fake)
    fake.queue_transcripts("kept for a valid upload")
    bad_uploads = [
        ("speech.wav", b"this is certainly not audio" * 10),
        ("speech.wav", tone_wav()[:30]),  # a truncated header
        ("speech.wav", tone_wav(seconds=0.05)),  # shorter than OpenAI's 0.1 s minimum
        ("notes.txt", tone_wav()),  # an extension OpenAI refuses
    ]
    for name, data in bad_uploads:
        with pytest.raises(openai.BadRequestError) as caught:
            transcribe(c, data, name=name)
        assert caught.value.body["param"] == "file"  # type: ignore[index]
    assert transcribe(c, tone_wav()).text == "kept for a valid upload"
    outcomes = [(r["outcome"], r["status"]) for r in fake.audio_requests("transcriptions")]
    assert outcomes == [("error_status", 400)] * 4 + [("completed", 200)]


def test_transcription_accepts_compressed_audio(fake: FakeOpenAIProcess) -> None:
    c = client(fake)
    mp3 = c.audio.speech.create(model=TTS_MODEL, voice="alloy", input=SENTENCE, response_format="mp3").content
    assert transcribe(c, mp3, name="speech.mp3").text == DEFAULT_TRANSCRIPT
    record = fake.audio_requests("transcriptions")[-1]
    assert record["audio_format"] == "mp3"
    assert record["duration"] > 1.0 and record["rms"] > MIN_RMS


def test_transcription_status_and_delay_scenarios(fake: FakeOpenAIProcess) -> None:
    c, audio = client(fake), tone_wav()
    fake.queue_transcripts("survives the failures")
    fake.queue_scenario(endpoint="transcriptions", status=500)
    fake.queue_scenario(endpoint="transcriptions", status=429)
    with pytest.raises(openai.InternalServerError):
        transcribe(c, audio)
    with pytest.raises(openai.RateLimitError) as caught:
        transcribe(c, audio)
    assert caught.value.response.headers["retry-after"] == "1"

    fake.set_scenario(endpoint="transcriptions", first_delay_ms=1000)
    with pytest.raises(openai.APITimeoutError):
        transcribe(client(fake, timeout=0.3), audio)
    eventually(
        lambda: fake.audio_requests("transcriptions")[-1]["outcome"] == "client_disconnected",
        3,
        interval=0.05,
        what="the timed-out transcription recorded as client_disconnected",
    )
    assert fake.transcripts()["queue"] == ["survives the failures"]  # nothing answered, nothing consumed

    fake.set_scenario(endpoint="transcriptions", first_delay_ms=300)
    started = time.monotonic()
    assert transcribe(c, audio).text == "survives the failures"
    assert time.monotonic() - started >= 0.3
    fake.set_scenario(endpoint="transcriptions")  # clears it
    stats = fake.stats()
    assert (stats["transcriptions_error_status"], stats["transcriptions_client_disconnected"]) == (2, 1)


def test_round_trip_speech_to_transcription(fake: FakeOpenAIProcess) -> None:
    c = client(fake)
    wav_bytes = c.audio.speech.create(model=TTS_MODEL, voice="nova", input=SENTENCE, response_format="wav").content
    samples, rate = read_wav(wav_bytes)
    fake.queue_transcripts(SENTENCE)
    assert transcribe(c, wav_bytes).text == SENTENCE

    record = fake.audio_requests("transcriptions")[-1]
    assert record["sample_rate"] == rate == 24000
    assert record["duration"] == pytest.approx(samples.size / rate, abs=1e-3)
    assert record["rms"] == pytest.approx(level(samples), rel=1e-3)
    assert record["rms"] > MIN_RMS
    assert analyze_audio(wav_bytes).duration == pytest.approx(record["duration"], abs=1e-3)


# --------------------------------------------------------------------------- livekit plugins


async def _livekit_round_trip(fake: FakeOpenAIProcess) -> None:
    # The OpenAI plugins talk through the openai SDK (httpx), but livekit plugins in general
    # expect the worker's aiohttp session; http_context.open() provides it outside a job.
    async with http_context.open():
        frames_by_model: dict[str, list[rtc.AudioFrame]] = {}
        # gpt-4o-mini-tts asks for stream_format="sse"; tts-1 gets raw audio bytes (mp3 here)
        for model, response_format in ((TTS_MODEL, "pcm"), ("tts-1", "mp3")):
            tts = lk_openai.TTS(base_url=fake.base_url, api_key=API_KEY, model=model, response_format=response_format)
            try:
                async with tts.synthesize("Hello there") as stream:
                    frames_by_model[model] = [event.frame async for event in stream]
            finally:
                await tts.aclose()
            combined = rtc.combine_audio_frames(frames_by_model[model])
            assert (combined.sample_rate, combined.num_channels) == (24000, 1)
            assert combined.duration > 0.3
            assert level(np.frombuffer(combined.data, np.int16) / 32768.0) > MIN_RMS

        records = fake.audio_requests("speech")
        assert [(r["model"], r["stream_format"], r["outcome"]) for r in records] == [
            (TTS_MODEL, "sse", "completed"),
            ("tts-1", "audio", "completed"),
        ]

        frames = frames_by_model[TTS_MODEL]
        fake.queue_transcripts("Hello there")
        stt = lk_openai.STT(base_url=fake.base_url, api_key=API_KEY, model=STT_MODEL)
        whisper = lk_openai.STT(base_url=fake.base_url, api_key=API_KEY, model="whisper-1")
        try:
            event = await stt.recognize(buffer=frames)
            assert event.alternatives[0].text == "Hello there"
            event = await whisper.recognize(buffer=frames)  # asks for verbose_json
            assert event.alternatives[0].text == DEFAULT_TRANSCRIPT
            assert event.alternatives[0].language == "en"  # livekit normalises "english"
        finally:
            await stt.aclose()
            await whisper.aclose()

    sent = rtc.combine_audio_frames(frames)
    first, second = fake.audio_requests("transcriptions")
    assert (first["model"], first["response_format"], first["language"]) == (STT_MODEL, "json", "en")
    assert (second["model"], second["response_format"]) == ("whisper-1", "verbose_json")
    assert first["duration"] == pytest.approx(sent.duration, abs=1e-3)
    assert first["sample_rate"] == 24000
    assert first["rms"] > MIN_RMS


def test_livekit_openai_tts_and_stt(fake: FakeOpenAIProcess) -> None:
    asyncio.run(_livekit_round_trip(fake))
