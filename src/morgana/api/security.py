"""Password hashing (argon2 through the passlib API) and the two kinds of JWT."""

import functools
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeVar, TypeVarTuple, cast

import anyio
from jose import JWTError, jwt
from passlib.context import CryptContext

from morgana.api.config import ApiSettings

_passwords = CryptContext(schemes=["argon2"], deprecated="auto")
# Verified against when the email is unknown, so both paths cost one argon2 check.
_DUMMY_HASH = _passwords.hash(secrets.token_urlsafe(16))

_T = TypeVar("_T")
_Args = TypeVarTuple("_Args")


# passlib ships no types: its hash() gives a str, its verify() a bool.
def hash_password(password: str) -> str:
    return cast(str, _passwords.hash(password))


def verify_password(password: str, hashed: str | None) -> bool:
    """Check a password; with `hashed=None` spend the same time and return False."""
    if hashed is None:
        _passwords.verify(password, _DUMMY_HASH)
        return False
    return cast(bool, _passwords.verify(password, hashed))


class HasherBusy(Exception):
    """Every password check slot is taken and the queue is full: answer 503, retry shortly."""


class PasswordHasher:
    """argon2 checks off the event loop, bounded per process.

    Each check holds about 64 MiB and a core for tens of milliseconds. Run on the default
    thread pool (40 threads), a flood of logins grew a worker past 1.4 GiB: here at most
    `concurrency` run at once, at most `queue` more wait, and the rest are refused at once
    (HasherBusy) instead of piling up memory and latency.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self._threads = anyio.CapacityLimiter(concurrency)
        self._admitted = 0
        self._capacity = concurrency + queue

    async def hash(self, password: str) -> str:
        return await self._run(hash_password, password)

    async def verify(self, password: str, hashed: str | None) -> bool:
        return await self._run(verify_password, password, hashed)

    async def _run(self, fn: Callable[[*_Args], _T], *args: *_Args) -> _T:
        if self._admitted >= self._capacity:
            raise HasherBusy()
        self._admitted += 1
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._threads)
        finally:
            self._admitted -= 1


class TokenType(StrEnum):
    USER = "user"
    SESSION = "session"
    # A voice call's credential: in the dispatch metadata of the caller's LiveKit token, traded by
    # the voice agent's account (and no one else) for a VOICE session token. Never a bearer token.
    CALL = "call"


class Channel(StrEnum):
    """How a session token's turns are said; a voice token may only add turns (and take back its own)."""

    CHAT = "chat"
    VOICE = "voice"


class InvalidToken(Exception):
    """The bearer token is malformed, expired, forged or of an unknown kind."""


@dataclass(frozen=True)
class IssuedToken:
    access_token: str
    expires_at: datetime


@dataclass(frozen=True)
class TokenClaims:
    type: TokenType
    user_id: int
    session_id: uuid.UUID | None
    version: int  # the user's token_version when it was issued
    expires_at: datetime
    channel: Channel = Channel.CHAT  # session tokens
    room: str | None = None  # call credentials: the LiveKit room they are bound to


def issue_user_token(settings: ApiSettings, user_id: int, version: int) -> IssuedToken:
    return _issue(
        settings,
        {"sub": str(user_id), "typ": TokenType.USER.value, "ver": version},
        timedelta(minutes=settings.user_token_expire_minutes),
    )


def issue_session_token(settings: ApiSettings, user_id: int, session_id: uuid.UUID, version: int) -> IssuedToken:
    return _issue(
        settings,
        {"sub": str(session_id), "uid": user_id, "typ": TokenType.SESSION.value, "ver": version},
        timedelta(minutes=settings.session_token_expire_minutes),
    )


def issue_call_credential(
    settings: ApiSettings, user_id: int, session_id: uuid.UUID, version: int, room: str
) -> IssuedToken:
    """The credential a call's agent trades for a token of the caller's session (see TokenType.CALL)."""
    return _issue(
        settings,
        {"sub": str(session_id), "uid": user_id, "typ": TokenType.CALL.value, "ver": version, "room": room},
        timedelta(minutes=settings.livekit_call_max_minutes),
    )


def issue_voice_session_token(settings: ApiSettings, call: TokenClaims) -> IssuedToken:
    """A session token for the call's agent: adds voice turns to the caller's session, nothing
    else, and expires with the call's credential."""
    assert call.type is TokenType.CALL and call.session_id is not None
    claims = {"sub": str(call.session_id), "uid": call.user_id, "typ": TokenType.SESSION.value, "ver": call.version}
    return _issue(settings, {**claims, "ch": Channel.VOICE.value}, expires_at=call.expires_at)


def _issue(
    settings: ApiSettings, claims: dict[str, object], ttl: timedelta | None = None, expires_at: datetime | None = None
) -> IssuedToken:
    now = datetime.now(UTC).replace(microsecond=0)
    if expires_at is None:
        assert ttl is not None
        expires_at = now + ttl
    payload = {**claims, "iat": now, "exp": expires_at, "jti": secrets.token_hex(8)}
    token = jwt.encode(payload, settings.jwt_secret_key.get_secret_value(), algorithm=settings.jwt_algorithm)
    return IssuedToken(access_token=token, expires_at=expires_at)


def decode_token(settings: ApiSettings, token: str) -> TokenClaims:
    claims = _verified(settings.jwt_secret_key.get_secret_value(), settings.jwt_algorithm, token)
    # Checked on every use: a verified token stays in the cache after it expires. (As python-jose
    # does: valid through its `exp` second.)
    if int(time.time()) > claims.expires_at.timestamp():
        raise InvalidToken("Signature has expired.")
    return claims


# Verifying a signature and parsing the claims costs more CPU than the rest of a session's
# creation; a client sends the same token again and again. Only what the token itself says is
# cached: revocation is checked against the user's token_version on every request, expiry above.
# Forged or malformed tokens raise, and exceptions are not cached.
@functools.lru_cache(maxsize=4096)
def _verified(secret: str, algorithm: str, token: str) -> TokenClaims:
    try:
        # An explicit one-algorithm list closes algorithm-confusion attacks.
        payload = jwt.decode(token, secret, algorithms=[algorithm], options={"require_exp": True, "require_sub": True})
        token_type = TokenType(payload["typ"])
        version = int(payload.get("ver", 0))
        expires_at = datetime.fromtimestamp(int(payload["exp"]), UTC)
        if token_type is TokenType.USER:
            return TokenClaims(
                type=token_type, user_id=int(payload["sub"]), session_id=None, version=version, expires_at=expires_at
            )
        return TokenClaims(
            type=token_type,
            user_id=int(payload["uid"]),
            session_id=uuid.UUID(payload["sub"]),
            version=version,
            expires_at=expires_at,
            channel=Channel(payload.get("ch", Channel.CHAT.value)),
            room=str(payload["room"]) if token_type is TokenType.CALL else None,
        )
    except (JWTError, KeyError, ValueError, TypeError) as exc:
        raise InvalidToken(str(exc)) from exc
