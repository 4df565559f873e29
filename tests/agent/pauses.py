"""A caller who pauses mid-sentence, on real (espeak-ng) speech."""

import asyncio
from collections.abc import Awaitable, Callable

from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import eventually_async
from morgana_devtools.voice_client import Caller, speech_pcm
from tests.conftest import OPENAI_KEY

# espeak-ng's flat prosody makes most fragments sound finished to the model (it hears intonation,
# not words); a trailing hesitation ("um,") is what it hears as unfinished, as a person's would be.
UNFINISHED = "Book me a flight to, um,"
FINISHED = "What time is it?"
REST = "Paris next Monday."


def pause_mid_sentence(
    join: Callable[[], Awaitable[Caller]], fake_openai: FakeOpenAIProcess
) -> tuple[Caller, float, float]:
    """A caller joins, says UNFINISHED, pauses a second, says REST; with when each part ended."""
    first = speech_pcm(fake_openai.root_url, OPENAI_KEY, UNFINISHED)
    rest = speech_pcm(fake_openai.root_url, OPENAI_KEY, REST)

    async def talk() -> tuple[Caller, float, float]:
        caller = await join()
        try:
            await eventually_async(lambda: len(caller.room.remote_participants) > 0, 30, what="an agent joined")
            await caller.silence(1.0)
            paused_at = await caller.say(first, trailing_silence_s=1.0)
            ended_at = await caller.say(rest, trailing_silence_s=0.5)
            await eventually_async(lambda: caller.first_audio_after(ended_at) is not None, 30, what="a reply heard")
            await eventually_async(caller.agent_texts, 15, what="the reply's transcript")
            await caller.silence(2.0)
        finally:
            await caller.leave()
        return caller, paused_at, ended_at

    return asyncio.run(talk())
