"""The LiveKit agent worker: one job per room, one Morgana chat session per caller.

Run with `morgana-agent start` (production: drains on SIGTERM) or `morgana-agent dev`
(see morgana.agent.cli).
"""

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable

import httpx
import openai as openai_sdk
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, room_io, stt
from livekit.agents.llm import ChatMessage
from livekit.agents.voice import ConversationItemAddedEvent
from livekit.agents.voice.turn import TurnDetectionMode
from livekit.plugins import openai

from morgana.agent import metrics
from morgana.agent.api_client import ApiError, ChatSession, MorganaApi
from morgana.agent.config import AgentSettings, get_settings
from morgana.agent.llm import MorganaLLM
from morgana.agent.pod_cost import PodDeletionCost
from morgana.agent.readiness import Readiness
from morgana.agent.transport import JitterBuffer
from morgana.agent.turn import LastSound, SmartTurnDetector, SmartTurnModel, predict_after_silence
from morgana.agent.vad import load_vads

log = logging.getLogger("morgana.agent")

INPUT_SAMPLE_RATE = 16_000


def prewarm(proc: JobProcess) -> None:
    """Once per process, before a call arrives: what a call would otherwise wait for."""
    settings = get_settings()
    # Both models ship in wheels (Silero in livekit-agents' own, pipecat's Smart Turn): nothing
    # is downloaded.
    vads = load_vads(
        settings.vad_runtime,
        settings.vad_min_silence_seconds,
        settings.stt_vad_min_silence_seconds,
        settings.vad_deactivation_threshold,
    )
    proc.userdata["vad"], proc.userdata["stt_vad"] = vads.turn, vads.stt
    if settings.turn_detector == "smart-turn":
        proc.userdata["smart_turn"] = SmartTurnModel()
        predict_after_silence(settings.smart_turn_after_silence_seconds)
    # Creating the TLS context (the CA bundle) blocks an event loop for 0.1-3 s under load: paid
    # here, a caller's first turn does not wait for it. What this and a call import is imported
    # once by the forkserver (PRELOAD_MODULES).
    proc.userdata["tls"] = ssl.create_default_context()
    # Exported as 0 while idle (metrics are created on first use: see morgana.agent.metrics).
    metrics.ACTIVE_CALLS.inc(0)


def speech_client(settings: AgentSettings, base_url: str | None, tls: ssl.SSLContext) -> openai_sdk.AsyncClient:
    """An OpenAI-compatible client for STT or TTS, on the process's TLS context."""
    return openai_sdk.AsyncClient(
        api_key=settings.speech_api_key,
        base_url=base_url or settings.openai_base_url,
        max_retries=0,
        # openai types `http_client` as an httpx2.AsyncClient only, yet accepts an httpx one (checked at run time).
        http_client=httpx.AsyncClient(  # type: ignore[arg-type]
            verify=tls,
            follow_redirects=True,
            timeout=httpx.Timeout(connect=15.0, read=5.0, write=5.0, pool=5.0),
        ),
    )


def turn_detection(settings: AgentSettings, proc: JobProcess) -> TurnDetectionMode:
    if settings.turn_detector == "smart-turn":
        return SmartTurnDetector(proc.userdata["smart_turn"], threshold=settings.turn_detector_threshold)
    return "vad"


# A turn's latency from the audio exceeds the framework's by its VAD's lag (0.1-0.25 s); more
# than this and the last sound belongs to an earlier turn (one answered without a prediction).
_VAD_LAG_BOUND = 0.5


def turn_metrics_recorder(
    last_sound: LastSound | None, jitter: JitterBuffer | None = None
) -> Callable[[ConversationItemAddedEvent], None]:
    """Records each turn's stages; the turn latency from the caller's last sound when the turn
    detector heard it (Smart Turn), else from the VAD's end of speech (livekit-agents' e2e), plus
    the time the audio waits in the jitter buffers on its way (morgana.agent.transport)."""

    def record(event: ConversationItemAddedEvent) -> None:
        item = event.item
        if not isinstance(item, ChatMessage):
            return
        report = item.metrics or {}
        if item.role == "user" and "end_of_turn_delay" in report:
            metrics.END_OF_TURN_DELAY.observe(report["end_of_turn_delay"])
        if item.role != "assistant":
            return
        if "tts_node_ttfb" in report:
            metrics.TTS_TIME_TO_FIRST_BYTE.observe(report["tts_node_ttfb"])
        if "e2e_latency" not in report:
            return
        latency = report["e2e_latency"]
        sound_at = last_sound.take() if last_sound is not None else None
        if sound_at is not None and "started_speaking_at" in report:
            from_sound = report["started_speaking_at"] - sound_at
            if latency <= from_sound <= latency + _VAD_LAG_BOUND:
                latency = from_sound
        if jitter is not None:
            latency += jitter.round_trip
        metrics.TURN_LATENCY.observe(latency)

    return record


def load_of(max_calls: int) -> Callable[[AgentServer], float]:
    """LiveKit sends no more jobs to a worker whose load reaches the threshold."""

    def load(server: AgentServer) -> float:
        return min(len(server.active_jobs) / max_calls, 1.0)

    return load


def full_at(max_calls: int) -> float:
    # Strictly between (max-1)/max and 1: full exactly when `max_calls` calls are active.
    return (max_calls - 0.5) / max_calls


# Imported once by the worker's forkserver, so that each new job process inherits them instead
# of loading them itself (0.1-0.6 s of a core each, and more on a busy one): the VAD's model,
# this module, which every job process loads for its entrypoint, and what a call's first
# requests import.
PRELOAD_MODULES = [
    "morgana.agent.preload",
    "morgana.agent.worker",
    "anyio._backends._asyncio",
    "httpcore",
    "openai.resources.audio",
]

# How long a new job process may take to start (livekit-agents: 10 s). On a core the calls keep
# busy, a starting process gets a small share of it and took longer: it was killed, and its
# replacement likewise, so the pool burnt about a sixth of the core starting processes that
# never served a call (4 calls on one core, bench.voice_bench), and the calls' audio fell behind.
PROCESS_INIT_TIMEOUT_SECONDS = 60.0


def build_server(settings: AgentSettings) -> AgentServer:
    server = AgentServer(
        ws_url=settings.livekit_url,
        api_key=settings.livekit_api_key,
        api_secret=settings.livekit_api_secret.get_secret_value() if settings.livekit_api_secret else None,
        setup_fnc=prewarm,
        preload_modules=PRELOAD_MODULES,
        initialize_process_timeout=PROCESS_INIT_TIMEOUT_SECONDS,
        load_fnc=load_of(settings.max_concurrent_calls),
        load_threshold=full_at(settings.max_concurrent_calls),
        drain_timeout=settings.drain_timeout_seconds,
        port=settings.health_port,
        prometheus_port=settings.metrics_port or None,
        # Set by morgana.agent.cli before any metric exists; job processes write there too.
        prometheus_multiproc_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
    )
    server.rtc_session(entrypoint, agent_name=settings.livekit_agent_name)
    if settings.readiness_port:
        Readiness(settings.readiness_port).attach(server)
    if settings.pod_name and settings.pod_namespace:
        PodDeletionCost(settings.pod_name, settings.pod_namespace, debounce=settings.pod_cost_debounce_seconds).attach(
            server
        )
    return server


def session_opener(api: MorganaApi, job_metadata: str, room: str) -> Callable[[], Awaitable[ChatSession]]:
    """How this call gets its API session. A room opened with the API's LiveKit token carries a
    call credential in its dispatch: the call continues the caller's own conversation. Any other
    room (a token minted elsewhere, a SIP call) gets a session of the agent's own account."""
    try:
        credential = json.loads(job_metadata or "{}").get("call")
    except (ValueError, AttributeError):
        credential = None
    if isinstance(credential, str) and credential:
        return lambda: api.join_call(credential, room)
    log.info("room dispatched without a call credential: a session of the agent's own", extra={"room": room})
    return api.create_session


async def open_chat_session(open_session: Callable[[], Awaitable[ChatSession]]) -> ChatSession | None:
    """The call's API session; None if the API is down (tried again at the first turn)."""
    try:
        return await open_session()
    except ApiError as exc:
        metrics.API_ERRORS.labels(kind="session").inc()
        log.warning("could not open the call's chat session yet", extra={"error": str(exc)})
        return None


async def entrypoint(ctx: JobContext) -> None:
    settings = get_settings()
    tls = ctx.proc.userdata["tls"]
    api = MorganaApi(
        settings.morgana_backend_url,
        settings.api_user_email,
        settings.api_user_password.get_secret_value(),
        settings.api_timeout_seconds,
        tls,
    )
    stt_client = speech_client(settings, settings.stt_base_url, tls)
    tts_client = speech_client(settings, settings.tts_base_url, tls)
    for closing in (stt_client.close, tts_client.close):
        ctx.add_shutdown_callback(closing)
    await ctx.connect()
    participant = await ctx.wait_for_participant()
    metrics.ACTIVE_CALLS.inc()
    ctx.add_shutdown_callback(_call_ended)

    open_session = session_opener(api, ctx.job.metadata, ctx.room.name)
    chat = await open_chat_session(open_session)
    morgana_llm = MorganaLLM(
        api,
        open_session,
        chat,
        retries=settings.api_retries,
        backoff=settings.api_retry_backoff_seconds,
        apology=settings.apology,
    )
    # In this order: replies dropped unheard as the call ends are taken back, then the client closes.
    ctx.add_shutdown_callback(morgana_llm.unheard.settle)
    ctx.add_shutdown_callback(api.aclose)
    detection = turn_detection(settings, ctx.proc)
    session: AgentSession[None] = AgentSession(
        # livekit-agents would wrap the non-streaming STT with the turn's VAD; this one's shorter
        # window sends the speech sooner (AgentSettings.stt_vad_min_silence_seconds).
        stt=stt.StreamAdapter(
            stt=openai.STT(model=settings.stt_model, language=settings.stt_language, client=stt_client),
            vad=ctx.proc.userdata["stt_vad"],
        ),
        tts=openai.TTS(
            model=settings.tts_model,
            voice=settings.tts_voice,
            response_format=settings.tts_response_format,
            client=tts_client,
        ),
        vad=ctx.proc.userdata["vad"],
        llm=morgana_llm,
        turn_handling={
            "turn_detection": detection,
            "endpointing": {"min_delay": settings.min_endpointing_delay, "max_delay": settings.max_endpointing_delay},
            "preemptive_generation": {
                "enabled": settings.preemptive_generation,
                "preemptive_tts": settings.preemptive_tts,
            },
        },
    )
    jitter = JitterBuffer()
    following = asyncio.create_task(jitter.follow(ctx.room, participant.identity))

    async def stop_following(*_: object) -> None:
        following.cancel()

    ctx.add_shutdown_callback(stop_following)
    session.on(
        "conversation_item_added",
        turn_metrics_recorder(detection.last_sound if isinstance(detection, SmartTurnDetector) else None, jitter),
    )
    # The caller hung up (or the session failed): free this worker's slot now rather than
    # when LiveKit closes the empty room.
    session.on("close", lambda event: ctx.shutdown(reason=f"session closed: {event.reason}"))
    log.info(
        "call started",
        extra={
            "room": ctx.room.name,
            "participant": participant.identity,
            "session_id": chat.session_id if chat else None,
        },
    )
    await session.start(
        agent=Agent(instructions="Answers come from the Morgana API."),
        room=ctx.room,
        room_options=room_io.RoomOptions(
            participant_identity=participant.identity,
            # What every consumer of the caller's audio runs at (Silero, Smart Turn, Whisper-family
            # speech-to-text): taken at 16 kHz from the room, nothing resamples it again. The
            # framework's 24 kHz suits realtime models; here it cost ~8 % of a call's CPU.
            audio_input=room_io.AudioInputOptions(sample_rate=INPUT_SAMPLE_RATE),
        ),
        record=False,
        # livekit-agents would otherwise publish every session event (transcripts, state changes,
        # errors, debug messages, usage) to everyone in the room, and answer their requests for the
        # agent's instructions and history or for new input: a console protocol, not a caller's.
        session_host=False,
    )


async def _call_ended(*_: object) -> None:
    metrics.ACTIVE_CALLS.dec()
