"""The chat agent on the real LangGraph graph and ChatOpenAI, against the local model server."""

import asyncio
import gc

from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from morgana.api.config import ApiSettings
from morgana.api.services.chat import ChatAgent
from morgana.api.services.utterance import Utterance
from morgana_devtools.openai_server import FakeOpenAIProcess
from tests.conftest import OPENAI_KEY


def test_an_open_stream_does_not_hold_the_chunks_it_has_passed_on(fake_openai: FakeOpenAIProcess) -> None:
    """What an open stream holds must not grow with its reply (LangChain's `astream` keeps every
    chunk until the end: about 2.3 KiB per token, for as long as the stream is open)."""
    fake_openai.set_scenario(tokens=60, delay_ms=20)  # paced: one token per read, none merged
    settings = ApiSettings(openai_api_key=OPENAI_KEY, openai_base_url=fake_openai.base_url, jwt_secret_key="x" * 40)

    async def run() -> tuple[int | None, str]:
        agent = ChatAgent(settings)
        pieces: list[str] = []
        held = None
        try:
            async for piece in agent.stream([Utterance("user", "hi")]):
                pieces.append(piece)
                if held is None and len("".join(pieces).split()) >= 50:
                    gc.collect()
                    held = sum(isinstance(o, (ChatGenerationChunk, AIMessageChunk)) for o in gc.get_objects())
        finally:
            await agent.aclose()
        return held, "".join(pieces)

    held, text = asyncio.run(run())
    assert len(text.split()) == 60
    assert held is not None and held < 10, f"{held} chunks held 50 tokens into the reply"
