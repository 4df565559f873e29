"""`morgana-controller stop`: stop the controller while its permissions still exist.

The controller holds a finalizer on every AgentAutoscaler it serves and takes it off when it
exits. `helm uninstall` deletes a release's objects all at once, the controller's Role with
its Deployment, so a controller told to stop then can no longer take its finalizers off: the
AgentAutoscalers (and the namespace, if someone deletes it) would hang in Terminating. The
chart runs this command as a pre-delete hook, before Helm deletes anything:

1. scale the controller's Deployment to zero;
2. wait until its pods are gone (each takes its finalizers off on its way out);
3. take off the finalizers still left, by a controller that was not running or died, since
   no controller is coming back for them.

It never holds an uninstall up for long: after `timeout` it goes on to step 3 regardless, and
fails only if the Kubernetes API refuses it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType

from morgana_controller.operator import AgentAutoscalerResource, release_finalizer

log = logging.getLogger(__name__)


async def stop_controller(kube: AsyncClient, namespace: str, deployment: str, timeout: float, poll: float = 1.0) -> int:
    """Steps 1-3 above; returns how many finalizers step 3 had to take off."""
    selector = await _scale_to_zero(kube, namespace, deployment)
    if selector is not None:
        deadline = time.monotonic() + timeout
        while pods := [
            pod.metadata.name async for pod in kube.list(Pod, namespace=namespace, labels=selector) if pod.metadata
        ]:
            if time.monotonic() > deadline:
                log.warning("controller pods still there after %.0f s: %s", timeout, ", ".join(map(str, pods)))
                break
            await asyncio.sleep(poll)
        else:
            log.info("controller %s/%s stopped", namespace, deployment)
    released = 0
    async for autoscaler in kube.list(AgentAutoscalerResource, namespace=namespace):
        name = autoscaler.metadata.name if autoscaler.metadata else None
        if name and await _release(kube, namespace, name):
            released += 1
            log.warning("took the finalizer off AgentAutoscaler %s/%s (no controller did)", namespace, name)
    return released


async def _scale_to_zero(kube: AsyncClient, namespace: str, deployment: str) -> dict[str, Any] | None:
    """Scale the Deployment to zero; its pods' label selector, or None if it does not exist."""
    try:
        target = await kube.get(Deployment, deployment, namespace=namespace)
    except ApiError as exc:
        if exc.status.code == 404:
            log.info("no Deployment %s/%s: no controller to stop", namespace, deployment)
            return None
        raise
    await kube.patch(
        Deployment.Scale, deployment, {"spec": {"replicas": 0}}, namespace=namespace, patch_type=PatchType.MERGE
    )
    log.info("scaled %s/%s to 0", namespace, deployment)
    assert target.spec is not None
    return dict(target.spec.selector.matchLabels or {})


async def _release(kube: AsyncClient, namespace: str, name: str) -> bool:
    try:
        return await release_finalizer(kube, namespace, name)
    except ApiError as exc:
        if exc.status.code == 404:  # deleted meanwhile
            return False
        raise
