import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from morgana.api.schemas import HealthResponse, ReadinessResponse

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_SECONDS = 2.0


@router.get("/health", response_model=HealthResponse, summary="Liveness: the process is serving")
async def health() -> HealthResponse:
    return HealthResponse()


@router.get(
    "/ready",
    response_model=ReadinessResponse,
    summary="Readiness: Postgres (and Redis when configured) answer",
    responses={503: {"model": ReadinessResponse, "description": "A dependency is down"}},
)
async def ready(request: Request) -> JSONResponse:
    components = {"postgres": await _check_postgres(request)}
    limiter = request.app.state.rate_limiter
    if limiter.shared:
        components["redis"] = "ok" if await limiter.healthy() else "unreachable"
    healthy = all(state == "ok" for state in components.values())
    body = ReadinessResponse(status="ready" if healthy else "unavailable", components=components)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)


async def _check_postgres(request: Request) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            async with request.app.state.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        return "ok"
    except TimeoutError:
        return "timeout"
    except Exception:
        return "unreachable"
