"""kopf handlers: one daemon per AgentAutoscaler that reads room load and scales its Deployment.

Each tick (every `pollIntervalSeconds`): read the LiveKit credentials Secret, then LiveKit's
room load and the target Deployment together, let the policy decide, patch the Deployment's
scale subresource if the decision changes it (with an Event), dispatch agents to rooms left
without one, and write the status (only when it changed). Nothing a tick meets ends the
daemon: a missing Secret or Deployment, an invalid spec or an unreachable LiveKit becomes a
condition, a metric and a log line, and the next tick tries again.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

import kopf
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Secret
from lightkube.types import PatchType

from morgana.core.livekit_rooms import LiveKitLoadReader, LiveKitRejected, LiveKitUnreachable, Load
from morgana.core.redispatch import DispatchPlanner
from morgana_controller import metrics
from morgana_controller.config import ControllerSettings
from morgana_controller.policy import Decision, Direction, ScalePolicy
from morgana_controller.resource import (
    GROUP,
    KIND,
    LIVEKIT_REACHABLE,
    PLURAL,
    READY,
    VERSION,
    AutoscalerSpec,
    Condition,
    Conditions,
    InvalidSpec,
    now_rfc3339,
    parse_spec,
)

log = logging.getLogger(__name__)

AgentAutoscalerResource = create_namespaced_resource(GROUP, VERSION, KIND, PLURAL)
# kopf keeps this finalizer on every AgentAutoscaler while a daemon serves it (see `autoscale`).
FINALIZER = "morgana.dev/autoscaler"
_DEFAULT_INTERVAL = 5.0


@dataclass(frozen=True)
class Runtime:
    """What every daemon shares; passed to kopf as the operator's memo."""

    kube: AsyncClient
    settings: ControllerSettings


class Blocked(Exception):
    """The tick cannot go on; `condition` says why (a False Ready)."""

    def __init__(self, reason: str, message: str, error_kind: str) -> None:
        super().__init__(message)
        self.condition = Condition(READY, "False", reason, message)
        self.error_kind = error_kind


# On a stop, a tick in progress may finish (a tick is bounded by LiveKit's timeout) before kopf
# cancels the daemon: a cancelled daemon could not take its finalizer off.
@kopf.daemon(GROUP, VERSION, PLURAL, id="autoscale", cancellation_backoff=5.0, cancellation_timeout=10.0)
async def autoscale(
    body: kopf.Body, name: str, namespace: str | None, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any
) -> None:
    """Runs for as long as the resource exists and this replica leads (kopf peering).

    kopf keeps FINALIZER on the resource meanwhile, so that a deletion waits for the daemon to
    stop. When the whole process exits (a rollout, or `helm uninstall`, which deletes the
    controller before custom resources), the finalizer is taken off here: otherwise deleting
    the resource would hang until some controller runs again. The next leader puts it back.
    """
    # AgentAutoscaler is a namespaced resource: kopf always gives its namespace.
    autoscaler = Autoscaler(cast(str, namespace), name, memo.runtime, body)
    try:
        while not stopped:
            started = time.monotonic()
            interval = await autoscaler.tick()
            await stopped.wait(max(interval - (time.monotonic() - started), 0.0))
    finally:
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.OPERATOR_EXITING:
            # Shielded: a cancellation arriving meanwhile must not cut the patch short.
            release = asyncio.ensure_future(autoscaler.release_finalizer())
            try:
                await asyncio.shield(release)
            except asyncio.CancelledError:
                await asyncio.wait([release], timeout=5)
                raise
            finally:
                await autoscaler.close()
        else:
            await autoscaler.close()


class Autoscaler:
    """The state and one tick of one AgentAutoscaler. `body` is kopf's live view of it."""

    def __init__(self, namespace: str, name: str, runtime: Runtime, body: kopf.Body) -> None:
        self.namespace, self.name = namespace, name
        self.kube = runtime.kube
        self.settings = runtime.settings
        self.body = body
        self.labels = {"namespace": namespace, "autoscaler": name}
        self.policy = ScalePolicy()
        self.planner = DispatchPlanner()
        self.reader: LiveKitLoadReader | None = None
        status = dict(body.get("status") or {})
        self.conditions = Conditions(status.get("conditions"))
        # What the status says now; ticks update it and write it back only when it changed.
        self.status: dict[str, Any] = {k: v for k, v in status.items() if k != "conditions"}
        self.written: dict[str, Any] | None = None
        self.failure: str | None = None  # the last unexpected error, logged once per streak

    async def tick(self) -> float:
        generation = self.body.get("metadata", {}).get("generation")
        self.status["observedGeneration"] = generation
        interval = _DEFAULT_INTERVAL
        try:
            spec = self._spec()
            interval = float(spec.poll_interval_seconds)
            api_key, api_secret = await self._credentials(spec)
            await self._scale(spec, await self._reader(spec, api_key, api_secret), generation)
            self.failure = None
        except Blocked as blocked:
            metrics.ERRORS.labels(**self.labels, kind=blocked.error_kind).inc()
            changed = self._condition(blocked.condition, generation, event=blocked.condition.reason)
            if self.conditions.status_of(LIVEKIT_REACHABLE) is None:
                self._condition(
                    Condition(LIVEKIT_REACHABLE, "Unknown", "NotChecked", "LiveKit is read once the resource is ready"),
                    generation,
                )
            # Said once per transition; every tick repeats it at debug level only.
            log.log(
                logging.WARNING if changed else logging.DEBUG,
                "[%s/%s] %s",
                self.namespace,
                self.name,
                blocked,
                extra=self.labels,
            )
        except Exception as exc:  # e.g. the API server unreachable: the next tick tries again
            metrics.ERRORS.labels(**self.labels, kind="internal").inc()
            failure, self.failure = self.failure, f"{type(exc).__name__}: {exc}"
            if failure != self.failure:  # the traceback once, not every tick
                log.warning(
                    "[%s/%s] tick failed: %s", self.namespace, self.name, self.failure, exc_info=True, extra=self.labels
                )
        await self._write_status()
        return interval

    def _spec(self) -> AutoscalerSpec:
        try:
            return parse_spec(self.body.get("spec"))
        except InvalidSpec as exc:
            raise Blocked("InvalidSpec", f"invalid spec: {exc}", "spec") from None

    async def _credentials(self, spec: AutoscalerSpec) -> tuple[str, str]:
        ref = spec.livekit.credentials_secret_ref
        try:
            secret = await self.kube.get(Secret, ref.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                raise Blocked(
                    "SecretNotFound",
                    f"Secret {ref.name!r} with the LiveKit credentials does not exist in namespace {self.namespace!r}",
                    "credentials",
                ) from None
            raise Blocked(
                _api_reason(exc), f"cannot read Secret {ref.name!r}: {exc.status.message}", "credentials"
            ) from None
        values = []
        for key in (ref.api_key_key, ref.api_secret_key):
            raw = (secret.data or {}).get(key)
            if not raw:
                raise Blocked(
                    "SecretKeyMissing",
                    f"Secret {ref.name!r} has no key {key!r} (see spec.livekit.credentialsSecretRef)",
                    "credentials",
                )
            try:
                values.append(base64.b64decode(raw).decode().strip())
            except (binascii.Error, UnicodeDecodeError):
                raise Blocked(
                    "SecretKeyMissing", f"key {key!r} of Secret {ref.name!r} is not text", "credentials"
                ) from None
        return values[0], values[1]

    async def _reader(self, spec: AutoscalerSpec, api_key: str, api_secret: str) -> LiveKitLoadReader:
        """One LiveKit client per URL and key; a new one when the spec or the Secret changes."""
        identity = (spec.livekit.url, api_key, api_secret)
        if self.reader is None or self.reader.identity != identity:
            if self.reader is not None:
                await self.reader.aclose()
            self.reader = LiveKitLoadReader(*identity, timeout=self.settings.livekit_timeout_seconds)
        return self.reader

    async def _target(self, spec: AutoscalerSpec) -> tuple[int, int, int]:
        """(spec.replicas, status.replicas, status.readyReplicas) of the target Deployment."""
        target = spec.target_ref.name
        try:
            deployment = await self.kube.get(Deployment, target, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 404:
                raise Blocked(
                    "TargetNotFound", f"Deployment {target!r} does not exist in namespace {self.namespace!r}", "target"
                ) from None
            raise Blocked(
                _api_reason(exc), f"cannot read Deployment {target!r}: {exc.status.message}", "target"
            ) from None
        replicas = deployment.spec.replicas if deployment.spec and deployment.spec.replicas is not None else 1
        status = deployment.status
        existing = (status.replicas or 0) if status else 0
        ready = (status.readyReplicas or 0) if status else 0
        return replicas, existing, ready

    async def _scale(self, spec: AutoscalerSpec, reader: LiveKitLoadReader, generation: int | None) -> None:
        started = time.monotonic()
        load_read, target_read = await asyncio.gather(reader.read(), self._target(spec), return_exceptions=True)
        if isinstance(target_read, BaseException):
            raise target_read
        current, existing, ready = target_read
        load: Load | None = None
        if isinstance(load_read, (LiveKitUnreachable, LiveKitRejected)):
            decision = self.policy.hold(time.monotonic(), current, spec.policy, "LiveKit cannot be read")
            self._livekit_failed(load_read, spec, current, generation)
        elif isinstance(load_read, BaseException):
            raise load_read
        else:
            load = load_read
            decision = self.policy.decide(time.monotonic(), load.room_count, current, spec.policy)
        if decision.changes:
            await self._apply(spec, decision)
        metrics.DECISION_DURATION.labels(**self.labels).observe(time.monotonic() - started)
        self._observed(load, decision, existing, ready)
        if load is None:
            return
        self._condition(
            Condition(LIVEKIT_REACHABLE, "True", "Reached", f"read {spec.livekit.url}"),
            generation,
            event="LiveKitReachable",
        )
        if spec.redispatch.enabled:
            await self._redispatch(spec, reader, load, ready)
        self._condition(Condition(READY, "True", "Scaling", decision.reason), generation, event="Ready")

    def _livekit_failed(self, error: Exception, spec: AutoscalerSpec, current: int, generation: int | None) -> None:
        reason = "Unreachable" if isinstance(error, LiveKitUnreachable) else "Rejected"
        metrics.ERRORS.labels(**self.labels, kind="livekit").inc()
        metrics.LIVEKIT_REACHABLE.labels(**self.labels).set(0)
        message = f"{spec.livekit.url}: {error}"
        changed = self._condition(
            Condition(LIVEKIT_REACHABLE, "False", reason, message), generation, event="LiveKitUnreachable"
        )
        self._condition(
            Condition(READY, "False", f"LiveKit{reason}", f"holding {current} replicas until LiveKit can be read"),
            generation,
        )
        log.log(
            logging.WARNING if changed else logging.DEBUG,
            "[%s/%s] LiveKit %s, holding %d replicas: %s",
            self.namespace,
            self.name,
            reason.lower(),
            current,
            error,
            extra=self.labels,
        )

    async def _apply(self, spec: AutoscalerSpec, decision: Decision) -> None:
        target = spec.target_ref.name
        try:
            await self.kube.patch(
                Deployment.Scale,
                target,
                {"spec": {"replicas": decision.desired}},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )
        except ApiError as exc:
            raise Blocked("ScaleFailed", f"cannot scale Deployment {target!r}: {exc.status.message}", "scale") from None
        verb = "ScaledUp" if decision.direction is Direction.UP else "ScaledDown"
        message = f"Deployment {target} {decision.current} -> {decision.desired}: {decision.reason}"
        metrics.SCALE_EVENTS.labels(**self.labels, direction=decision.direction.value).inc()
        kopf.event(self.body, type="Normal", reason=verb, message=message)
        self.status["lastScaleTime"] = now_rfc3339()
        self.status["lastScaleReason"] = message
        log.info("[%s/%s] %s", self.namespace, self.name, message, extra=self.labels)

    def _observed(self, load: Load | None, decision: Decision, existing: int, ready: int) -> None:
        if load is not None:
            self.status.update(
                observedRooms=load.room_count,
                observedParticipants=load.participants,
                agentlessRooms=len(load.agentless),
            )
            metrics.OBSERVED_ROOMS.labels(**self.labels).set(load.room_count)
            metrics.OBSERVED_PARTICIPANTS.labels(**self.labels).set(load.participants)
            metrics.AGENTLESS_ROOMS.labels(**self.labels).set(len(load.agentless))
            metrics.LIVEKIT_REACHABLE.labels(**self.labels).set(1)
        # Current: the worker pods the Deployment has now; they follow a new desired count within
        # a few seconds (or stay behind, e.g. unschedulable, which the gap then shows).
        self.status.update(desiredReplicas=decision.desired, currentReplicas=existing, readyReplicas=ready)
        metrics.DESIRED_REPLICAS.labels(**self.labels).set(decision.desired)
        metrics.CURRENT_REPLICAS.labels(**self.labels).set(existing)

    async def _redispatch(self, spec: AutoscalerSpec, reader: LiveKitLoadReader, load: Load, ready: int) -> None:
        now, grace = time.monotonic(), float(spec.redispatch.grace_seconds)
        self.planner.observe(load, now)
        for room in self.planner.due(load, now, grace, ready, spec.rooms_per_worker):
            try:
                dispatch_id = await reader.dispatch(spec.agent_name, room)
            except (LiveKitUnreachable, LiveKitRejected) as exc:
                metrics.ERRORS.labels(**self.labels, kind="dispatch").inc()
                log.warning(
                    "[%s/%s] dispatch to room %s failed: %s", self.namespace, self.name, room, exc, extra=self.labels
                )
                continue
            self.planner.dispatched(room, now)
            metrics.REDISPATCHES.labels(**self.labels).inc()
            message = f"agent {spec.agent_name!r} dispatched to room {room!r} ({dispatch_id}): its callers had no agent"
            kopf.event(self.body, type="Normal", reason="Redispatched", message=message)
            log.info("[%s/%s] %s", self.namespace, self.name, message, extra=self.labels)

    def _condition(self, condition: Condition, generation: int | None, event: str | None = None) -> bool:
        """Record a condition; True if its status changed, which posts `event` (once, not every tick)."""
        changed = self.conditions.set(condition, generation)
        if changed and event:
            kind = "Normal" if condition.status == "True" else "Warning"
            kopf.event(self.body, type=kind, reason=event, message=condition.message)
        return changed

    async def _write_status(self) -> None:
        status = {**self.status, "conditions": self.conditions.as_list()}
        if status == self.written:
            return
        try:
            await self.kube.patch(
                AgentAutoscalerResource.Status,
                self.name,
                {"status": status},
                namespace=self.namespace,
                patch_type=PatchType.MERGE,
            )
            self.written = status
        except ApiError as exc:
            if exc.status.code != 404:  # 404: deleted meanwhile, the daemon is about to stop
                metrics.ERRORS.labels(**self.labels, kind="status").inc()
                log.warning(
                    "[%s/%s] status not written: %s", self.namespace, self.name, exc.status.message, extra=self.labels
                )
        except Exception as exc:  # the API server itself unreachable: next tick tries again
            metrics.ERRORS.labels(**self.labels, kind="status").inc()
            log.warning("[%s/%s] status not written: %s", self.namespace, self.name, exc, extra=self.labels)

    async def close(self) -> None:
        metrics.forget(self.namespace, self.name)
        if self.reader is not None:
            await self.reader.aclose()

    async def release_finalizer(self) -> None:
        try:
            await release_finalizer(self.kube, self.namespace, self.name)
        except Exception as exc:  # the resource is gone, or the API server is, or we may not: nothing to do
            log.info("[%s/%s] finalizer left in place: %s", self.namespace, self.name, exc, extra=self.labels)


async def release_finalizer(kube: AsyncClient, namespace: str, name: str, attempts: int = 3) -> bool:
    """Take FINALIZER off an AgentAutoscaler; False if it had none. Raises ApiError (404: gone)."""
    for _ in range(attempts):
        # The server's view: kopf's copy of the body may lag behind its own finalizer patch.
        current = await kube.get(AgentAutoscalerResource, name, namespace=namespace)
        finalizers = list((current.metadata.finalizers if current.metadata else None) or [])
        if FINALIZER not in finalizers:
            return False
        index = finalizers.index(FINALIZER)
        # "test" first: remove this finalizer only if it is still at that index.
        patch = [
            {"op": "test", "path": f"/metadata/finalizers/{index}", "value": FINALIZER},
            {"op": "remove", "path": f"/metadata/finalizers/{index}"},
        ]
        try:
            await kube.patch(AgentAutoscalerResource, name, patch, namespace=namespace, patch_type=PatchType.JSON)
            return True
        except ApiError as exc:
            if exc.status.code != 422:  # 422: the finalizers changed meanwhile, read them again
                raise
    raise RuntimeError(f"the finalizers of AgentAutoscaler {namespace}/{name} keep changing")


def _api_reason(exc: ApiError) -> str:
    return "Forbidden" if exc.status.code == 403 else "KubernetesError"
