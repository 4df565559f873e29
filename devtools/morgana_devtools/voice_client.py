"""A LiveKit caller as a frontend would be: the documented token flow, a microphone, ears.

Used by the voice tests and the voice benchmark: it speaks real (espeak-ng) audio as its
microphone and records what it hears and the transcripts the agent publishes.
"""

import asyncio
import json
import math
import time
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

import httpx
import numpy as np
from livekit import rtc

from morgana_devtools.services import eventually_async

SAMPLE_RATE = 48000
FRAME_MS = 10
CALLER_PASSWORD = "Caller_Passw0rd!"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def speech_pcm(fake_root_url: str, api_key: str, text: str, voice: str = "alloy") -> np.ndarray:
    """Real speech of `text` (the stand-in's espeak-ng voice for `voice`), as 48 kHz mono int16."""
    response = httpx.post(
        f"{fake_root_url}/v1/audio/speech",
        timeout=30,
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "tts-1", "voice": voice, "input": text, "response_format": "wav"},
    )
    response.raise_for_status()
    with wave.open(BytesIO(response.content)) as wav:
        rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
    samples = np.frombuffer(frames, dtype=np.int16).astype(np.float32)
    positions = np.arange(0, len(samples), rate / SAMPLE_RATE)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.int16)


def rms(samples: np.ndarray) -> float:
    return float(math.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


def direct_token(livekit, identity: str, agent_name: str) -> str:
    """A participant token minted here, dispatching `agent_name` (for dedicated workers)."""
    from livekit import api

    return (
        api.AccessToken(livekit.api_key, livekit.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=f"room-{identity}"))
        .with_room_config(api.RoomConfiguration(agents=[api.RoomAgentDispatch(agent_name=agent_name)]))
        .to_jwt()
    )


@dataclass
class Caller:
    """One user in one room: joins through the API's token endpoint, talks, listens."""

    api_url: str
    room: rtc.Room = field(default_factory=rtc.Room)
    transcripts: list[tuple[str, str]] = field(default_factory=list)  # (transcribed track, text)
    mic_track_sid: str = ""
    heard: list[tuple[float, float]] = field(default_factory=list)  # (time, frame rms)
    session_id: str = ""
    session_token: str = ""
    statuses: list[dict] = field(default_factory=list)  # what the API said on `morgana.status`
    # Identities of participants that left while this caller was still in the room: an agent
    # among them is a call cut (or, after a kill, an agent to be replaced).
    left_while_connected: list[str] = field(default_factory=list)
    _source: rtc.AudioSource | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)

    async def join(self) -> None:
        """The documented frontend flow: register, session, LiveKit token, connect."""
        async with httpx.AsyncClient(base_url=self.api_url, timeout=20) as http:
            email = f"caller-{uuid.uuid4().hex[:12]}@example.com"
            registered = await http.post("/api/v1/auth/register", json={"email": email, "password": CALLER_PASSWORD})
            registered.raise_for_status()
            user_token = registered.json()["token"]["access_token"]
            session = await http.post("/api/v1/auth/session", headers=_bearer(user_token))
            session.raise_for_status()
            self.session_id = session.json()["session_id"]
            self.session_token = session.json()["token"]["access_token"]
            grant = await http.post("/api/v1/livekit/token", headers=_bearer(self.session_token))
            grant.raise_for_status()
            grant = grant.json()
        await self.connect(grant["serverUrl"], grant["participantToken"])

    async def connect(self, server_url: str, token: str) -> None:
        self.room.on("track_subscribed", self._on_track)
        self.room.on("participant_disconnected", lambda p: self.left_while_connected.append(p.identity))
        self.room.register_text_stream_handler("lk.transcription", self._on_transcription)
        self.room.on("data_received", self._on_data)
        await self.room.connect(server_url, token)
        self._source = rtc.AudioSource(SAMPLE_RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("microphone", self._source)
        publication = await self.room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        self.mic_track_sid = publication.sid

    async def say(self, samples: np.ndarray, trailing_silence_s: float = 1.5) -> float:
        """Play `samples` as the microphone in real time; returns when the speech ended."""
        assert self._source is not None
        per_frame = SAMPLE_RATE * FRAME_MS // 1000
        silence = np.zeros(int(SAMPLE_RATE * trailing_silence_s), dtype=np.int16)
        ended_at = 0.0
        for chunk_samples, is_speech in ((samples, True), (silence, False)):
            for start in range(0, len(chunk_samples), per_frame):
                chunk = chunk_samples[start : start + per_frame]
                if len(chunk) < per_frame:
                    chunk = np.pad(chunk, (0, per_frame - len(chunk)))
                frame = rtc.AudioFrame(chunk.tobytes(), SAMPLE_RATE, 1, per_frame)
                await self._source.capture_frame(frame)
            if is_speech:
                ended_at = time.monotonic()
        return ended_at

    async def silence(self, seconds: float) -> None:
        await self.say(np.zeros(0, dtype=np.int16), trailing_silence_s=seconds)

    def first_audio_after(self, moment: float, threshold: float = 300.0) -> float | None:
        return next((t for t, level in self.heard if t >= moment and level > threshold), None)

    def agent_texts(self) -> list[str]:
        return [text for track, text in self.transcripts if track != self.mic_track_sid]

    def user_texts(self) -> list[str]:
        return [text for track, text in self.transcripts if track == self.mic_track_sid]

    async def history(self) -> list[tuple[str, str, str]]:
        """The caller's conversation as `GET /api/v1/chatbot/messages` gives it: (role, content, channel)."""
        async with httpx.AsyncClient(base_url=self.api_url, timeout=20) as http:
            response = await http.get("/api/v1/chatbot/messages", headers=_bearer(self.session_token))
            response.raise_for_status()
        return [(m["role"], m["content"], m["channel"]) for m in response.json()["messages"]]

    async def leave(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.room.disconnect()

    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic == "morgana.status":
            self.statuses.append(json.loads(packet.data))

    def _on_track(self, track: rtc.Track, _pub: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self._tasks.append(asyncio.create_task(self._listen(track)))

    async def _listen(self, track: rtc.Track) -> None:
        async for event in rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1):
            samples = np.frombuffer(event.frame.data, dtype=np.int16)
            self.heard.append((time.monotonic(), rms(samples)))

    def _on_transcription(self, reader: rtc.TextStreamReader, participant_identity: str) -> None:
        async def read() -> None:
            try:
                text = await reader.read_all()
            except rtc.StreamError:  # the room closed mid-transcript (hanging up during a reply)
                return
            attributes = reader.info.attributes
            track = attributes.get("lk.transcribed_track_id", "")
            # The caller's words come as interim then final segments; the agent's as one
            # delta stream per reply, complete once read to the end.
            final = attributes.get("lk.transcription_final") == "true" or track != self.mic_track_sid
            if final and text.strip():
                self.transcripts.append((track, text.strip()))

        self._tasks.append(asyncio.create_task(read()))


async def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Whether `predicate()` turned truthy within `timeout` s, never failing: for the voice benchmark,
    which counts what did not happen. Tests use `eventually_async`, which fails saying what."""
    try:
        await eventually_async(predicate, timeout, interval)
    except AssertionError:
        return False
    return True
