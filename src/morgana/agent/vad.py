"""The caller's voice activity: two Silero VAD streams per call, one for the turn and one that
sends speech to speech-to-text sooner (AgentSettings.stt_vad_min_silence_seconds).

Both run Silero every 32 ms of audio, so they were a large part of what a call costs. By default
they use the Silero that livekit-agents itself ships (`livekit.agents.inference.VAD`, native
code from `livekit-local-inference`, loaded once in the worker's forkserver): the same model,
probabilities within 1e-6 of the onnxruntime one, at a sixth of the CPU per window (0.035 ms
against 0.23). At that cost a window is cheaper to run on the call's event loop than to hand to a
thread and back, so it runs inline: one VAD stream then costs 0.8 % of a core instead of 2.2 %.

VAD_RUNTIME=onnx keeps livekit-plugins-silero on onnxruntime, which also smooths the
probabilities (0.35 of the last value carried into each new one). Its speech and silences are
heard about one window (32 ms) later, and it bridges short dips: on espeak-ng's "Book me a
flight to, um," the native VAD heard 0.15 s of silence after "to", the smoothed one did not. A
turn does not end there either way: Smart Turn hears the phrase as unfinished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Literal, ParamSpec, TypeVar

from livekit.agents import inference
from livekit.agents.types import NOT_GIVEN
from livekit.agents.vad import VAD
from livekit.plugins import silero

VadRuntime = Literal["native", "onnx"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class InlineExecutor(Executor):
    """Runs each task at once, in the thread that submits it: for work shorter than a thread hop."""

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        done: Future[_T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the awaiting task, as a pool would
            done.set_exception(exc)
        return done


@dataclasses.dataclass(frozen=True)
class CallVads:
    """The turn's VAD and speech-to-text's, with their silence windows (seconds)."""

    turn: VAD
    stt: VAD


def load_vads(
    runtime: VadRuntime, turn_silence: float, stt_silence: float, deactivation_threshold: float | None = None
) -> CallVads:
    """Once per process (prewarm): both VADs, on one model."""
    threshold = deactivation_threshold or NOT_GIVEN
    if runtime == "native":
        inline = InlineExecutor()  # stateless: one for every stream of the process
        return CallVads(
            turn=inference.VAD(min_silence_duration=turn_silence, deactivation_threshold=threshold, executor=inline),
            stt=inference.VAD(min_silence_duration=stt_silence, deactivation_threshold=threshold, executor=inline),
        )
    turn = silero.VAD.load(min_silence_duration=turn_silence, deactivation_threshold=threshold)
    return CallVads(turn=turn, stt=with_silence_window(turn, stt_silence))


def with_silence_window(vad: VAD, seconds: float) -> silero.VAD:
    """The same onnxruntime silero VAD with another silence window, on the same ONNX session (each
    session loads the model again: 9 MiB a process)."""
    assert isinstance(vad, silero.VAD)  # silero.VAD.load is typed as returning the base class
    return silero.VAD(session=vad._onnx_session, opts=dataclasses.replace(vad._opts, min_silence_duration=seconds))
