"""Imported once by the worker's forkserver (morgana.agent.worker.PRELOAD_MODULES), so that every
call's process inherits it: the native Silero VAD model (morgana.agent.vad).

livekit-agents' own preload would load it too, with its end-of-turn model: 244 MB that Morgana,
whose turn detector is Smart Turn, never uses. morgana.agent.cli turns that preload off.
"""

from livekit.local_inference import init_vad

init_vad()
