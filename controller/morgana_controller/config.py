"""Settings of the autoscaling controller, from the environment and `.env`."""

from functools import lru_cache

from pydantic import Field

from morgana.core.settings import CoreSettings


class ControllerSettings(CoreSettings):
    # Comma-separated namespaces to watch; empty means every namespace (cluster-wide RBAC).
    watch_namespace: str = ""
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="Prometheus /metrics; 0 turns it off.")
    health_port: int = Field(default=8080, ge=0, le=65535, description="kopf's liveness /healthz; 0 turns it off.")
    # Name of the KopfPeering (namespaced) or ClusterKopfPeering (cluster-wide) object the replicas share.
    peering_name: str = "morgana-controller"
    # The active replica is the live peer with the highest priority; unset, each process draws a
    # random one, so two replicas never tie (kopf pauses every peer of a tie).
    peering_priority: int | None = Field(default=None, ge=0)
    # How long a peer that died without saying goodbye still blocks the others (kopf keep-alive).
    peering_lifetime_seconds: int = Field(default=30, ge=5)
    # This process's name among the peers and on its Events (the chart sets it from the pod name).
    pod_name: str | None = None
    # Timeout of one LiveKit API call; a tick never waits longer than this for LiveKit.
    livekit_timeout_seconds: float = Field(default=3.0, gt=0)

    @property
    def namespaces(self) -> list[str]:
        return [ns.strip() for ns in self.watch_namespace.split(",") if ns.strip()]

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


@lru_cache
def get_settings() -> ControllerSettings:
    return ControllerSettings()
