"""The OpenAI client behind the chat agent's langchain-openai model.

Two costs of the SDK's own chat-completions client grow with every request and every token,
for work this API does not need:

- `create` runs the request through the SDK's type-driven transform, which walks every message
  of the conversation: about 0.2 ms of CPU per message, 40 ms for a 200-message history, before
  the request is even sent. The payload here is plain JSON built by langchain-openai from text
  messages (no files, dates or aliased keys, which are what the transform is for), so it is sent
  as it is.
- Each streamed chunk is parsed into pydantic objects, which langchain-openai at once turns back
  into dicts (`model_dump`): about a quarter of the API's CPU per token when tokens arrive one
  read at a time. The stream yields the decoded JSON instead, which langchain-openai takes as it
  is. `MergingHttpClient` (model_stream) merges the text deltas that arrive together first.

Everything else is the SDK's: retries, timeouts, errors, streaming, authentication.

`HistoryChatOpenAI` is langchain-openai's ChatOpenAI with one cost taken out of each request:
converting a past reply (an AIMessage) to the request's dict scans its text one character at a
time (looking for audio blocks, which only list content has): 1.2 ms for 19 replies of 200
tokens, before the request is sent. Long plain replies are converted as the same dict by
langchain's own code for a ChatMessage with the assistant's role: 0.13 ms.
"""

from typing import Any

import openai
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage
from langchain_openai import ChatOpenAI
from openai._base_client import make_request_options
from openai.resources.chat.completions import AsyncCompletions
from openai.types.chat import ChatCompletion

from morgana.api.config import ApiSettings
from morgana.api.services.model_stream import MergingHttpClient


class PlainCompletions(AsyncCompletions):
    """`chat.completions` whose `create` sends langchain-openai's payload without the transform."""

    async def create(  # type: ignore[override]  # the SDK's keyword-only signature, taken as **params
        self,
        *,
        extra_headers: Any = None,
        extra_query: Any = None,
        extra_body: Any = None,
        timeout: Any = openai.NOT_GIVEN,
        **params: Any,
    ) -> ChatCompletion | openai.AsyncStream[object]:
        stream = bool(params.get("stream"))
        return await self._post(
            "/chat/completions",
            body=params,
            options=make_request_options(
                extra_headers=extra_headers,
                extra_query=extra_query,
                extra_body=extra_body,
                timeout=timeout,
                security={"bearer_auth": True},
            ),
            cast_to=ChatCompletion,
            stream=stream,
            # `object`: each chunk as the decoded JSON (a dict), not built into a pydantic model.
            stream_cls=openai.AsyncStream[object],
        )


def chat_completions(settings: ApiSettings) -> tuple[openai.AsyncOpenAI, PlainCompletions]:
    """The client (close it on shutdown) and its chat completions, for ChatOpenAI's
    `root_async_client` and `async_client`."""
    client = openai.AsyncOpenAI(
        api_key=settings.openai_api_key.get_secret_value() if settings.openai_api_key else None,
        base_url=settings.openai_base_url,
        timeout=settings.llm_timeout_seconds,
        max_retries=settings.llm_max_retries,
        http_client=MergingHttpClient(),
    )
    return client, PlainCompletions(client)


# Below this many characters, a reply's scan costs less than building a ChatMessage (3 us).
_SCANNED_REPLY_CHARS = 100


def _plain_reply_as_chat_message(message: BaseMessage) -> BaseMessage:
    """A long plain-text AIMessage (no name, tool calls or extras) as the ChatMessage that
    langchain-openai converts to the same `{"content", "role": "assistant"}` dict."""
    if (
        type(message) is AIMessage
        and isinstance(message.content, str)
        and len(message.content) > _SCANNED_REPLY_CHARS
        and not (message.name or message.tool_calls or message.invalid_tool_calls or message.additional_kwargs)
    ):
        return ChatMessage(content=message.content, role="assistant")
    return message


class HistoryChatOpenAI(ChatOpenAI):
    """ChatOpenAI whose request payload is built without scanning past replies character by
    character (see the module docstring); the payload is the same."""

    def _get_request_payload(
        self, input_: LanguageModelInput, *, stop: list[str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        messages = [_plain_reply_as_chat_message(m) for m in self._convert_input(input_).to_messages()]
        return super()._get_request_payload(messages, stop=stop, **kwargs)
