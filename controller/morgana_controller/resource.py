"""The AgentAutoscaler resource: its spec as the controller reads it, and the status it writes.

The CRD (charts/morgana/crds/agentautoscalers.morgana.dev.yaml) validates and defaults on the
API server; the same rules are applied here again, so a resource stored before a CRD upgrade
(or on a server without CEL) gets a clear InvalidSpec condition instead of odd scaling.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from morgana_controller.policy import PolicyParams

GROUP, VERSION, KIND, PLURAL = "morgana.dev", "v1alpha1", "AgentAutoscaler", "agentautoscalers"


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=AliasGenerator(validation_alias=to_camel), extra="ignore", frozen=True)


class TargetRef(_Camel):
    name: str = Field(min_length=1)


class CredentialsSecretRef(_Camel):
    name: str = Field(min_length=1)
    api_key_key: str = Field(default="api-key", min_length=1)
    api_secret_key: str = Field(default="api-secret", min_length=1)


class LiveKitRef(_Camel):
    url: str = Field(pattern=r"^(wss?|https?)://\S+$")
    credentials_secret_ref: CredentialsSecretRef


class Redispatch(_Camel):
    enabled: bool = True
    grace_seconds: int = Field(default=10, ge=0)


class AutoscalerSpec(_Camel):
    target_ref: TargetRef
    livekit: LiveKitRef
    agent_name: str = Field(min_length=1)
    rooms_per_worker: int = Field(default=4, ge=1)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=10, ge=1)
    headroom: int = Field(default=1, ge=0)
    scale_down_stabilization_seconds: int = Field(default=120, ge=0)
    poll_interval_seconds: int = Field(default=5, ge=1)
    redispatch: Redispatch = Redispatch()

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalerSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})")
        return self

    @property
    def policy(self) -> PolicyParams:
        return PolicyParams(
            rooms_per_worker=self.rooms_per_worker,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            headroom=self.headroom,
            scale_down_stabilization_seconds=float(self.scale_down_stabilization_seconds),
        )


class InvalidSpec(ValueError):
    pass


def parse_spec(spec: Mapping[str, Any] | None) -> AutoscalerSpec:
    try:
        return AutoscalerSpec.model_validate(dict(spec or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(to_camel(str(part)) for part in error['loc']) or 'spec'}: {error['msg']}"
            for error in exc.errors()
        )
        raise InvalidSpec(problems) from None


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str


READY = "Ready"
LIVEKIT_REACHABLE = "LiveKitReachable"


class Conditions:
    """The conditions of one resource, keeping lastTransitionTime across updates that change nothing."""

    def __init__(self, existing: list[Mapping[str, Any]] | None) -> None:
        self._by_type: dict[str, dict[str, Any]] = {
            c["type"]: dict(c) for c in existing or [] if isinstance(c, Mapping) and "type" in c
        }

    def set(self, condition: Condition, generation: int | None) -> bool:
        """Record `condition`; True if its status changed (a transition worth an Event)."""
        previous = self._by_type.get(condition.type)
        changed = previous is None or previous.get("status") != condition.status
        kept_time = (previous or {}).get("lastTransitionTime")
        self._by_type[condition.type] = {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": kept_time if kept_time and not changed else now_rfc3339(),
            "observedGeneration": generation,
        }
        return changed

    def status_of(self, type_: str) -> str | None:
        return self._by_type.get(type_, {}).get("status")

    def as_list(self) -> list[dict[str, Any]]:
        order = {READY: 0, LIVEKIT_REACHABLE: 1}
        return sorted(self._by_type.values(), key=lambda c: (order.get(c["type"], 9), c["type"]))
