"""A kubelet for the pods a test picks: their containers run as podman containers of the real images.

KubeApiServer runs no kubelet, so its Pods stay Pending. `PodmanKubelet` plays a node's part for
the pods its `select` accepts, as a kubelet does:

- binds each to its node, so that deleting it is graceful (the API server deletes unbound pods
  at once);
- starts its container (tests/images/containers.py) with the environment built from the API
  server's ConfigMaps and Secrets and the API server's address in KUBERNETES_SERVICE_HOST/PORT,
  and fills the service-account volume the API server added (unless automountServiceAccountToken
  is false) with a token from the TokenRequest API, the CA and the namespace;
- reports it Running and Ready (probes are not run), then Succeeded or Failed once a container
  that is not restarted exits, and restarts one whose restartPolicy is Always;
- when the pod is deleted, stops its container within the grace period (SIGTERM, then SIGKILL)
  and only then removes the pod object.

One container per pod, as in every pod of the chart. Stopped containers are kept, with their
logs and exit codes, until `stop()`.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from morgana_devtools.kube_apiserver import KubeApiServer, KubeClient
from tests.chart.helm import resolve_env
from tests.images.containers import Container

NODE = "podman-node"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodmanKubelet(threading.Thread):
    def __init__(self, kube: KubeApiServer, select: Callable[[dict], bool], workdir: Path) -> None:
        super().__init__(daemon=True, name="podman-kubelet")
        self.kube = kube
        self.client = KubeClient(kube)
        self.select = select
        self.workdir = workdir
        self.containers: dict[str, Container] = {}  # pod uid -> its container
        self.pods: dict[str, dict] = {}  # pod uid -> the pod as first seen
        self.stopping: set[str] = set()
        self.errors: list[str] = []
        self.halt = threading.Event()

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        while not self.halt.wait(0.25):
            try:
                pods = self.client.get("/api/v1/pods")["items"]
            except (httpx.HTTPError, AssertionError):
                continue
            for pod in pods:
                if self.select(pod):
                    try:
                        self._sync(pod)
                    except Exception as exc:  # keep serving the other pods; the test reads `errors`
                        self.errors.append(f"{pod['metadata']['name']}: {type(exc).__name__}: {exc}")

    def _sync(self, pod: dict) -> None:
        meta, uid = pod["metadata"], pod["metadata"]["uid"]
        if meta.get("deletionTimestamp"):
            if uid not in self.stopping:
                self.stopping.add(uid)
                threading.Thread(target=self._terminate, args=(pod,), daemon=True).start()
            return
        container = self.containers.get(uid)
        if container is None:
            if pod["status"].get("phase", "Pending") == "Pending":
                self._start(pod)
            return
        if container.running:
            return
        code = container.exit_code()
        policy = pod["spec"].get("restartPolicy", "Always")
        if policy == "Always" or (policy == "OnFailure" and code != 0):
            time.sleep(1)  # a short crash-loop back-off
            container.start_again()
            self._report_running(pod, container)
        elif pod["status"].get("phase") not in ("Succeeded", "Failed"):
            self._report_exited(pod, code)

    # --- what a kubelet does --------------------------------------------------------------------

    def _start(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        namespace, name = meta["namespace"], meta["name"]
        base = f"/api/v1/namespaces/{namespace}/pods/{name}"
        if not spec.get("nodeName"):
            self.client.create(
                f"{base}/binding",
                {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
                },
            )
        (container_spec,) = spec["containers"]
        fields = {
            "metadata.name": name,
            "metadata.namespace": namespace,
            "spec.nodeName": NODE,
            "status.podIP": "127.0.0.1",
            "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        }
        objects = [
            *(
                {"kind": "ConfigMap", **o}
                for o in self.client.get(f"/api/v1/namespaces/{namespace}/configmaps")["items"]
            ),
            *({"kind": "Secret", **o} for o in self.client.get(f"/api/v1/namespaces/{namespace}/secrets")["items"]),
        ]
        env = resolve_env(container_spec, objects, fields)
        env |= {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.kube.port)}
        # The API server's admission adds the token volume unless automountServiceAccountToken is false.
        volumes = {
            volume["name"]: self._token_dir(pod)
            for volume in spec.get("volumes", [])
            if any("serviceAccountToken" in source for source in volume.get("projected", {}).get("sources", []))
        }
        container = Container.from_pod(
            spec,
            container_spec,
            image=container_spec["image"],
            env=env,
            workdir=self.workdir,
            name=f"k8s-{namespace}-{name}",
            volumes=volumes,
        )
        self.containers[meta["uid"]] = container
        self.pods[meta["uid"]] = pod
        container.start()
        self._report_running(pod, container)

    def _token_dir(self, pod: dict) -> Path:
        meta = pod["metadata"]
        directory = self.workdir / f"{meta['uid']}-serviceaccount"
        directory.mkdir(parents=True, exist_ok=True)
        token = self.client.service_account_token(meta["namespace"], pod["spec"].get("serviceAccountName", "default"))
        for file, content in (
            ("token", token),
            ("ca.crt", self.kube.ca_file.read_text()),
            ("namespace", meta["namespace"]),
        ):
            (directory / file).write_text(content)
            (directory / file).chmod(0o644)
        directory.chmod(0o755)
        return directory

    def _terminate(self, pod: dict) -> None:
        meta = pod["metadata"]
        container = self.containers.get(meta["uid"])
        grace = meta.get("deletionGracePeriodSeconds", pod["spec"].get("terminationGracePeriodSeconds", 30))
        try:
            if container is not None and container.running:
                container.stop(grace)
            self.client.request(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                ok=(200, 404, 409),
            )
        except Exception as exc:
            self.errors.append(f"{meta['name']}: stopping: {type(exc).__name__}: {exc}")

    def _patch_status(self, pod: dict, status: dict) -> None:
        meta = pod["metadata"]
        self.client.request(
            "PATCH",
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            {"status": status},
            merge=True,
            ok=(200, 404),
        )

    def _report_running(self, pod: dict, container: Container) -> None:
        at = now()
        conditions = [
            {"type": kind, "status": "True", "lastTransitionTime": at}
            for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]
        self._patch_status(
            pod,
            {
                "phase": "Running",
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": at,
                "conditions": conditions,
                "containerStatuses": [
                    {
                        "name": pod["spec"]["containers"][0]["name"],
                        "ready": True,
                        "started": True,
                        "restartCount": container.restarts,
                        "image": pod["spec"]["containers"][0]["image"],
                        "imageID": "",
                        "state": {"running": {"startedAt": at}},
                    }
                ],
            },
        )

    def _report_exited(self, pod: dict, code: int | None) -> None:
        at = now()
        conditions = [
            {"type": kind, "status": "False", "lastTransitionTime": at, "reason": "PodCompleted"}
            for kind in ("ContainersReady", "Ready")
        ]
        self._patch_status(
            pod,
            {
                "phase": "Succeeded" if code == 0 else "Failed",
                "conditions": conditions,
                "containerStatuses": [
                    {
                        "name": pod["spec"]["containers"][0]["name"],
                        "ready": False,
                        "started": False,
                        "restartCount": 0,
                        "image": pod["spec"]["containers"][0]["image"],
                        "imageID": "",
                        "state": {
                            "terminated": {
                                "exitCode": code,
                                "reason": "Completed" if code == 0 else "Error",
                                "finishedAt": at,
                            }
                        },
                    }
                ],
            },
        )

    # --- for tests -----------------------------------------------------------------------------

    def container(self, component: str) -> Container:
        """The container of the one pod labelled app.kubernetes.io/component=`component`."""
        found = [
            self.containers[uid]
            for uid, pod in self.pods.items()
            if pod["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        ]
        assert len(found) == 1, f"{component}: {[p['metadata']['name'] for p in self.pods.values()]}"
        return found[0]

    def logs(self) -> str:
        return "\n".join(
            f"--- {self.pods[uid]['metadata']['name']}\n{c.logs()[-4000:]}" for uid, c in self.containers.items()
        )

    def stop(self) -> None:
        self.halt.set()
        self.join(10)
        for container in self.containers.values():
            container.remove()
