"""What the chat services pass around: who said what, with nothing of the HTTP schema."""

from typing import Literal, NamedTuple

Role = Literal["user", "assistant"]


class Utterance(NamedTuple):
    """One message of a conversation: the user's words or the assistant's reply."""

    role: Role
    content: str
