"""`morgana-controller`: the autoscaling operator (kopf), its liveness endpoint and its metrics.

Configured by the environment only (see ControllerSettings): WATCH_NAMESPACE (comma-separated
exact names; empty = every namespace), HEALTH_PORT (GET /healthz, 8080), METRICS_PORT
(GET /metrics, 9102), PEERING_NAME, PEERING_PRIORITY, PEERING_LIFETIME_SECONDS, POD_NAME,
LIVEKIT_TIMEOUT_SECONDS, LOG_LEVEL, LOG_FORMAT. Kubernetes credentials come from the pod's
service account in a cluster, else from $KUBECONFIG (or ~/.kube/config), so it runs from a
laptop as well. The CRDs (charts/morgana/crds/) must be installed before it starts.

Replicas take part in kopf peering on one KopfPeering object per watched namespace
(ClusterKopfPeering when cluster-wide; the chart creates it, else it is created here if
allowed): the live replica with the highest priority acts and the others stay paused, so two
replicas never both scale. A replica that exits says goodbye at once; one that dies is
skipped after PEERING_LIFETIME_SECONDS.

`morgana-controller stop --deployment NAME` stops a controller for good before its RBAC goes
away (the chart's pre-delete hook; see morgana_controller.stop).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import kopf
import prometheus_client
from lightkube import AsyncClient, KubeConfig
from lightkube.core.exceptions import ApiError, ConfigError
from lightkube.generic_resource import (
    GenericGlobalResource,
    GenericNamespacedResource,
    create_global_resource,
    create_namespaced_resource,
)
from lightkube.models.meta_v1 import ObjectMeta

from morgana.core.logging import configure_logging
from morgana_controller.config import ControllerSettings, get_settings
from morgana_controller.operator import FINALIZER, Runtime  # importing it registers the kopf handlers

if TYPE_CHECKING:
    # kopf types `identity` with this NewType (a str at run time), which it does not export.
    from kopf._core.engines.peering import Identity

log = logging.getLogger("morgana_controller")

KopfPeering = create_namespaced_resource("kopf.dev", "v1", "KopfPeering", "kopfpeerings")
ClusterKopfPeering = create_global_resource("kopf.dev", "v1", "ClusterKopfPeering", "clusterkopfpeerings")
FIELD_MANAGER = "morgana-controller"


class StartupError(Exception):
    pass


class KopfRecordFilter(logging.Filter):
    """kopf hangs its settings object (not JSON-serialisable) and bookkeeping flags on the log records
    of its object loggers: drop those, and keep the object reference as `object`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("settings", None)
        record.__dict__.pop("k8s_skip", None)
        if (ref := record.__dict__.pop("k8s_ref", None)) is not None:
            record.object = ref
        return True


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf connects with the credentials lightkube uses: in a pod the API server named by
    KUBERNETES_SERVICE_HOST/PORT (kopf's own in-cluster login assumes cluster DNS for
    kubernetes.default.svc) and the pod's token, else $KUBECONFIG or ~/.kube/config. kopf logs in
    again on a 401, which re-reads a rotated token."""
    config = KubeConfig.from_env().get()
    if config is None:
        raise kopf.LoginError("the kubeconfig names no current context")
    cluster, user = config.cluster, config.user
    if user is not None and (user.exec or user.auth_provider):  # credential plugins: kopf's kubeconfig login
        return kopf.login_with_kubeconfig(**kwargs)
    token = None
    if user is not None:
        token = Path(config.abs_file(user.token_file)).read_text().strip() if user.token_file else user.token

    def path(name: str | None) -> str | None:
        return str(config.abs_file(name)) if name else None

    return kopf.ConnectionInfo(
        server=cluster.server,
        insecure=cluster.insecure,
        default_namespace=config.namespace,
        ca_path=path(cluster.certificate_auth),
        ca_data=cluster.certificate_auth_data,
        scheme="Bearer" if token else None,
        token=token,
        username=user.username if user else None,
        password=user.password if user else None,
        certificate_path=path(user.client_cert if user else None),
        certificate_data=user.client_cert_data if user else None,
        private_key_path=path(user.client_key if user else None),
        private_key_data=user.client_key_data if user else None,
    )


def operator_settings(settings: ControllerSettings, identity: str | None) -> kopf.OperatorSettings:
    config = kopf.OperatorSettings()
    # Serve the CRDs found at start-up; no CRD or Namespace watching, hence no cluster-wide RBAC
    # in namespaced mode.
    config.scanning.disabled = True
    config.peering.lifetime = settings.peering_lifetime_seconds
    config.persistence.finalizer = FINALIZER
    config.posting.reporting_component = FIELD_MANAGER
    if identity:
        config.posting.reporting_instance = identity
    # Watches are re-opened regularly, so a silently dropped connection cannot stall a replica.
    config.watching.server_timeout = 300
    config.watching.client_timeout = 330
    return config


async def ensure_peering_objects(kube: AsyncClient, settings: ControllerSettings, wait: float = 60.0) -> None:
    """kopf never creates its peering object, and a keep-alive it could not write is written again only
    a lifetime later. The chart creates the object (so that `helm uninstall` deletes it) and grants no
    `create`: wait for it, as Helm may create it a moment after this pod. Without the chart, create it."""
    targets: list[GenericGlobalResource | GenericNamespacedResource]
    if settings.clusterwide:
        targets = [ClusterKopfPeering(metadata=ObjectMeta(name=settings.peering_name))]
    else:
        targets = [
            KopfPeering(metadata=ObjectMeta(name=settings.peering_name, namespace=ns)) for ns in settings.namespaces
        ]
    for peering in targets:
        meta = peering.metadata
        where = f"namespace {meta.namespace}" if meta and meta.namespace else "the cluster"
        if await _exists(kube, peering):
            continue
        try:
            await kube.create(peering)
            log.info("created the peering object %s in %s", settings.peering_name, where)
        except Exception as exc:
            # An unknown resource gets a plain-text 404, which lightkube raises as a bare HTTP error.
            code = (
                exc.status.code
                if isinstance(exc, ApiError)
                else getattr(getattr(exc, "response", None), "status_code", None)
            )
            if code == 409:
                continue
            if (
                code == 404
                and isinstance(exc, ApiError)
                and exc.status.details
                and exc.status.details.kind == "namespaces"
            ):
                raise StartupError(f"WATCH_NAMESPACE names {where}, which does not exist") from None
            if code == 404:
                kind = type(peering).__name__
                raise StartupError(f"the {kind} CRD is not installed (kubectl apply -f charts/morgana/crds/)") from None
            if code == 403:
                log.info(
                    "the peering object %s in %s does not exist yet and is not ours to create: waiting for it",
                    settings.peering_name,
                    where,
                )
                await _wait_for(kube, peering, where, wait)
                continue
            raise


async def _wait_for(kube: AsyncClient, peering: Any, where: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await _exists(kube, peering):
        if time.monotonic() > deadline:
            raise StartupError(
                f"the peering object {peering.metadata.name} in {where} does not exist and may not "
                "be created here (the chart creates it; or grant `create` on its kind)"
            )
        await asyncio.sleep(1.0)


async def _exists(kube: AsyncClient, peering: Any) -> bool:
    """Whether the peering object is there: listed, as the controller may list but not get it."""
    try:
        async for _ in kube.list(
            type(peering), namespace=peering.metadata.namespace, fields={"metadata.name": peering.metadata.name}
        ):
            return True
    except Exception:  # no such CRD, or no access: creating it says what is wrong
        return False
    return False


async def run(settings: ControllerSettings) -> None:
    try:
        kube = AsyncClient(config=KubeConfig.from_env(), field_manager=FIELD_MANAGER)
    except ConfigError as exc:
        raise StartupError(f"no Kubernetes credentials: {exc}") from None
    identity = cast("Identity | None", settings.pod_name or None)
    priority = settings.peering_priority if settings.peering_priority is not None else random.randint(1, 2**30)
    try:
        await ensure_peering_objects(kube, settings)
        log.info(
            "starting: %s, peering %s at priority %d",
            "cluster-wide" if settings.clusterwide else f"namespaces {','.join(settings.namespaces)}",
            settings.peering_name,
            priority,
        )
        await kopf.operator(
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            peering_name=settings.peering_name,
            priority=priority,
            identity=identity,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
            settings=operator_settings(settings, identity),
            memo=kopf.Memo(runtime=Runtime(kube=kube, settings=settings)),
        )
    finally:
        await kube.close()


async def stop(namespace: str | None, deployment: str, timeout: float) -> None:
    from morgana_controller.stop import stop_controller

    try:
        kube = AsyncClient(config=KubeConfig.from_env(), field_manager=FIELD_MANAGER)
    except ConfigError as exc:
        raise StartupError(f"no Kubernetes credentials: {exc}") from None
    try:
        await stop_controller(kube, namespace or kube.namespace, deployment, timeout)
    finally:
        await kube.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="morgana-controller",
        description="Scales Morgana's voice agent workers from LiveKit room load (AgentAutoscaler resources). "
        "Configured by environment variables: WATCH_NAMESPACE, HEALTH_PORT, METRICS_PORT, "
        "PEERING_NAME, PEERING_PRIORITY, PEERING_LIFETIME_SECONDS, POD_NAME, LIVEKIT_TIMEOUT_SECONDS, "
        "LOG_LEVEL, LOG_FORMAT, KUBECONFIG.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{run,stop}")
    commands.add_parser("run", help="run the controller (the default)")
    stop_parser = commands.add_parser(
        "stop",
        help="scale a controller Deployment to zero and release the finalizers it held (the chart's pre-delete hook)",
    )
    stop_parser.add_argument("--deployment", required=True, help="the controller's Deployment")
    stop_parser.add_argument("--namespace", help="its namespace (default: the pod's, or the kubeconfig's)")
    stop_parser.add_argument(
        "--timeout",
        type=float,
        default=90.0,
        help="seconds to wait for its pods to exit before releasing the finalizers anyway",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    # lightkube's HTTP client logs every request at INFO (several per autoscaler per second), and
    # aiohttp every liveness probe.
    for noisy in ("httpx2", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(KopfRecordFilter())
    try:
        if args.command == "stop":
            asyncio.run(stop(args.namespace, args.deployment, args.timeout))
            return
        if settings.metrics_port:
            prometheus_client.start_http_server(settings.metrics_port)
        asyncio.run(run(settings))
    except StartupError as exc:
        print(f"morgana-controller: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
