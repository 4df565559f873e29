"""Accounts: registration, login and the voice agent's service account."""

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from morgana.api.models import User
from morgana.api.security import hash_password, verify_password

log = logging.getLogger(__name__)


class EmailAlreadyRegistered(Exception):
    pass


async def register(db: AsyncSession, email: str, password: str) -> User:
    # argon2 is deliberately slow: keep it off the event loop.
    hashed = await run_in_threadpool(hash_password, password)
    user = User(email=email.lower(), hashed_password=hashed)
    db.add(user)
    try:
        await db.commit()
    except IntegrityError as exc:
        await db.rollback()
        raise EmailAlreadyRegistered(email) from exc
    return user


async def authenticate(db: AsyncSession, email: str, password: str) -> User | None:
    """The user with these credentials, or None; unknown emails cost one hash check too."""
    user = await db.scalar(select(User).where(User.email == email.strip().lower()))
    ok = await run_in_threadpool(verify_password, password, user.hashed_password if user else None)
    return user if ok else None


async def get_user(db: AsyncSession, user_id: int) -> User | None:
    return await db.get(User, user_id)


async def ensure_service_account(db: AsyncSession, email: str, password: str) -> None:
    """Create the voice agent's account, or reset its password to the configured one."""
    user = await db.scalar(select(User).where(User.email == email.lower()))
    if user is None:
        await register(db, email, password)
        log.info("created the service account", extra={"email": email.lower()})
        return
    if not await run_in_threadpool(verify_password, password, user.hashed_password):
        user.hashed_password = await run_in_threadpool(hash_password, password)
        await db.commit()
        log.info("updated the service account's password", extra={"email": email.lower()})
