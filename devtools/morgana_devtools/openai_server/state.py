"""Server configuration (the CLI flags), recorded requests and the mutable server state."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Final, TypeVar

from starlette.requests import Request

from morgana_devtools.openai_server.scenarios import ENDPOINTS, Scenario

DEFAULT_MODEL: Final = "gpt-4o-mini"
MAX_RECORDS: Final = 1000
DEFAULT_TRANSCRIPT: Final = "Hello Morgana"


@dataclass(frozen=True, slots=True)
class FakeOpenAIConfig:
    """Server-wide settings (the CLI flags)."""

    model: str = DEFAULT_MODEL
    api_key: str | None = None
    default_tokens: int | None = None
    first_delay_ms: float = 0.0
    delay_ms: float = 0.0
    transcript: str = DEFAULT_TRANSCRIPT

    def base_scenario(self) -> Scenario:
        """The defaults every selected scenario is layered over."""
        return Scenario(
            tokens=self.default_tokens,
            first_delay_ms=self.first_delay_ms,
            delay_ms=self.delay_ms,
            fail_mode="abort",
            stall_seconds=3600.0,
        )


@dataclass(slots=True)
class ChatRecord:
    """One recorded ``POST /v1/chat/completions`` (as returned by ``/_control/requests``)."""

    model: object
    messages: object
    stream: object
    stream_options: object
    headers_authorization_present: bool
    outcome: str = "pending"
    tokens_sent: int = 0
    scenario: dict[str, object] = field(default_factory=dict)
    generation: int = 0

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["generation"]
        return data


@dataclass(slots=True, kw_only=True)
class AudioRecord:
    """Common part of a recorded audio request (``/_control/audio_requests``).

    ``outcome``: pending, completed, client_disconnected (``status`` 499 if it left before
    the answer), failed (connection dropped on purpose) or error_status (answered with an
    error; ``status`` and ``error`` say which).
    """

    endpoint: str
    model: object = None
    headers_authorization_present: bool = False
    outcome: str = "pending"
    status: int | None = None
    error: str | None = None
    scenario: dict[str, object] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    generation: int = 0

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        del data["generation"]
        return data


@dataclass(slots=True, kw_only=True)
class TranscriptionRecord(AudioRecord):
    """One ``POST /v1/audio/transcriptions``: the form fields, what the upload contained
    (``audio_format``, ``duration`` s, ``sample_rate``, ``channels``, ``rms``/``peak`` as a
    fraction of full scale, ``rms_dbfs``) and the ``transcript`` answered."""

    endpoint: str = "transcriptions"
    filename: str | None = None
    file_content_type: str | None = None
    file_bytes: int = 0
    language: object = None
    languages: list[str] = field(default_factory=list)
    prompt: object = None
    response_format: object = None
    temperature: object = None
    audio_format: str | None = None
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    rms: float | None = None
    rms_dbfs: float | None = None
    peak: float | None = None
    transcript: str | None = None


@dataclass(slots=True, kw_only=True)
class SpeechRecord(AudioRecord):
    """One ``POST /v1/audio/speech``: the request fields, the synthesised ``audio_seconds``
    and what was sent (``bytes_sent`` of audio in ``response_format``, before any base64;
    ``chunks_sent``)."""

    endpoint: str = "speech"
    input: object = None
    voice: object = None
    response_format: object = None
    stream_format: object = None
    speed: object = None
    instructions: object = None
    audio_seconds: float | None = None
    bytes_total: int = 0
    bytes_sent: int = 0
    chunks_sent: int = 0


AudioRecordT = TypeVar("AudioRecordT", bound=AudioRecord)


class FakeOpenAIState:
    """Mutable server state: scenarios, transcripts, recorded requests and counters."""

    def __init__(self, config: FakeOpenAIConfig) -> None:
        self.config = config
        self.base = config.base_scenario()
        self.stickies: dict[str, Scenario | None] = dict.fromkeys(ENDPOINTS)
        self.queues: dict[str, deque[Scenario]] = {e: deque() for e in ENDPOINTS}
        self.records: deque[ChatRecord] = deque(maxlen=MAX_RECORDS)
        self.audio_records: deque[AudioRecord] = deque(maxlen=MAX_RECORDS)
        self.transcripts: deque[str] = deque()
        self.transcript: str | None = None
        self.counters: Counter[str] = Counter()
        self.open_streams = 0
        self.open_speech_streams = 0
        self.generation = 0

    @property
    def sticky(self) -> Scenario | None:
        """The chat endpoint's sticky scenario."""
        return self.stickies["chat"]

    @property
    def queue(self) -> deque[Scenario]:
        """The chat endpoint's one-shot queue."""
        return self.queues["chat"]

    def reset(self) -> None:
        """Forget scenarios, transcripts, records and counters (open streams stay counted)."""
        for endpoint in ENDPOINTS:
            self.stickies[endpoint] = None
            self.queues[endpoint].clear()
        self.transcripts.clear()
        self.transcript = None
        self.records.clear()
        self.audio_records.clear()
        self.counters.clear()
        self.generation += 1

    def select(self, directive: Scenario | None) -> Scenario:
        """Pick the scenario for a chat request (directive > queue > sticky), over the defaults."""
        chosen = directive
        if chosen is None and self.queue:
            chosen = self.queue.popleft()
        if chosen is None:
            chosen = self.sticky
        return self.base if chosen is None else chosen.over(self.base)

    def select_audio(self, endpoint: str) -> Scenario:
        """Pick the scenario for an audio request: its endpoint's queue, else its sticky one."""
        queue = self.queues[endpoint]
        chosen = queue.popleft() if queue else self.stickies[endpoint]
        return chosen or Scenario()

    def next_transcript(self) -> str:
        """The transcript for a transcription: queued, else sticky, else the configured default."""
        if self.transcripts:
            return self.transcripts.popleft()
        return self.transcript if self.transcript is not None else self.config.transcript

    def begin(self, record: ChatRecord) -> ChatRecord:
        record.generation = self.generation
        self.records.append(record)
        self.counters["requests"] += 1
        return record

    def finish(self, record: ChatRecord, outcome: str) -> None:
        record.outcome = outcome
        if record.generation == self.generation:
            self.counters[outcome] += 1

    def begin_audio(self, record: AudioRecordT) -> AudioRecordT:
        record.generation = self.generation
        self.audio_records.append(record)
        self.counters[f"{record.endpoint}_requests"] += 1
        return record

    def finish_audio(self, record: AudioRecord, outcome: str, status: int = 200, error: str | None = None) -> None:
        record.outcome, record.status, record.error = outcome, status, error
        if record.generation == self.generation:
            self.counters[f"{record.endpoint}_{outcome}"] += 1
            if isinstance(record, SpeechRecord):
                self.counters["speech_bytes_sent"] += record.bytes_sent

    def stats(self) -> dict[str, int]:
        names = ("requests", "completed", "client_disconnected", "failed", "error_status")
        audio = [
            f"{endpoint}_{name}"
            for endpoint in ("transcriptions", "speech")
            for name in ("requests", "completed", "client_disconnected", "failed", "error_status")
        ]
        return {
            **{n: self.counters[n] for n in (*names, *audio, "speech_bytes_sent")},
            "open_streams": self.open_streams,
            "open_speech_streams": self.open_speech_streams,
        }


def fake_state(request: Request) -> FakeOpenAIState:
    """The ``FakeOpenAIState`` of the app serving ``request``."""
    state: FakeOpenAIState = request.app.state.fake
    return state
