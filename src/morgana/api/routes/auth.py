import uuid
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, status

from morgana.api.deps import (
    AutocommitDep,
    CurrentUser,
    DbDep,
    FailedLogins,
    HasherDep,
    SessionFactoryDep,
    SettingsDep,
    UserClaims,
    limit_by_client,
    limit_by_user,
    token_refused,
)
from morgana.api.routes import Responses
from morgana.api.schemas import (
    CleanText,
    ErrorResponse,
    PasswordChange,
    RegisterRequest,
    SessionInfo,
    SessionRename,
    SessionResponse,
    TokenResponse,
    UserResponse,
)
from morgana.api.security import HasherBusy, issue_session_token, issue_user_token
from morgana.api.services import sessions, users
from morgana.api.services.livekit import close_room

router = APIRouter(prefix="/auth", tags=["auth"])

_UNAUTHORIZED: Responses = {401: {"model": ErrorResponse, "description": "Missing, invalid or expired token"}}
_WRONG_TOKEN: Responses = {403: {"model": ErrorResponse, "description": "A session token where a user token belongs"}}
_LIMITED: Responses = {429: {"model": ErrorResponse, "description": "Rate limited; see Retry-After"}}
_BUSY: Responses = {503: {"model": ErrorResponse, "description": "Too many password checks at once; see Retry-After"}}


def _busy() -> HTTPException:
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "Server busy checking passwords; retry shortly",
        headers={"Retry-After": "1"},
    )


@router.post(
    "/register",
    response_model=UserResponse,
    summary="Register a new user and get a user token",
    responses={409: {"model": ErrorResponse, "description": "Email already registered"}, **_LIMITED, **_BUSY},
    dependencies=[limit_by_client("register")],
)
async def register(body: RegisterRequest, db: DbDep, hasher: HasherDep, settings: SettingsDep) -> UserResponse:
    try:
        user = await users.register(db, hasher, body.email, body.password)
    except users.EmailAlreadyRegistered:
        raise HTTPException(status.HTTP_409_CONFLICT, "Email already registered") from None
    except HasherBusy:
        raise _busy() from None
    token = issue_user_token(settings, user.id, user.token_version)
    return UserResponse(
        id=user.id,
        email=user.email,
        token=TokenResponse(access_token=token.access_token, expires_at=token.expires_at),
    )


@router.post(
    "/login",
    response_model=TokenResponse,
    summary="Log in with email and password (form-encoded) and get a user token",
    responses={401: {"model": ErrorResponse, "description": "Incorrect email or password"}, **_LIMITED, **_BUSY},
    dependencies=[limit_by_client("login")],
)
async def login(
    username: Annotated[CleanText, Form(description="The user's email", examples=["user@example.com"])],
    password: Annotated[CleanText, Form(examples=["A_Strong_Password123!"])],
    request: Request,
    session_factory: SessionFactoryDep,
    hasher: HasherDep,
    settings: SettingsDep,
) -> TokenResponse:
    attempts = FailedLogins(request, username)
    await attempts.refuse_if_locked()
    try:
        user = await users.authenticate(session_factory, hasher, username, password)
    except HasherBusy:
        raise _busy() from None
    if user is None:
        await attempts.failed()
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Incorrect email or password",
            headers={"WWW-Authenticate": "Bearer"},
        )
    await attempts.succeeded()
    token = issue_user_token(settings, user.id, user.token_version)
    return TokenResponse(access_token=token.access_token, expires_at=token.expires_at)


@router.post(
    "/logout",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Revoke every user and session token of this account (needs a user token)",
    responses={**_UNAUTHORIZED, **_WRONG_TOKEN},
)
async def logout(user: CurrentUser, db: DbDep) -> None:
    await users.revoke_tokens(db, user)


@router.post(
    "/password",
    response_model=TokenResponse,
    summary="Change the password; every token issued before is revoked, a new user token returned",
    responses={**_UNAUTHORIZED, **_WRONG_TOKEN, **_LIMITED, **_BUSY},
    dependencies=[limit_by_client("login")],
)
async def change_password(
    body: PasswordChange, user: CurrentUser, request: Request, db: DbDep, hasher: HasherDep, settings: SettingsDep
) -> TokenResponse:
    # The current password is guessed here as at login: the same per-account lock applies.
    attempts = FailedLogins(request, user.email)
    await attempts.refuse_if_locked()
    try:
        if not await hasher.verify(body.current_password, user.hashed_password):
            await attempts.failed()
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "Incorrect current password", headers={"WWW-Authenticate": "Bearer"}
            )
        version = await users.change_password(db, hasher, user, body.new_password)
    except HasherBusy:
        raise _busy() from None
    token = issue_user_token(settings, user.id, version)
    return TokenResponse(access_token=token.access_token, expires_at=token.expires_at)


@router.post(
    "/session",
    response_model=SessionResponse,
    summary="Create a chat session and get its session token (needs a user token)",
    responses={**_UNAUTHORIZED, **_WRONG_TOKEN, **_LIMITED},
    dependencies=[limit_by_user("session")],
)
async def create_session(claims: UserClaims, engine: AutocommitDep, settings: SettingsDep) -> SessionResponse:
    async with engine.connect() as conn:
        session = await sessions.create_for_token(conn, claims.user_id, claims.version)
        if session is None:
            raise await token_refused(conn, claims)
    token = issue_session_token(settings, claims.user_id, session.id, claims.version)
    return SessionResponse(
        session_id=session.id,
        name=session.name,
        token=TokenResponse(access_token=token.access_token, expires_at=token.expires_at),
    )


@router.get(
    "/sessions",
    response_model=list[SessionInfo],
    summary="List the user's chat sessions, newest first",
    responses={**_UNAUTHORIZED, **_WRONG_TOKEN},
)
async def list_sessions(user: CurrentUser, db: DbDep) -> list[SessionInfo]:
    return [
        SessionInfo(session_id=s.id, name=s.name, created_at=s.created_at)
        for s in await sessions.list_for_user(db, user.id)
    ]


_NOT_FOUND: Responses = {404: {"model": ErrorResponse, "description": "No such session for this user"}}


@router.patch(
    "/sessions/{session_id}",
    response_model=SessionInfo,
    summary="Rename one of the user's sessions",
    responses={**_UNAUTHORIZED, **_WRONG_TOKEN, **_NOT_FOUND},
)
async def rename_session(session_id: uuid.UUID, body: SessionRename, user: CurrentUser, db: DbDep) -> SessionInfo:
    session = await sessions.rename(db, user.id, session_id, body.name)
    if session is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Session not found")
    return SessionInfo(session_id=session.id, name=session.name, created_at=session.created_at)


@router.post(
    "/sessions/{session_id}/token",
    response_model=SessionResponse,
    summary="Get a new session token for one of the user's sessions (needs a user token)",
    description=(
        "For a client that has the user's token but not the session's (another device, a page "
        "reloaded): the same conversation, its history and its voice room. Limited as creating a "
        "session is."
    ),
    responses={**_UNAUTHORIZED, **_WRONG_TOKEN, **_NOT_FOUND, **_LIMITED},
    dependencies=[limit_by_user("session")],
)
async def session_token(session_id: uuid.UUID, user: CurrentUser, db: DbDep, settings: SettingsDep) -> SessionResponse:
    session = await sessions.owned(db, user.id, session_id)
    if session is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Session not found")
    token = issue_session_token(settings, user.id, session.id, user.token_version)
    return SessionResponse(
        session_id=session.id,
        name=session.name,
        token=TokenResponse(access_token=token.access_token, expires_at=token.expires_at),
    )


@router.delete(
    "/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete one of the user's sessions, its history, its tokens' validity and its voice room",
    responses={**_UNAUTHORIZED, **_WRONG_TOKEN, **_NOT_FOUND},
)
async def delete_session(session_id: uuid.UUID, user: CurrentUser, db: DbDep, settings: SettingsDep) -> None:
    if not await sessions.delete_owned(db, user.id, session_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Session not found")
    await close_room(settings, session_id)  # its callers and agent leave now
