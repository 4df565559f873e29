"""Settings of the voice agent worker, from the environment and `.env`."""

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from morgana.agent.event_loop import EventLoop
from morgana.core.settings import CoreSettings

# How much longer the VAD's silence window must be than the silence before a prediction, as
# livekit-agents checks it.
_VAD_WINDOW_MARGIN = 0.05


class AgentSettings(CoreSettings):
    # The API, reached over HTTP only, with the service account `morgana-api migrate` creates.
    morgana_backend_url: str = "http://localhost:8000"
    api_user_email: str = "agent@example.com"
    api_user_password: SecretStr = SecretStr("")
    api_timeout_seconds: float = Field(default=30.0, gt=0)
    api_retries: int = Field(default=2, ge=0, description="Retries of a failed turn before apologising.")
    api_retry_backoff_seconds: float = Field(default=0.5, ge=0)
    apology: str = "Sorry, I'm having trouble thinking right now. Please say that again in a moment."

    livekit_url: str = "ws://localhost:7880"
    livekit_api_key: str | None = None
    livekit_api_secret: SecretStr | None = None
    livekit_agent_name: str = "morgana-agent"

    # Speech through any OpenAI-compatible server (OPENAI_BASE_URL unless set per direction).
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    stt_base_url: str | None = None
    stt_model: str = "gpt-4o-mini-transcribe"
    stt_language: str = "en"
    tts_base_url: str | None = None
    tts_model: str = "gpt-4o-mini-tts"
    tts_voice: str = "ash"
    tts_response_format: str = Field(default="pcm", pattern="^(pcm|wav|mp3|opus|aac|flac)$")

    # Capacity: LiveKit marks the worker full at this many concurrent calls.
    max_concurrent_calls: int = Field(default=4, ge=1)
    # Below the chart's terminationGracePeriodSeconds (600), so a call can finish on SIGTERM.
    drain_timeout_seconds: int = Field(default=540, ge=0)
    health_port: int = Field(default=8081, ge=0, le=65535)
    # GET /ready: 200 only once registered with LiveKit (morgana.agent.readiness); 0 turns it off.
    readiness_port: int = Field(default=8082, ge=0, le=65535)
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    # Job processes write their metrics here; the worker's /metrics sums them.
    prometheus_multiproc_dir: str | None = None
    # End of turn. The VAD's silence window ends each stretch of speech (and sends it to
    # speech-to-text); the turn then ends MIN_ENDPOINTING_DELAY after the caller's last speech.
    # With TURN_DETECTOR=smart-turn (morgana.agent.turn) a turn that sounds unfinished waits up to
    # MAX_ENDPOINTING_DELAY for the caller to go on, which makes short windows safe. With
    # TURN_DETECTOR=vad silence alone decides: raise both to about 0.55 and 0.5 s. Both windows
    # are counted by silero, which starts counting 0.1-0.2 s after the sound stops: 0.15 s of VAD
    # silence is about 0.3 s of real quiet.
    turn_detector: Literal["smart-turn", "vad"] = "smart-turn"
    turn_detector_threshold: float = Field(default=0.5, gt=0, lt=1)
    # Smart Turn hears the caller after this much silence (livekit-agents' own models: 0.2 s; see
    # morgana.agent.turn.predict_after_silence). Each pause this long costs one prediction.
    smart_turn_after_silence_seconds: float = Field(default=0.1, ge=0.05, le=1.0)
    vad_min_silence_seconds: float = Field(default=0.15, gt=0)
    # The speech is sent to speech-to-text after this much VAD silence, on a VAD stream of its own
    # (livekit-agents runs one for a non-streaming STT anyway): shorter than the turn's window, the
    # transcript, and the reply started on it (preemptive generation), arrive before the turn ends.
    # A pause this long splits the speech into two requests; the turn still ends on the window above.
    stt_vad_min_silence_seconds: float = Field(default=0.05, gt=0)
    # Where Silero runs: livekit-agents' native build, inline on the call's loop (a sixth of the
    # CPU), or livekit-plugins-silero on onnxruntime (smoothed probabilities; morgana.agent.vad).
    vad_runtime: Literal["native", "onnx"] = "native"
    # The event loop of the worker and of every call's process (morgana.agent.event_loop).
    event_loop: EventLoop = "uvloop"
    # Below this speech probability the VAD counts silence (silero's default: 0.35).
    vad_deactivation_threshold: float | None = Field(default=None, gt=0, lt=1)
    min_endpointing_delay: float = Field(default=0.2, ge=0)
    max_endpointing_delay: float = Field(default=3.0, ge=0)
    # Ask the API for a reply on the final transcript, before the turn is committed (livekit-agents'
    # default too). A reply dropped because the caller went on is taken back from the history
    # (morgana.agent.llm.UnheardTurns).
    preemptive_generation: bool = True
    # Also synthesise that reply's speech before the turn is committed (livekit-agents' default:
    # false, speech starts once it is). Dropped replies then cost their text-to-speech too.
    preemptive_tts: bool = False

    # This worker's pod (the chart sets both through the downward API). With both set, the pod's
    # controller.kubernetes.io/pod-deletion-cost follows the active calls (morgana.agent.pod_cost),
    # so a scale-down removes idle workers first; unset (local runs), that is off.
    pod_name: str | None = None
    pod_namespace: str | None = None
    # A change of the call count waits this long before it is written: a burst is one PATCH.
    pod_cost_debounce_seconds: float = Field(default=0.2, ge=0)

    @model_validator(mode="after")
    def _smart_turn_hears_enough_silence(self) -> "AgentSettings":
        # livekit-agents refuses a VAD window that ends before the prediction is asked for, at
        # the first call; said here, at start-up, instead.
        least = round(self.smart_turn_after_silence_seconds + _VAD_WINDOW_MARGIN, 3)
        if self.turn_detector == "smart-turn" and self.vad_min_silence_seconds < least:
            raise ValueError(
                f"VAD_MIN_SILENCE_SECONDS must be at least {least} with smart-turn "
                "(SMART_TURN_AFTER_SILENCE_SECONDS + 0.05)"
            )
        return self

    @property
    def speech_api_key(self) -> str:
        return self.openai_api_key.get_secret_value() if self.openai_api_key else "not-needed"


@lru_cache
def get_settings() -> AgentSettings:
    return AgentSettings()
