"""Keep this worker's pod annotation `controller.kubernetes.io/pod-deletion-cost` equal to its calls.

On scale-down a ReplicaSet deletes, among otherwise equal pods (all Running and Ready), those with
the lowest deletion cost first. Each worker writes its own active job (call) count there, so the
autoscaler's scale-down removes idle workers and never one that is serving a call while an idle
one exists. It is on when `POD_NAME` and `POD_NAMESPACE` are set (the chart sets both through the
downward API) and off otherwise (local runs).

How it works, in the worker's main process (the job processes know nothing of it):

- The number written is `len(server.active_jobs)`, the same count LiveKit sees as load: a job
  counts from its launch on a process until that process has exited.
- A task on the worker's event loop reads that count every `poll_interval` (0.5 s, a list
  comprehension over a handful of processes) and is woken at once by the process pool's
  `process_job_launched` / `process_closed` events when they exist. The events make it prompt; the
  poll makes it level-triggered, so a missed or renamed event (they are livekit-agents internals)
  costs at most `poll_interval`, never a wrong value.
- A change waits `debounce` seconds before it is written, so a burst of calls starting or ending
  together becomes one PATCH of the final count. One task writes, so writes never reorder.
- Writes are merge-PATCHes through lightkube's async client (credentials: the in-cluster service
  account, else `KUBECONFIG`; built in a thread so no file or TLS setup blocks the loop). A failed
  write is logged, counted in `morgana_agent_pod_cost_errors_total` (morgana.agent.metrics), and retried on the next
  change of the count or after a backoff (1 s doubling up to 30 s), whichever comes first; nothing
  here can raise into the worker.
- On SIGTERM the worker drains: the loop keeps running, so the count follows the calls down to 0.
  When livekit-agents cancels the remaining tasks at exit, a last write (bounded to 2 s) is made
  if the annotation is still behind.

RBAC: the worker's ServiceAccount needs, in its own namespace only, a Role with

    - apiGroups: [""]
      resources: ["pods"]
      verbs: ["patch"]

and a RoleBinding to it: no reading pods, no list, watch, delete or cluster scope. At start-up a
dry-run PATCH (nothing written) reports a wrong `POD_NAME` or a missing permission clearly, with
the HTTP status, before any call arrives. RBAC cannot narrow `patch` to one pod and one
annotation; the chart's ValidatingAdmissionPolicy (templates/agent/pod-cost-policy.yaml) does,
for the pod the worker's service-account token is bound to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from morgana.agent import metrics

if TYPE_CHECKING:
    from livekit.agents import AgentServer

log = logging.getLogger("morgana.agent.pod_cost")

COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
FIELD_MANAGER = "morgana-agent"
# livekit-agents' process pool events around a job (internal: only used to wake up early).
_POOL_EVENTS = ("process_job_launched", "process_closed")


def _describe(exc: BaseException) -> dict[str, Any]:
    """Log fields for a failure: the API's status code and message when there is one."""
    status = getattr(exc, "status", None)
    code = getattr(status, "code", None)
    if code is not None:
        return {"error": type(exc).__name__, "status_code": code, "reason": getattr(status, "message", None)}
    return {"error": type(exc).__name__, "reason": str(exc) or repr(exc)}


class PodDeletionCost:
    """Writes `count()` into the pod's deletion-cost annotation whenever it changes.

    `attach(server)` wires it to an AgentServer (started with the worker). `run(count)` is the
    loop itself, for any source of a count.
    """

    def __init__(
        self,
        pod_name: str,
        namespace: str,
        *,
        debounce: float = 0.2,
        poll_interval: float = 0.5,
        retry_backoff: float = 1.0,
        max_retry_backoff: float = 30.0,
        request_timeout: float = 5.0,
        final_write_timeout: float = 2.0,
    ) -> None:
        self.pod_name = pod_name
        self.namespace = namespace
        self.debounce = debounce
        self.poll_interval = poll_interval
        self.retry_backoff = retry_backoff
        self.max_retry_backoff = max_retry_backoff
        self.request_timeout = request_timeout
        self.final_write_timeout = final_write_timeout
        self.written: int | None = None  # the value the API server last accepted
        self.writes = 0  # successful PATCHes
        self.failures = 0  # failed reads or writes since the last success
        self._client: Any = None
        self._pod_type: Any = None  # lightkube's Pod and PatchType.MERGE, imported off the loop
        self._merge_patch: Any = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- wiring --------------------------------------------------------------------------------

    def attach(self, server: AgentServer) -> None:
        """Start with the worker: its loop, its job count, its process pool's job events."""

        def started() -> None:
            pool = getattr(server, "_proc_pool", None)
            if pool is not None and callable(getattr(pool, "on", None)):
                for event in _POOL_EVENTS:
                    pool.on(event, self.notify)
            self._task = asyncio.get_running_loop().create_task(
                self.run(lambda: len(server.active_jobs)), name="pod_deletion_cost"
            )

        server.on("worker_started", started)

    def notify(self, *_: object) -> None:
        """Something changed: look at the count now rather than at the next poll."""
        if self._wake is not None:
            self._wake.set()

    # -- the loop ------------------------------------------------------------------------------

    async def run(self, count: Callable[[], int]) -> None:
        """Until cancelled: keep the annotation equal to `count()`; never raises but on cancel."""
        self._wake = asyncio.Event()
        metrics.POD_COST_ERRORS.inc(0)  # exported from the start (created after the worker's metrics reset)
        log.info(
            "keeping the pod deletion cost equal to the active calls",
            extra={"pod": self.pod_name, "namespace": self.namespace},
        )
        attempted: int | None = None
        retry_at = 0.0
        try:
            while True:
                self._wake.clear()  # before reading: a job event from here on is not lost
                try:
                    target = count()
                    if target != self.written and (target != attempted or time.monotonic() >= retry_at):
                        if self.written is not None and self.debounce > 0:
                            await asyncio.sleep(self.debounce)  # let a burst settle: one PATCH
                            target = count()
                        if target != self.written:
                            attempted = target
                            if not await self._write(target):
                                backoff = self.retry_backoff * 2 ** (self.failures - 1)
                                retry_at = time.monotonic() + min(self.max_retry_backoff, backoff)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug here must not take calls down with it
                    metrics.POD_COST_ERRORS.inc()
                    log.exception("pod deletion cost loop failed; continuing")
                    await asyncio.sleep(self.poll_interval)
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            await self._final_write(count)
            raise
        finally:
            await self._close()

    async def _final_write(self, count: Callable[[], int]) -> None:
        """At exit: one bounded last write if the annotation is behind (e.g. the last call just ended)."""
        try:
            target = count()
            if target != self.written:
                log.info("exiting: a last pod deletion cost write", extra={"cost": target})
                await asyncio.wait_for(self._write(target), self.final_write_timeout)
        except BaseException as exc:
            log.warning("last pod deletion cost write skipped", extra=_describe(exc))

    # -- the API -------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        """In a thread: lightkube's imports (~0.5 s), the kubeconfig or service account, TLS setup."""
        import httpx2
        from lightkube import AsyncClient, KubeConfig
        from lightkube.resources.core_v1 import Pod
        from lightkube.types import PatchType

        self._pod_type, self._merge_patch = Pod, PatchType.MERGE
        return AsyncClient(
            KubeConfig.from_env(),
            namespace=self.namespace,
            field_manager=FIELD_MANAGER,
            timeout=httpx2.Timeout(self.request_timeout),
        )

    async def _connect(self) -> Any:
        if self._client is None:
            client = await asyncio.to_thread(self._make_client)
            try:  # a write the server checks (RBAC, admission) and discards: the pod may not be read
                await client.patch(
                    self._pod_type,
                    self.pod_name,
                    self._body(0),
                    namespace=self.namespace,
                    patch_type=self._merge_patch,
                    dry_run=True,
                )
            except BaseException:
                await client.close()
                raise
            log.info(
                "pod deletion cost: pod found and writable", extra={"pod": self.pod_name, "namespace": self.namespace}
            )
            self._client = client
        return self._client

    @staticmethod
    def _body(cost: int) -> dict[str, Any]:
        return {"metadata": {"annotations": {COST_ANNOTATION: str(cost)}}}

    async def _write(self, cost: int) -> bool:
        """PATCH the annotation to `cost`; True on success. Failures are logged and counted."""
        try:
            client = await self._connect()
            await client.patch(
                self._pod_type, self.pod_name, self._body(cost), namespace=self.namespace, patch_type=self._merge_patch
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failures += 1
            metrics.POD_COST_ERRORS.inc()
            log.warning(
                "could not set the pod deletion cost; will retry",
                extra={
                    "pod": self.pod_name,
                    "namespace": self.namespace,
                    "cost": cost,
                    "failures": self.failures,
                    **_describe(exc),
                },
            )
            return False
        if self.failures:
            log.info("pod deletion cost set again after failures", extra={"failures": self.failures})
        self.failures = 0
        self.written = cost
        self.writes += 1
        log.info("pod deletion cost set", extra={"pod": self.pod_name, "cost": cost})
        return True

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except BaseException:
                pass
