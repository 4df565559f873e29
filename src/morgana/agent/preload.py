"""Imported once by the worker's forkserver (morgana.agent.worker.PRELOAD_MODULES), so that every
call's process inherits it: the native Silero VAD model (morgana.agent.vad).

livekit-agents' own preload would load it too, with its end-of-turn model: 244 MB that Morgana,
whose turn detector is Smart Turn, never uses. morgana.agent.cli turns that preload off.
"""

import logging

from livekit.local_inference import init_vad

try:
    init_vad()
except Exception:  # a failure here would stop the forkserver; each call's process reports it instead
    logging.getLogger("morgana.agent").debug("could not preload the native VAD model", exc_info=True)
