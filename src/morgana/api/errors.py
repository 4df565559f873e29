"""JSON error bodies for failures the routes do not handle themselves."""

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from morgana.api.services.conversation import HistoryUnavailable

log = logging.getLogger(__name__)


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("database unavailable", extra={"error": type(exc).__name__})
    return JSONResponse(
        {"detail": "Database unavailable", "component": "postgres"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


async def _pool_exhausted(request: Request, exc: Exception) -> JSONResponse:
    # Every pooled connection is busy: overload, not an outage. Say so.
    log.warning("database pool exhausted")
    return JSONResponse(
        {"detail": "Server busy: no free database connection; retry shortly", "component": "postgres"},
        status_code=503,
        headers={"Retry-After": "2"},
    )


async def _dbapi_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    if exc.connection_invalidated or isinstance(exc, (OperationalError, InterfaceError)):
        return await _database_unavailable(request, exc)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc)
    return JSONResponse({"detail": "Internal server error"}, status_code=500)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, without echoing what was sent: an error's `input` may be a password, or the
    whole body around it, and unencodable input (a lone surrogate) broke the response itself."""
    assert isinstance(exc, RequestValidationError)
    errors = [{key: error[key] for key in ("type", "loc", "msg") if key in error} for error in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(PoolTimeoutError, _pool_exhausted)
    app.add_exception_handler(HistoryUnavailable, _database_unavailable)
    app.add_exception_handler(DBAPIError, _dbapi_error)
    app.add_exception_handler(Exception, _unexpected)
