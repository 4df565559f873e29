"""Password hashing and token rules, below the HTTP layer."""

import asyncio
import uuid

import pytest
from jose import jwt
from pydantic import SecretStr

from morgana.api import security
from morgana.api.config import ApiSettings
from morgana.api.security import (
    HasherBusy,
    InvalidToken,
    PasswordHasher,
    TokenType,
    decode_token,
    hash_password,
    issue_session_token,
    issue_user_token,
    verify_password,
)

SETTINGS = ApiSettings(_env_file=None, environment="production", jwt_secret_key="s" * 40, openai_api_key="k")


def test_passwords_are_hashed_with_argon2id_and_verified() -> None:
    hashed = hash_password("A_Strong_Password123!")
    assert hashed.startswith("$argon2id$")
    assert verify_password("A_Strong_Password123!", hashed)
    assert not verify_password("A_Strong_Password123?", hashed)


def test_unknown_accounts_cost_one_password_check_too(monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []
    real_verify = security._passwords.verify
    monkeypatch.setattr(
        security._passwords, "verify", lambda secret, hashed: checks.append(hashed) or real_verify(secret, hashed)
    )
    assert verify_password("whatever-Pass1!", None) is False
    assert checks == [security._DUMMY_HASH]


def test_user_and_session_tokens_carry_their_kind() -> None:
    session_id = uuid.uuid4()
    user = decode_token(SETTINGS, issue_user_token(SETTINGS, 7, 3).access_token)
    session = decode_token(SETTINGS, issue_session_token(SETTINGS, 7, session_id, 3).access_token)
    assert (user.type, user.user_id, user.session_id, user.version) == (TokenType.USER, 7, None, 3)
    assert (session.type, session.user_id, session.session_id, session.version) == (TokenType.SESSION, 7, session_id, 3)


def test_tokens_signed_with_another_algorithm_are_refused() -> None:
    token = jwt.encode({"sub": "7", "typ": "user", "exp": 4102444800}, "s" * 40, algorithm="HS512")
    with pytest.raises(InvalidToken):
        decode_token(SETTINGS, token)


def test_a_verified_token_is_refused_once_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Verified tokens are cached; expiry is still checked on every use."""
    issued = issue_user_token(SETTINGS, 7, 3)
    exp = int(issued.expires_at.timestamp())
    assert decode_token(SETTINGS, issued.access_token).user_id == 7  # verified, now cached
    monkeypatch.setattr(security.time, "time", lambda: exp + 0.9)  # python-jose: valid through its second
    assert decode_token(SETTINGS, issued.access_token).user_id == 7
    monkeypatch.setattr(security.time, "time", lambda: exp + 1.0)
    with pytest.raises(InvalidToken, match="expired"):
        decode_token(SETTINGS, issued.access_token)


def test_a_cached_token_is_refused_under_another_secret() -> None:
    token = issue_user_token(SETTINGS, 7, 3).access_token
    assert decode_token(SETTINGS, token).user_id == 7
    rotated = SETTINGS.model_copy(update={"jwt_secret_key": SecretStr("r" * 40)})
    with pytest.raises(InvalidToken):
        decode_token(rotated, token)


def test_login_path_checks_a_password_even_for_unknown_emails(monkeypatch: pytest.MonkeyPatch) -> None:
    from morgana.api.services import users

    calls: list[object] = []
    monkeypatch.setattr(security, "verify_password", lambda password, hashed: calls.append(hashed) or False)

    class NoUsers:
        async def scalar(self, _statement: object) -> None:
            return None

        async def __aenter__(self) -> "NoUsers":
            return self

        async def __aexit__(self, *_: object) -> None:
            return None

    result = asyncio.run(
        users.authenticate(
            NoUsers,
            PasswordHasher(1, 0),  # type: ignore[arg-type]
            "nobody@example.com",
            "Pass_word1",
        )
    )
    assert result is None
    assert calls == [None]  # verify_password(…, None) burns one argon2 check


def test_password_checks_are_bounded_and_the_overflow_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most `concurrency` checks run at once, `queue` more wait, and the next is refused at once."""
    import threading
    import time

    running, peak, lock = [0], [0], threading.Lock()

    def slow_check(password: str, hashed: str | None) -> bool:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return False

    monkeypatch.setattr(security, "verify_password", slow_check)
    hasher = PasswordHasher(concurrency=2, queue=3)

    async def flood() -> list[object]:
        return await asyncio.gather(*(hasher.verify("pw", None) for _ in range(8)), return_exceptions=True)

    results = asyncio.run(flood())
    assert peak[0] == 2
    assert results.count(False) == 5  # 2 running + 3 waiting
    assert sum(isinstance(r, HasherBusy) for r in results) == 3
