"""API settings: every variable the API reads, validated once at start-up."""

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, computed_field, field_validator, model_validator
from pydantic_settings import NoDecode
from sqlalchemy.engine import URL, make_url

from morgana.core.settings import CoreSettings

# Values copied from examples or docs that must never guard a real deployment.
PLACEHOLDER_SECRETS = {
    "",
    "secret",
    "changeme",
    "change-me",
    "changethis",
    "change-this",
    "your-secret-key",
    "your_secret_key",
    "supersecret",
    "jwt-secret",
    "replace-me",
}
MIN_SECRET_LENGTH = 32
# The voice agent's password is a machine-generated secret (`openssl rand -hex 16`): what
# guards it is length and randomness, not the character classes asked of people's passwords.
MIN_SERVICE_PASSWORD_LENGTH = 16


def service_password_problem(password: str) -> str | None:
    """Why API_USER_PASSWORD cannot guard the agent's account, or None when it can."""
    if password.lower() in PLACEHOLDER_SECRETS or len(password) < MIN_SERVICE_PASSWORD_LENGTH:
        return (
            f"API_USER_PASSWORD is a placeholder or shorter than {MIN_SERVICE_PASSWORD_LENGTH} "
            "characters (generate one with: openssl rand -hex 16)"
        )
    return None


class ConfigurationError(ValueError):
    """Raised at start-up for missing or unsafe configuration."""


class ApiSettings(CoreSettings):
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=1, le=65535)
    # /metrics on a port of its own (the chart's 9101), out of an Ingress's reach; 0: on PORT.
    # Not METRICS_PORT: the agent's setting, which a shared .env would make both bind.
    api_metrics_port: int = Field(default=0, ge=0, le=65535)
    # The interactive docs (/docs, /redoc, /openapi.json); the chart turns them off by default.
    docs_enabled: bool = True
    # Traces of requests, queries and model calls go over OTLP/HTTP when an endpoint is set
    # (standard OTel variable names).
    otel_exporter_otlp_endpoint: str | None = None
    otel_service_name: str = "morgana-api"
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # The playground (morgana.api.playground): a browser client of this API at /playground, for
    # trying it out and as a reference frontend. Off by default; `make run` turns it on.
    playground_enabled: bool = False

    # Postgres: DATABASE_URL wins; otherwise the POSTGRES_* parts.
    database_url: str | None = None
    postgres_host: str = "localhost"
    postgres_port: int = 5432
    postgres_user: str = "morgana"
    postgres_password: SecretStr = SecretStr("")
    postgres_db: str = "morgana"
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # How long a request waits for a pooled connection before it is a 503 ("busy"). A burst (500
    # chat streams opened at once on one worker) queues for longer than a few seconds, and serving it
    # late beats refusing it; clients and proxies wait longer than this.
    db_pool_timeout_seconds: float = Field(default=30.0, gt=0)
    # A pooled connection unused for this long is tested with a round trip before it is used (0:
    # every time). One that sat through a database restart was unused for as long as it took.
    db_ping_after_idle_seconds: float = Field(default=0.25, ge=0)

    # Redis backs rate limits shared by every replica; unset means an in-process store.
    redis_url: str | None = None
    # Connections per process; more requests at once wait for one, up to the pool timeout, before
    # they are a 503. As for the database: a burst is served late rather than refused (a dead
    # Redis is found by the 2 s socket timeouts, not by this wait).
    redis_max_connections: int = Field(default=32, ge=1)
    redis_pool_timeout_seconds: float = Field(default=30.0, gt=0)

    jwt_secret_key: SecretStr = SecretStr("")
    jwt_algorithm: str = Field(default="HS256", pattern="^HS(256|384|512)$")
    user_token_expire_minutes: int = Field(default=7 * 24 * 60, ge=1)
    session_token_expire_minutes: int = Field(default=24 * 60, ge=1)

    # Any OpenAI-compatible server works: OPENAI_BASE_URL is the SDK's own variable.
    openai_api_key: SecretStr | None = None
    openai_base_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_temperature: float = Field(default=0.7, ge=0, le=2)
    llm_max_tokens: int | None = Field(default=None, ge=1)
    llm_timeout_seconds: float = Field(default=60.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0)
    # A typed turn's reply: text that arrives within this long of the last event sent goes out in
    # one event (the first event is never held). Spoken turns (a call's, the agent's own
    # sessions') are not held: speech waits for each sentence. 0: each piece as it comes.
    chat_stream_coalesce_seconds: float = Field(default=0.03, ge=0, le=1)
    # A chat stream with no text for this long gets an SSE comment (`: ping`), so that proxies
    # with idle timeouts keep the connection while the model thinks.
    chat_stream_keepalive_seconds: float = Field(default=15.0, gt=0)
    # How long a chat stream's events are kept after its last one, for a client that lost its
    # connection to pick the stream up (Last-Event-ID): in Redis when REDIS_URL is set, else in
    # this process. 0: not kept, and events carry no ids.
    chat_stream_resume_seconds: float = Field(default=600.0, ge=0)
    # At most this many events kept per stream (a typed reply is tens of events).
    chat_stream_resume_max_events: int = Field(default=10_000, ge=1)
    # What a stream's model call does when its client goes away, unless the request says
    # (`on_disconnect`): `continue`, so the reply is stored and can be picked up, or `cancel`.
    chat_stream_on_disconnect: Literal["continue", "cancel"] = "continue"
    system_prompt: str = (
        "You are Morgana, a helpful voice and chat assistant. Answer clearly and concisely; "
        "your replies may be read aloud, so avoid markdown and long lists."
    )

    livekit_url: str = "ws://localhost:7880"
    livekit_public_url: str | None = Field(default=None, description="URL handed to clients; defaults to LIVEKIT_URL.")
    livekit_api_key: str | None = None
    livekit_api_secret: SecretStr | None = None
    livekit_agent_name: str = "morgana-agent"
    # A token only has to be valid when its holder joins: kept short, so that one handed out
    # before its session was deleted (or its user logged out) is soon useless.
    livekit_token_ttl_minutes: int = Field(default=10, ge=1, le=15)
    # How long a call may continue its session: its agent's credential (in the token's dispatch)
    # and the session token it trades that for expire this long after the LiveKit token is issued.
    livekit_call_max_minutes: int = Field(default=240, ge=1)
    # A caller alone in their room for the grace period gets the agent sent again (LiveKit does not
    # queue a dispatch that found no worker), checked this often; 0 turns it off (the chart does when
    # its controller redispatches). A caller still alone after the notice is told on `morgana.status`.
    livekit_redispatch_seconds: float = Field(default=2.0, ge=0)
    # As long as the controller's: a job still starting on a loaded worker (a new process, the
    # models loading) can take several seconds to join, and must not get a twin meanwhile.
    livekit_redispatch_grace_seconds: float = Field(default=10.0, ge=0)
    # A room the agent was sent to is sent it again no sooner than this (doubling each time), so
    # that a job still starting never gets a twin.
    livekit_redispatch_retry_seconds: float = Field(default=10.0, gt=0)
    livekit_no_agent_notice_seconds: float = Field(default=20.0, ge=0)
    # Voice rooms (calls, each with an agent) one user may hold at once.
    livekit_max_rooms_per_user: int = Field(default=2, ge=1)

    # The voice agent's service account, created or updated by `morgana-api migrate`.
    api_user_email: str | None = None
    api_user_password: SecretStr | None = None

    rate_limit_enabled: bool = True
    rate_limit_register: str = "10/hour"
    rate_limit_login: str = "20/minute"
    # Failed logins per account (any email, registered or not, so a lockout reveals nothing).
    rate_limit_login_account: str = "10/15 minutes"
    rate_limit_session: str = "60/minute"
    rate_limit_chat: str = "60/minute"
    rate_limit_messages: str = "120/minute"
    rate_limit_livekit: str = "30/minute"

    # argon2 checks at once per process (about 64 MiB each), and how many more may wait.
    password_hash_concurrency: int = Field(default=2, ge=1)
    password_hash_queue: int = Field(default=16, ge=0)

    max_message_chars: int = Field(default=8000, ge=1)
    max_messages_per_request: int = Field(default=50, ge=1)
    max_history_messages: int = Field(
        default=200, ge=1, description="Most recent stored messages (not turns) sent to the model as context."
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator(
        "rate_limit_register",
        "rate_limit_login",
        "rate_limit_login_account",
        "rate_limit_session",
        "rate_limit_chat",
        "rate_limit_messages",
        "rate_limit_livekit",
    )
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '60/minute': {value!r}") from exc
        return value

    @field_validator("openai_base_url", "livekit_public_url", "redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _refuse_unsafe_outside_development(self) -> "ApiSettings":
        problems = self.unsafe_settings()
        if problems and not self.is_development:
            raise ConfigurationError(
                "refusing to start with unsafe configuration "
                f"(ENVIRONMENT={self.environment.value}): " + "; ".join(problems)
            )
        return self

    def unsafe_settings(self) -> list[str]:
        problems = []
        secret = self.jwt_secret_key.get_secret_value()
        if not secret:
            problems.append("JWT_SECRET_KEY is not set")
        elif secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH:
            problems.append(
                f"JWT_SECRET_KEY is a placeholder or shorter than {MIN_SECRET_LENGTH} characters "
                "(generate one with: openssl rand -hex 32)"
            )
        if self.openai_api_key is None or not self.openai_api_key.get_secret_value():
            problems.append("OPENAI_API_KEY is not set (for a keyless OpenAI-compatible server, any value)")
        if self.livekit_api_secret is not None:
            lk_secret = self.livekit_api_secret.get_secret_value()
            if lk_secret.lower() in PLACEHOLDER_SECRETS or len(lk_secret) < MIN_SECRET_LENGTH:
                problems.append(f"LIVEKIT_API_SECRET is a placeholder or shorter than {MIN_SECRET_LENGTH} characters")
        if self.api_user_email and not self.api_user_password:
            problems.append("API_USER_EMAIL is set without API_USER_PASSWORD")
        elif (
            self.api_user_email
            and self.api_user_password
            and (problem := service_password_problem(self.api_user_password.get_secret_value()))
        ):
            problems.append(problem)
        return problems

    @computed_field  # type: ignore[prop-decorator]  # mypy allows no decorator over @property (pydantic's advice)
    @property
    def sqlalchemy_url(self) -> str:
        """The async SQLAlchemy URL (psycopg 3 driver) for the configured database."""
        if self.database_url:
            url = make_url(self.database_url)
            return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return URL.create(
            "postgresql+psycopg",
            username=self.postgres_user,
            password=self.postgres_password.get_secret_value() or None,
            host=self.postgres_host,
            port=self.postgres_port,
            database=self.postgres_db,
        ).render_as_string(hide_password=False)

    @property
    def livekit_configured(self) -> bool:
        return bool(self.livekit_api_key and self.livekit_api_secret)

    @property
    def livekit_client_url(self) -> str:
        return self.livekit_public_url or self.livekit_url


@lru_cache
def get_settings() -> ApiSettings:
    return ApiSettings()
