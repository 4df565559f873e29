"""The scenario language: ``Scenario`` (how to answer a request), its validation for each
endpoint, ``[[fake ...]]`` directives, and the text helpers replies are built from (tokens,
filler text, word and rough token counts)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Final

FAIL_MODES: Final = frozenset({"abort", "error_event"})
ENDPOINTS: Final = ("chat", "transcriptions", "speech")

_FILLER_WORDS: Final = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "et",
)  # fmt: skip
_TOKEN_RE: Final = re.compile(r"\s*\S+")
_DIRECTIVE_RE: Final = re.compile(r"\[\[fake\b(?P<args>[^\]]*)\]\]")


class ScenarioError(ValueError):
    """A scenario (from the control API or a directive) is malformed."""


def _as_text(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ScenarioError(f"{name} must be a string")
    return str(value)


def _as_count(name: str, value: object) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ScenarioError(f"{name} must be a non-negative integer")
    return value


def _as_amount(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ScenarioError(f"{name} must be a non-negative number")
    return float(value)


def _as_status(name: str, value: object) -> int:
    status = _as_count(name, value)
    if not 400 <= status <= 599:
        raise ScenarioError(f"{name} must be an HTTP error status (400-599)")
    return status


def _as_fail_mode(name: str, value: object) -> str:
    if value not in FAIL_MODES:
        raise ScenarioError(f"{name} must be one of {sorted(FAIL_MODES)}")
    return str(value)


_FIELD_PARSERS: Final[Mapping[str, Callable[[str, object], object]]] = {
    "reply": _as_text,
    "tokens": _as_count,
    "first_delay_ms": _as_amount,
    "delay_ms": _as_amount,
    "status": _as_status,
    "fail_after": _as_count,
    "fail_mode": _as_fail_mode,
    "stall_after": _as_count,
    "stall_seconds": _as_amount,
    "keepalive_ms": _as_amount,
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """How the server answers a chat request; ``None`` means "not set, use the defaults".

    - ``reply``: exact reply text (wins over ``tokens``); ``tokens``: reply of exactly N tokens.
    - ``first_delay_ms``: pause before the first token; ``delay_ms``: pause between tokens.
    - ``status``: answer at once with this HTTP error status and an OpenAI error body.
    - ``fail_after`` + ``fail_mode``: after N tokens either drop the connection (``"abort"``)
      or send an in-stream error event and end the stream (``"error_event"``).
    - ``stall_after`` + ``stall_seconds``: after N tokens go silent (default 3600 s).
    - ``keepalive_ms``: during any pause (a delay or a stall) longer than this, send an SSE
      comment (``: keepalive``) this often, as OpenAI does: bytes, but no content.
    """

    reply: str | None = None
    tokens: int | None = None
    first_delay_ms: float | None = None
    delay_ms: float | None = None
    status: int | None = None
    fail_after: int | None = None
    fail_mode: str | None = None
    stall_after: int | None = None
    stall_seconds: float | None = None
    keepalive_ms: float | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Scenario:
        """Validate and build a scenario from JSON-ish data; ``None`` values are ignored."""
        unknown = sorted(set(data) - set(_FIELD_PARSERS))
        if unknown:
            raise ScenarioError(f"unknown scenario field(s): {', '.join(unknown)}")
        parsed = {k: _FIELD_PARSERS[k](k, v) for k, v in data.items() if v is not None}
        return cls(**parsed)  # type: ignore[arg-type]

    def over(self, base: Scenario) -> Scenario:
        """Return ``base`` with every field that is set here overriding it."""
        changes = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(base, **{k: v for k, v in changes.items() if v is not None})

    def to_json(self) -> dict[str, object]:
        """The set fields as a JSON object."""
        return {k: v for k, v in asdict(self).items() if v is not None}


_ENDPOINT_FIELDS: Final[Mapping[str, frozenset[str]]] = {
    "chat": frozenset(_FIELD_PARSERS),
    "transcriptions": frozenset({"status", "first_delay_ms"}),
    "speech": frozenset(
        {"status", "first_delay_ms", "delay_ms", "fail_after", "fail_mode", "stall_after", "stall_seconds"}
    ),
}


def scenario_for_endpoint(data: Mapping[str, object]) -> tuple[str, Scenario]:
    """Split the optional ``"endpoint"`` key off a control body and validate the rest for it."""
    fields_ = dict(data)
    endpoint = fields_.pop("endpoint", None)
    endpoint = "chat" if endpoint is None else endpoint
    if endpoint not in ENDPOINTS:
        raise ScenarioError(f"endpoint must be one of {list(ENDPOINTS)}")
    assert isinstance(endpoint, str)
    scenario = Scenario.from_mapping(fields_)
    unsupported = sorted(set(scenario.to_json()) - _ENDPOINT_FIELDS[endpoint])
    if unsupported:
        allowed = ", ".join(sorted(_ENDPOINT_FIELDS[endpoint]))
        raise ScenarioError(f"{endpoint} scenarios do not support {', '.join(unsupported)} (only {allowed})")
    if endpoint == "speech" and scenario.fail_mode not in (None, "abort"):
        raise ScenarioError('speech scenarios only support fail_mode "abort"')
    return endpoint, scenario


def _parse_scalar(raw: str) -> str | int | float:
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    return raw


def parse_directive(text: str) -> tuple[Scenario | None, str]:
    """Split ``[[fake key=value ...]]`` out of a message: ``(scenario or None, remaining text)``."""
    match = _DIRECTIVE_RE.search(text)
    if match is None:
        return None, text
    params: dict[str, object] = {}
    for item in match.group("args").split():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ScenarioError(f"directive arguments must look like key=value, got {item!r}")
        params[key] = _parse_scalar(value)
    remaining = _DIRECTIVE_RE.sub("", text).strip()
    return Scenario.from_mapping(params), remaining


def clamp(index: int | None, limit: int) -> int | None:
    """A scenario's ``fail_after``/``stall_after`` limited to the number of tokens or chunks."""
    return None if index is None else min(index, limit)


# --------------------------------------------------------------------------- text helpers


def tokenize(text: str) -> list[str]:
    """Split text into word tokens that keep their leading whitespace (join == text)."""
    tokens = _TOKEN_RE.findall(text)
    trailing = text[sum(map(len, tokens)) :]
    if trailing:
        if tokens:
            tokens[-1] += trailing
        else:
            tokens.append(trailing)
    return tokens


def filler_tokens(count: int) -> list[str]:
    """Exactly ``count`` tokens of filler text."""
    words = _FILLER_WORDS
    return [(" " if i else "") + words[i % len(words)] for i in range(count)]


def content_text(content: object) -> str:
    """The text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return "\n".join(t for t in texts if isinstance(t, str))
    return ""


def count_words(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt "tokens": whitespace-separated words over all messages' content."""
    return sum(len(content_text(m.get("content")).split()) for m in messages)


def rough_tokens(text: str) -> int:
    """Token estimate for usage figures: ~4 characters per token."""
    return math.ceil(len(text) / 4)
