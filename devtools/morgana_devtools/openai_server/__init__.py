"""A stand-in for the OpenAI API used by tests, ``make run`` and benchmarks.

It speaks the real Chat Completions wire protocol (JSON bodies, server-sent events,
OpenAI error bodies), so the official ``openai`` SDK and ``langchain_openai.ChatOpenAI``
run against it unchanged. By default it answers ``"You said: <last user message>"``.

It also serves the audio endpoints, so the SDK and ``livekit-plugins-openai``'s ``STT`` and
``TTS`` run against it unchanged:

- ``POST /v1/audio/speech`` answers with *real* speech of ``input``, synthesised by
  ``espeak-ng`` (a system package: ``scripts/install-test-deps.sh``) and resampled to OpenAI's
  24 kHz mono 16-bit. ``response_format``: ``wav``, ``pcm`` (raw s16le), and ``mp3``, ``opus``
  (Ogg), ``aac`` (ADTS), ``flac`` encoded with PyAV when it is importable (else a 400 saying
  so). ``stream_format="sse"`` wraps the same bytes, base64, in ``speech.audio.delta`` events
  followed by ``speech.audio.done`` (rejected for ``tts-1``/``tts-1-hd``, as OpenAI does).
  The audio is synthesised in one go (espeak-ng is ~100x real time) and streamed in ~100 ms
  chunks. Without espeak-ng the endpoint fails loudly: a 500 whose message names espeak-ng.
- ``POST /v1/audio/transcriptions`` (multipart) cannot recognise speech, so the transcript it
  returns is, per request, the first of: the head of the transcript queue
  (``POST /_control/transcripts {"texts": [...]}``, one consumed per successful request),
  the sticky transcript (``POST /_control/transcript {"text": ...}``; ``null`` clears it),
  the ``--transcript`` default (``"Hello Morgana"``). The upload must be real audio: WAV is
  parsed with the stdlib, other containers (mp3, ogg, flac, webm, ...) with PyAV when present;
  anything else is a 400 like OpenAI's. Its duration, sample rate, channels and RMS/peak level
  (0..1 of full scale) are recorded so tests can check that real speech was sent.
  ``response_format``: ``json`` (``{"text", "usage"}``; token usage for ``gpt-*`` models and
  duration usage for ``whisper-*``, as OpenAI bills them), ``text`` and ``verbose_json``
  (``whisper-*`` models only, as with OpenAI); ``srt``/``vtt`` get a 400.

*Scenarios* make it behave differently on demand: a fixed reply or reply length,
delays, HTTP errors, streams that break or stall (with or without ``: keepalive`` comments
meanwhile, ``keepalive_ms``). Each endpoint has its own sticky scenario
and one-shot queue, chosen with an ``"endpoint"`` key in the control body: ``"chat"`` (the
default), ``"transcriptions"`` or ``"speech"``. Per chat request the first of these wins:

1. a directive in the last user message, e.g. ``"hi [[fake tokens=5 delay_ms=20]]"``
   (stripped from the echoed text);
2. the head of the one-shot queue (``POST /_control/queue``);
3. the sticky scenario (``POST /_control/scenario``; ``{}`` clears it);
4. the server defaults given on the command line.

Audio requests use 2 and 3 of their endpoint (no directives, no CLI defaults), and accept
only the fields that mean something there:

- ``transcriptions``: ``status`` (answer with that HTTP error and an OpenAI error body) and
  ``first_delay_ms`` (wait before answering). A scenario is taken from the queue only by a
  request whose upload is valid; a failed request does not consume a transcript.
- ``speech``: ``status``; ``first_delay_ms`` (headers go out at once, the first audio chunk
  after the delay, as with chat streams); ``delay_ms`` between chunks; ``fail_after`` N chunks
  (drop the connection; ``fail_mode`` may only be ``"abort"``); ``stall_after`` N chunks for
  ``stall_seconds``.

Test-control endpoints (unauthenticated): ``POST /_control/scenario`` and
``POST /_control/queue`` (a JSON ``Scenario``, plus optional ``"endpoint"``),
``GET /_control/scenario`` (all endpoints), ``POST /_control/reset`` (everything),
``GET /_control/requests`` (last 1000 chat requests with their outcome),
``GET /_control/audio_requests[?endpoint=transcriptions|speech]`` (last 1000 audio requests,
see ``TranscriptionRecord`` and ``SpeechRecord``), ``POST /_control/transcripts``,
``POST /_control/transcript``, ``GET /_control/transcripts`` (queue, sticky, default) and
``GET /_control/stats`` (chat counters and open streams, plus ``transcriptions_*`` and
``speech_*`` counters and ``open_speech_streams``).

Run it with ``python -m morgana_devtools.openai_server --port 0`` (prints
``LISTENING http://127.0.0.1:<port>``), or from Python::

    with FakeOpenAIProcess(transcript="Hello Morgana") as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="anything")
        fake.queue_transcripts("first", "second")   # then the default
        fake.queue_scenario(endpoint="speech", status=429)
        ...
        fake.audio_requests("transcriptions")[-1]["rms"]

The code lives in modules by concern: ``scenarios`` (the scenario language and text helpers),
``audio`` (decoding, measuring and encoding audio), ``speech_synthesis`` (espeak-ng), ``errors``
(OpenAI error bodies, authentication), ``state`` (configuration, records, server state),
``asgi`` (shared response plumbing), ``chat``, ``transcription`` and ``speech`` (the endpoints),
``control`` (test-control endpoints), ``app`` (the ASGI app), ``server`` (uvicorn and the CLI)
and ``process`` (``FakeOpenAIProcess``).
"""

from morgana_devtools.openai_server.app import create_app
from morgana_devtools.openai_server.audio import AudioInfo, analyze_audio
from morgana_devtools.openai_server.process import FakeOpenAIProcess
from morgana_devtools.openai_server.scenarios import Scenario, parse_directive, tokenize
from morgana_devtools.openai_server.server import main, serve
from morgana_devtools.openai_server.speech_synthesis import espeak_available
from morgana_devtools.openai_server.state import FakeOpenAIConfig, FakeOpenAIState

__all__ = [
    "AudioInfo",
    "FakeOpenAIConfig",
    "FakeOpenAIProcess",
    "FakeOpenAIState",
    "Scenario",
    "analyze_audio",
    "create_app",
    "espeak_available",
    "main",
    "parse_directive",
    "serve",
    "tokenize",
]
