"""Structured JSON logs with a request id, scrubbed of secrets."""

import logging
import logging.config
import re
from collections.abc import Callable

from pythonjsonlogger.json import JsonFormatter

# JWTs, bearer credentials and password/secret key-value pairs never reach a log line.
_SECRET_PATTERNS = [
    (re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]+"), "[REDACTED_JWT]"),
    (re.compile(r"(?i)(bearer\s+)[^\s\"',]+"), r"\1[REDACTED]"),
    (
        re.compile(r"(?i)((?:password|secret|api_key|apikey|token)[\"']?\s*[:=]\s*[\"']?)[^\s\"',&}]+"),
        r"\1[REDACTED]",
    ),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and exception text) with secrets masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request (or job) id, if the process has one."""

    def __init__(self, request_id: Callable[[], str | None] = lambda: None) -> None:
        super().__init__()
        self._request_id = request_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = self._request_id()
        return True


def configure_logging(
    level: str = "INFO",
    fmt: str = "json",
    request_id: Callable[[], str | None] = lambda: None,
) -> None:
    """Route every logger (ours, uvicorn's, gunicorn's) through one scrubbed handler."""
    if fmt == "json":
        formatter: dict[str, object] = {
            "()": JsonFormatter,
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        }
    else:
        formatter = {"format": "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"}
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "redact": {"()": RedactingFilter},
                "request_id": {"()": RequestIdFilter, "request_id": request_id},
            },
            "formatters": {"default": formatter},
            "handlers": {
                "stderr": {
                    "class": "logging.StreamHandler",
                    "formatter": "default",
                    "filters": ["redact", "request_id"],
                }
            },
            "root": {"handlers": ["stderr"], "level": level.upper()},
            "loggers": {
                # uvicorn's access log repeats what our request log says, with query strings.
                "uvicorn.access": {"level": "WARNING"},
                "uvicorn.error": {"handlers": [], "propagate": True},
                "uvicorn": {"handlers": [], "propagate": True},
                "gunicorn.error": {"handlers": [], "propagate": True},
                "httpx": {"level": "WARNING"},
                "httpcore": {"level": "WARNING"},
                "openai": {"level": "WARNING"},
            },
        }
    )
