from fastapi import APIRouter, HTTPException, status

from morgana.api.deps import CurrentChatSession, SettingsDep, limit_by_session
from morgana.api.schemas import ErrorResponse, LiveKitTokenResponse
from morgana.api.services.livekit import participant_token

router = APIRouter(prefix="/livekit", tags=["livekit"])


@router.post(
    "/token",
    response_model=LiveKitTokenResponse,
    response_model_by_alias=True,
    summary="Get a LiveKit URL and participant token for this session's voice room",
    responses={
        401: {"model": ErrorResponse, "description": "Missing, invalid or expired token"},
        403: {"model": ErrorResponse, "description": "A user token where a session token belongs"},
        429: {"model": ErrorResponse, "description": "Rate limited; see Retry-After"},
        503: {"model": ErrorResponse, "description": "LiveKit is not configured on this server"},
    },
    dependencies=[limit_by_session("livekit")],
)
async def livekit_token(session: CurrentChatSession, settings: SettingsDep) -> LiveKitTokenResponse:
    if not settings.livekit_configured:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Voice is not configured: set LIVEKIT_API_KEY and LIVEKIT_API_SECRET",
        )
    grant = participant_token(settings, session.user_id, session.id)
    return LiveKitTokenResponse(
        serverUrl=grant.server_url,
        participantToken=grant.token,
        roomName=grant.room_name,
        participantIdentity=grant.identity,
    )
