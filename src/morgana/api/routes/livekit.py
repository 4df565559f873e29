from fastapi import APIRouter, HTTPException, status

from morgana.api.deps import (
    ClaimsDep,
    CurrentChatSession,
    CurrentUser,
    SessionFactoryDep,
    SettingsDep,
    VoiceRoomsDep,
    limit_by_session,
)
from morgana.api.schemas import CallSessionRequest, ErrorResponse, LiveKitTokenResponse, SessionResponse, TokenResponse
from morgana.api.services.calls import CallRefused, join_call
from morgana.api.services.livekit import VoiceRoomsUnavailable, participant_token, room_for_session

router = APIRouter(prefix="/livekit", tags=["livekit"])


@router.post(
    "/token",
    response_model=LiveKitTokenResponse,
    response_model_by_alias=True,
    summary="Get a LiveKit URL and participant token for this session's voice room",
    responses={
        401: {"model": ErrorResponse, "description": "Missing, invalid or expired token"},
        403: {"model": ErrorResponse, "description": "A user token where a session token belongs"},
        429: {"model": ErrorResponse, "description": "Rate limited, or the user's voice rooms are at the cap"},
        503: {"model": ErrorResponse, "description": "LiveKit is not configured on this server"},
    },
    dependencies=[limit_by_session("livekit")],
)
async def livekit_token(
    session: CurrentChatSession, claims: ClaimsDep, settings: SettingsDep, voice_rooms: VoiceRoomsDep
) -> LiveKitTokenResponse:
    if not settings.livekit_configured:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Voice is not configured: set LIVEKIT_API_KEY and LIVEKIT_API_SECRET",
        )
    try:
        admitted = await voice_rooms.admit(session.user_id, room_for_session(session.id))
    except VoiceRoomsUnavailable:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Voice grants store (Redis) is unavailable",
            headers={"Retry-After": "5"},
        ) from None
    if not admitted:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"At most {settings.livekit_max_rooms_per_user} voice calls at once per user: end one first",
            headers={"Retry-After": "60"},
        )
    grant = participant_token(settings, session.user_id, session.id, claims.version)
    return LiveKitTokenResponse(
        server_url=grant.server_url,
        participant_token=grant.token,
        room_name=grant.room_name,
        participant_identity=grant.identity,
    )


@router.post(
    "/call-session",
    response_model=SessionResponse,
    summary="For the voice agent: trade a call's credential for a voice token of the caller's session",
    description=(
        "The agent sends `call` from its job's dispatch metadata and the room it joined, with its own "
        "user token (API_USER_EMAIL). The session token it gets adds the call's turns to the caller's "
        "conversation, marked `voice`; it cannot read or delete the history, and expires with the call."
    ),
    responses={
        401: {"model": ErrorResponse, "description": "Invalid or expired token or call credential"},
        403: {"model": ErrorResponse, "description": "Not the voice agent's account, or another room's credential"},
        404: {"model": ErrorResponse, "description": "The caller's session was deleted"},
    },
)
async def call_session(
    body: CallSessionRequest, agent: CurrentUser, factory: SessionFactoryDep, settings: SettingsDep
) -> SessionResponse:
    try:
        session, token = await join_call(factory, settings, agent, body.credential, body.room)
    except CallRefused as refused:
        headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
        raise HTTPException(refused.status, refused.message, headers=headers) from None
    return SessionResponse(
        session_id=session.id,
        name=session.name,
        token=TokenResponse(access_token=token.access_token, expires_at=token.expires_at),
    )
