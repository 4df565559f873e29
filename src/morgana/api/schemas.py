"""Request and response bodies: the JSON contract of the spec, with OpenAPI examples."""

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, EmailStr, Field, field_validator
from pydantic.config import JsonDict

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 128
_TOKEN_EXAMPLE: JsonDict = {
    "access_token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9...",
    "token_type": "bearer",
    "expires_at": "2025-09-27T15:00:00Z",
}


def clean_text(text: str) -> str:
    """Refuse what Postgres cannot store and UTF-8 cannot carry: NUL characters and unpaired
    surrogates. Accepted, they failed later as a 500 or a 503 (after the model was paid for)."""
    if "\x00" in text:
        raise ValueError("must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (an unpaired surrogate was sent)") from None
    return text


# Every text a client sends: request bodies and form fields.
CleanText = Annotated[str, AfterValidator(clean_text)]


def password_problems(password: str) -> list[str]:
    """What a password lacks to be accepted; empty when it is strong enough."""
    problems = []
    if len(password) < MIN_PASSWORD_LENGTH:
        problems.append(f"at least {MIN_PASSWORD_LENGTH} characters")
    if not any(c.islower() for c in password):
        problems.append("a lowercase letter")
    if not any(c.isupper() for c in password):
        problems.append("an uppercase letter")
    if not any(c.isdigit() for c in password):
        problems.append("a digit")
    if all(c.isalnum() for c in password):
        problems.append("a symbol")
    return problems


class ErrorResponse(BaseModel):
    detail: str = Field(examples=["Incorrect email or password"])


class TokenResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_TOKEN_EXAMPLE]})

    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: datetime


class RegisterRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"email": "user@example.com", "password": "A_Strong_Password123!"}]}
    )

    email: EmailStr
    password: CleanText = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)

    @field_validator("email")
    @classmethod
    def _lowercase(cls, email: str) -> str:
        return email.lower()

    @field_validator("password")
    @classmethod
    def _strong(cls, password: str) -> str:
        problems = password_problems(password)
        if problems:
            raise ValueError("password needs " + ", ".join(problems))
        return password


class PasswordChange(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"current_password": "A_Strong_Password123!", "new_password": "An_Even_Stronger_Passw0rd!"}]
        }
    )

    current_password: CleanText = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)
    new_password: CleanText = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)

    @field_validator("new_password")
    @classmethod
    def _strong(cls, password: str) -> str:
        if problems := password_problems(password):
            raise ValueError("password needs " + ", ".join(problems))
        return password


class UserResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": 1, "email": "user@example.com", "token": _TOKEN_EXAMPLE}]}
    )

    id: int
    email: str
    token: TokenResponse


class SessionResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "a1b2c3d4-e5f6-7890-1234-567890abcdef",
                    "name": "Friendly-Chat-123",
                    "token": _TOKEN_EXAMPLE,
                }
            ]
        }
    )

    session_id: uuid.UUID
    name: str
    token: TokenResponse


class SessionInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "a1b2c3d4-e5f6-7890-1234-567890abcdef",
                    "name": "Friendly-Chat-123",
                    "created_at": "2025-09-27T14:00:00Z",
                }
            ]
        }
    )

    session_id: uuid.UUID
    name: str
    created_at: datetime


class SessionRename(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "Trip planning"}]})

    name: CleanText = Field(min_length=1, max_length=100)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, name: str) -> str:
        name = name.strip()
        if not name:
            raise ValueError("name must not be blank")
        return name


class Message(BaseModel):
    """One chat message, as stored and as answered: the user's, or the assistant's (the model's)."""

    role: Literal["user", "assistant"]
    content: str = Field(min_length=1)


class UserMessage(Message):
    """A message a client sends. Only its user's words: the assistant's turns come from the model
    (and the stored history), so that no client can put words in the model's mouth."""

    role: Literal["user"]
    content: CleanText = Field(min_length=1)

    @field_validator("role", mode="before")
    @classmethod
    def _user_only(cls, role: object) -> object:
        if role != "user":
            raise ValueError("clients send user messages only: the assistant's turns come from the model")
        return role

    @field_validator("content")
    @classmethod
    def _not_blank(cls, content: str) -> str:
        if not content.strip():
            raise ValueError("content must not be blank")
        return content


class ChatRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"messages": [{"role": "user", "content": "Hello, who are you?"}]}]}
    )

    messages: list[UserMessage] = Field(min_length=1)
    turn_id: uuid.UUID | None = Field(
        default=None,
        description=(
            "Your id for this turn (a UUID you make). A turn with an id is stored at most once, and "
            "`DELETE /api/v1/chatbot/turns/{turn_id}` takes it back, even while its reply is running."
        ),
    )
    on_disconnect: Literal["continue", "cancel"] | None = Field(
        default=None,
        description=(
            "Streams only: when the client goes away mid-reply, `continue` the reply (it is stored, "
            "and the stream can be picked up with Last-Event-ID) or `cancel` it (not stored; saves "
            "the model's cost). Default: the server's CHAT_STREAM_ON_DISCONNECT (`continue`)."
        ),
    )


class ChatResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"messages": [{"role": "assistant", "content": "I'm Morgana, how can I help?"}]}]
        }
    )

    messages: list[Message]


class StoredMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str
    created_at: datetime
    channel: Literal["chat", "voice"] = Field(
        default="chat", description="How it was said: typed (chat) or spoken in a LiveKit call (voice)."
    )
    turn_id: uuid.UUID | None = Field(default=None, description="The turn's id, when its client gave one.")


class HistoryResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "messages": [
                        {"role": "user", "content": "Hello", "created_at": "2025-09-27T14:00:00Z", "channel": "chat"},
                        {
                            "role": "assistant",
                            "content": "Hi! How can I help?",
                            "created_at": "2025-09-27T14:00:01Z",
                            "channel": "chat",
                        },
                        {
                            "role": "user",
                            "content": "And tomorrow?",
                            "created_at": "2025-09-27T14:02:00Z",
                            "channel": "voice",
                        },
                    ]
                }
            ]
        }
    )

    messages: list[StoredMessage]


class DeletedResponse(BaseModel):
    deleted: int = Field(description="How many messages were removed.", examples=[4])


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, for programs: llm_timeout, llm_unavailable, history_unavailable, ...")
    message: str = Field(description="For people.")


class GoneResponse(BaseModel):
    detail: str
    history: str = Field(description="Where the turn is if it was completed: the session's history.")


class StreamEvent(BaseModel):
    """The JSON carried by each Server-Sent Event of the chat stream."""

    content: str
    done: bool
    error: ErrorDetail | None = Field(default=None, description="Only on a failed stream's last event.")


class LiveKitTokenResponse(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {
                    "serverUrl": "wss://your-livekit-server-url.com",
                    "participantToken": "livekit_participant_jwt_token",
                    "roomName": "morgana-a1b2c3d4-e5f6-7890-1234-567890abcdef",
                    "participantIdentity": "user-1",
                }
            ]
        },
    )

    server_url: str = Field(alias="serverUrl")
    participant_token: str = Field(alias="participantToken")
    room_name: str = Field(alias="roomName")
    participant_identity: str = Field(alias="participantIdentity")


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"status": "ready", "components": {"postgres": "ok", "redis": "ok"}}]}
    )

    status: Literal["ready", "unavailable"]
    components: dict[str, str]


class CallSessionRequest(BaseModel):
    """What the voice agent got with its job: the call credential, and the room it was sent to."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"credential": "eyJhbGciOiJIUzI1NiIs…", "room": "morgana-a1b2c3d4-e5f6-7890-1234-567890abcdef"}
            ]
        }
    )

    credential: str = Field(min_length=1, max_length=4096, description="`call` from the job's dispatch metadata.")
    room: str = Field(min_length=1, max_length=256, description="The LiveKit room the agent joined.")
