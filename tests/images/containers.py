"""The project's images, built from their Dockerfiles and run as containers the way Kubernetes runs
a pod's container: podman (scripts/podman.sh), no Docker engine.

`build_images()` runs scripts/build-images.sh. `Container.from_pod(...)` turns a container of a
pod spec (as `helm template` renders it, or as the API server stores it) into `podman run`:
its image, command and args; the user, read-only root, dropped capabilities and no privilege
escalation of its security contexts; an empty, world-writable host directory for each
emptyDir (as the kubelet makes them), and host directories for other volumes; and the
environment the kubelet would give it, passed by name so that no secret appears on a command line.

Every container shares the host's network (the test services listen on 127.0.0.1), so unlike
pods they share ports: callers move a port the chart fixes to a free one where two could meet.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from morgana_devtools.services import eventually

ROOT = Path(__file__).resolve().parents[2]
PODMAN = ["bash", str(ROOT / "scripts" / "podman.sh")]
IMAGE_TAG = "test"
COMPONENTS = ("api", "agent", "controller")


def podman(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@dataclass(frozen=True)
class BuiltImages:
    refs: dict[str, str]  # component -> localhost/morgana-<component>:test
    sizes: dict[str, int]  # component -> bytes
    seconds: float


def build_images(tag: str = IMAGE_TAG) -> BuiltImages:
    """The three images, built (or found unchanged in podman's layer cache) by scripts/build-images.sh."""
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-images.sh"), *COMPONENTS],
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "IMAGE_TAG": tag},
    )
    if result.returncode != 0:
        raise AssertionError(f"scripts/build-images.sh failed ({result.returncode}):\n{result.stderr[-6000:]}")
    lines = [line.split() for line in result.stdout.strip().splitlines()[-len(COMPONENTS) :]]
    refs = {component: ref for component, (ref, _) in zip(COMPONENTS, lines, strict=True)}
    assert refs == {c: f"localhost/morgana-{c}:{tag}" for c in COMPONENTS}, result.stdout
    sizes = {component: int(size) for component, (_, size) in zip(COMPONENTS, lines, strict=True)}
    return BuiltImages(refs, sizes, time.monotonic() - started)


def image_config(ref: str) -> dict:
    """The image's OCI config: User, Entrypoint, Cmd, Env, ExposedPorts, ..."""
    return json.loads(podman("image", "inspect", ref).stdout)[0]["Config"]


def run_in_image(ref: str, *command: str) -> subprocess.CompletedProcess[str]:
    """A one-off command in a throwaway container of the image (its own entry point bypassed)."""
    return podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        json.dumps(list(command[:1])),
        ref,
        *command[1:],
        check=False,
    )


def security_args(pod_spec: dict, container: dict) -> list[str]:
    """What the pod's and container's security contexts ask of the runtime."""
    context = {**pod_spec.get("securityContext", {}), **container.get("securityContext", {})}
    args: list[str] = []
    if (user := context.get("runAsUser")) is not None:
        group = context.get("runAsGroup")
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if (fs_group := pod_spec.get("securityContext", {}).get("fsGroup")) is not None:
        args += ["--group-add", str(fs_group)]  # the kubelet adds fsGroup to the process's groups
    if context.get("readOnlyRootFilesystem"):
        args.append("--read-only")
    args.append("--read-only-tmpfs=false")  # podman's extra writable /tmp, /run: a pod has none
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for capability in context.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability.lower()]
    return args


@dataclass
class Container:
    """One `podman run --detach`, named uniquely; logs and state through podman."""

    name: str
    args: list[str]
    env: dict[str, str]
    started: bool = False
    restarts: int = 0
    volumes: list[Path] = field(default_factory=list)

    @classmethod
    def from_pod(
        cls,
        pod_spec: dict,
        container: dict,
        *,
        image: str,
        env: dict[str, str],
        workdir: Path,
        name: str | None = None,
        volumes: dict[str, Path] | None = None,
    ) -> Container:
        """`container` of `pod_spec` as the kubelet would run it. Each emptyDir is a fresh host
        directory; `volumes` gives the host directory of any other volume, by name (read-only)."""
        name = name or f"morgana-test-{container['name']}-{uuid.uuid4().hex[:8]}"
        declared = {v["name"]: v for v in pod_spec.get("volumes", [])}
        args = [
            "run",
            "--detach",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            "host",
            "--log-driver",
            "k8s-file",
            *security_args(pod_spec, container),
        ]
        made: list[Path] = []
        for mount in container.get("volumeMounts", []):
            if "emptyDir" in declared[mount["name"]]:
                directory = workdir / f"{name}-{mount['name']}"
                directory.mkdir(parents=True, exist_ok=True)
                directory.chmod(0o777)  # as the kubelet makes an emptyDir
                made.append(directory)
                args += ["--volume", f"{directory}:{mount['mountPath']}"]
            else:
                assert mount["name"] in (volumes or {}), f"no host directory for volume {declared[mount['name']]}"
                args += ["--volume", f"{(volumes or {})[mount['name']]}:{mount['mountPath']}:ro"]
        for key in env:
            args += ["--env", key]  # the value comes from podman's environment: never on a command line
        if command := container.get("command"):
            args += ["--entrypoint", json.dumps(command)]
        args += [image, *container.get("args", [])]
        return cls(name, args, dict(env), volumes=made)

    def start(self) -> Container:
        podman(*self.args, env=self.env)
        self.started = True
        return self

    def start_again(self) -> None:
        """Restart the exited container, as a kubelet does under restartPolicy Always."""
        podman("start", self.name)
        self.restarts += 1

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    @property
    def running(self) -> bool:
        return bool(self.state()["Running"])

    def exit_code(self) -> int | None:
        state = self.state()
        return None if state["Running"] else int(state["ExitCode"])

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def wait(self, timeout: float) -> int:
        """Its exit code once it has exited; AssertionError (with its logs) after `timeout`."""
        eventually(
            lambda: not self.running, timeout, interval=0.2, what=lambda: f"{self.name} exited\n{self.logs()[-6000:]}"
        )
        code = self.exit_code()
        assert code is not None
        return code

    def stop(self, grace: float = 30) -> int:
        """SIGTERM, then SIGKILL after `grace` seconds, as the kubelet stops a container; its exit code."""
        podman("stop", "--time", str(int(grace)), self.name, timeout=grace + 60)
        code = self.exit_code()
        assert code is not None
        return code

    def remove(self) -> None:
        if self.started:
            podman("rm", "--force", "--time", "0", self.name, check=False)
            self.started = False

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.remove()
