"""Audio decoding and encoding: measure uploads (``analyze_audio``: WAV with the stdlib, other
containers with PyAV), resample, and encode s16le PCM as the speech ``response_format``s."""

from __future__ import annotations

import io
import math
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

AUDIO_SAMPLE_RATE: Final = 24000  # what OpenAI's TTS produces (and its PCM format means)
# response_format -> (PyAV container, encoder): Ogg Opus and ADTS AAC, as OpenAI sends them
_AV_ENCODINGS: Final[Mapping[str, tuple[str, str]]] = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
    "flac": ("flac", "flac"),
}


class AudioDecodeError(ValueError):
    """An upload is not audio we can decode."""


@dataclass(frozen=True, slots=True)
class AudioInfo:
    """What an audio file contains: container/codec, length, rate and level (0..1 of full scale)."""

    format: str
    duration: float
    sample_rate: int
    channels: int
    rms: float
    peak: float

    @property
    def rms_dbfs(self) -> float:
        return -120.0 if self.rms <= 1e-6 else round(20 * math.log10(self.rms), 2)


def _level(samples: Any) -> tuple[float, float]:
    """(rms, peak) of float samples in [-1, 1]."""
    import numpy as np

    if samples.size == 0:
        return 0.0, 0.0
    values = samples.astype(np.float64)
    return float(np.sqrt(np.mean(values * values))), float(np.max(np.abs(values)))


def _pcm_to_float(raw: bytes, width: int) -> Any:
    import numpy as np

    if width == 1:  # unsigned 8-bit
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    if width == 2:
        return np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    if width == 3:
        b = np.frombuffer(raw[: len(raw) // 3 * 3], np.uint8).reshape(-1, 3).astype(np.int32)
        values = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        values = np.where(values & 0x800000, values - 0x1000000, values)
        return values.astype(np.float32) / 8388608
    if width == 4:
        return np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    raise AudioDecodeError(f"unsupported sample width {width}")


def _analyze_wav(data: bytes) -> AudioInfo:
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            # read to the end: streamed WAVs (espeak-ng, OpenAI) announce a bogus huge length
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, ValueError) as exc:
        raise AudioDecodeError(f"not a readable PCM WAV file: {exc}") from exc
    if rate <= 0 or channels <= 0:
        raise AudioDecodeError("WAV header has no sample rate or channels")
    frame = width * channels
    raw = raw[: len(raw) // frame * frame]
    rms, peak = _level(_pcm_to_float(raw, width))
    return AudioInfo("wav", len(raw) / frame / rate, rate, channels, rms, peak)


def _analyze_with_av(data: bytes) -> AudioInfo:
    try:
        import av
        import numpy as np
    except ImportError as exc:
        raise AudioDecodeError("only WAV can be decoded here (PyAV is not installed)") from exc
    try:
        with av.open(io.BytesIO(data), "r") as container:
            if not container.streams.audio:
                raise AudioDecodeError("no audio stream")
            stream = container.streams.audio[0]
            channels = stream.codec_context.channels or 1
            resampler = av.AudioResampler(format="flt", layout="mono")
            chunks, rate = [], 0
            for frame in container.decode(stream):
                rate = frame.sample_rate
                for mono in resampler.resample(frame):
                    chunks.append(mono.to_ndarray().reshape(-1))
            fmt = container.format.name.split(",")[0]
    except AudioDecodeError:
        raise
    except Exception as exc:  # av.error.* for corrupt or unknown data
        raise AudioDecodeError(f"cannot decode audio: {exc}") from exc
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if not rate or samples.size == 0:
        raise AudioDecodeError("no audio samples decoded")
    rms, peak = _level(np.clip(samples, -1.0, 1.0))
    return AudioInfo(fmt, samples.size / rate, rate, channels, rms, peak)


def analyze_audio(data: bytes) -> AudioInfo:
    """Decode an audio file (WAV with the stdlib, anything else with PyAV) and measure it.

    Raises ``AudioDecodeError`` for data that is not decodable audio.
    """
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        try:
            return _analyze_wav(data)
        except AudioDecodeError:  # e.g. float or WAVE_FORMAT_EXTENSIBLE: let FFmpeg try
            return _analyze_with_av(data)
    return _analyze_with_av(data)


def resample_linear(samples: Any, src_rate: int, dst_rate: int) -> Any:
    """Linearly resample mono int16 samples (a numpy array) from ``src_rate`` to ``dst_rate``."""
    import numpy as np

    if src_rate == dst_rate or samples.size == 0:
        return samples.astype(np.int16)
    count = max(1, round(samples.size * dst_rate / src_rate))
    positions = np.arange(count, dtype=np.float64) * (src_rate / dst_rate)
    out = np.interp(positions, np.arange(samples.size, dtype=np.float64), samples.astype(np.float64))
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def pcm_to_wav(pcm: bytes, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """Wrap s16le mono PCM in a RIFF/WAVE header."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm)
    return buffer.getvalue()


def av_speech_formats() -> frozenset[str]:
    """The compressed ``response_format`` values PyAV can encode here (empty without PyAV)."""
    try:
        import av
    except ImportError:
        return frozenset()
    return frozenset(f for f, (_, codec) in _AV_ENCODINGS.items() if codec in av.codecs_available)


def encode_pcm(pcm: bytes, response_format: str, sample_rate: int = AUDIO_SAMPLE_RATE) -> bytes:
    """s16le mono PCM -> the bytes of an OpenAI speech ``response_format``."""
    if response_format == "pcm":
        return pcm
    if response_format == "wav":
        return pcm_to_wav(pcm, sample_rate)
    import av
    import numpy as np

    container_format, codec = _AV_ENCODINGS[response_format]
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=sample_rate, layout="mono")
        assert isinstance(stream, av.AudioStream)
        frame = av.AudioFrame.from_ndarray(np.frombuffer(pcm, "<i2").reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = sample_rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()
