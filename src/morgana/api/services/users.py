"""Accounts: registration, login and the voice agent's service account."""

import logging

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from morgana.api.models import User
from morgana.api.security import PasswordHasher

log = logging.getLogger(__name__)


class EmailAlreadyRegistered(Exception):
    pass


async def register(db: AsyncSession, hasher: PasswordHasher, email: str, password: str) -> User:
    # Hashed before the session touches the database: no pooled connection waits on argon2.
    hashed = await hasher.hash(password)
    user = User(email=email.lower(), hashed_password=hashed)
    db.add(user)
    try:
        await db.commit()
    except IntegrityError as exc:
        await db.rollback()
        raise EmailAlreadyRegistered(email) from exc
    return user


async def authenticate(
    session_factory: async_sessionmaker[AsyncSession], hasher: PasswordHasher, email: str, password: str
) -> User | None:
    """The user with these credentials, or None; unknown emails cost one hash check too.

    The connection goes back to the pool before the (slow) check: a flood of logins must not
    exhaust the database pool for everyone else.
    """
    async with session_factory() as db:
        user = await db.scalar(select(User).where(User.email == email.strip().lower()))
    ok = await hasher.verify(password, user.hashed_password if user else None)
    return user if ok else None


async def revoke_tokens(db: AsyncSession, user: User) -> int:
    """Invalidate every token issued to `user` so far; the new token version."""
    version = await db.scalar(
        update(User)
        .where(User.id == user.id)
        .values(token_version=User.token_version + 1)
        .returning(User.token_version)
    )
    await db.commit()
    assert version is not None
    return version


async def change_password(db: AsyncSession, hasher: PasswordHasher, user: User, new_password: str) -> int:
    """Set a new password and revoke every token issued before; the new token version."""
    hashed = await hasher.hash(new_password)
    version = await db.scalar(
        update(User)
        .where(User.id == user.id)
        .values(hashed_password=hashed, token_version=User.token_version + 1)
        .returning(User.token_version)
    )
    await db.commit()
    assert version is not None
    return version


async def ensure_service_account(db: AsyncSession, email: str, password: str) -> None:
    """Create the voice agent's account, or reset its password to the configured one; either way
    mark it as the service account (which may join callers' sessions during their calls)."""
    hasher = PasswordHasher(concurrency=1, queue=0)
    user = await db.scalar(select(User).where(User.email == email.lower()))
    if user is None:
        await register(db, hasher, email, password)
        log.info("created the service account", extra={"email": email.lower()})
    elif not await hasher.verify(password, user.hashed_password):
        await change_password(db, hasher, user, password)
        log.info("updated the service account's password", extra={"email": email.lower()})
    await db.execute(update(User).where(User.email == email.lower()).values(is_service_account=True))
    await db.commit()
