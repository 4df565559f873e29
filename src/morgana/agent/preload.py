"""Imported once by the worker's forkserver (morgana.agent.worker.PRELOAD_MODULES), so that every
call's process inherits it: the native Silero VAD model (morgana.agent.vad), and the event loop
policy (morgana.agent.event_loop).

livekit-agents' own preload would load it too, with its end-of-turn model: 244 MB that Morgana,
whose turn detector is Smart Turn, never uses. morgana.agent.cli turns that preload off.
"""

import logging

from livekit.local_inference import init_vad

from morgana.agent.config import get_settings
from morgana.agent.event_loop import use_event_loop

use_event_loop(get_settings().event_loop)

try:
    init_vad()
except Exception:  # a failure here would stop the forkserver; each call's process reports it instead
    logging.getLogger("morgana.agent").debug("could not preload the native VAD model", exc_info=True)
