"""Running the real helm binary on charts/morgana, and reading what it renders."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import yaml

from morgana_devtools.kube_apiserver import KUBERNETES_VERSION, ensure_binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "morgana"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
DEFAULT_VALUES = CHART / "ci" / "default-values.yaml"


@cache
def helm_binary() -> Path:
    return ensure_binaries()["helm"]


def helm(
    *args: str | Path, kubeconfig: Path | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    command = [str(helm_binary()), *map(str, args)]
    if kubeconfig:
        command += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result


def value_args(values: Iterable[Path] = (), sets: Iterable[str] = ()) -> list[str]:
    args: list[str] = []
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    return args


def template(
    values: Iterable[Path] = (DEFAULT_VALUES,),
    sets: Iterable[str] = (),
    *,
    release: str = "morgana",
    namespace: str = "voice",
    check: bool = True,
    extra: Iterable[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`helm template` as the API server version the tests run (what `helm install` would see)."""
    return helm(
        "template",
        release,
        CHART,
        "--namespace",
        namespace,
        "--kube-version",
        KUBERNETES_VERSION,
        *value_args(values, sets),
        *extra,
        check=check,
    )


def render(values: Iterable[Path] = (DEFAULT_VALUES,), sets: Iterable[str] = (), **kwargs) -> list[dict]:
    """Every object `helm template` renders (CRDs included, test hooks included)."""
    output = template(values, sets, extra=["--include-crds"], **kwargs).stdout
    return [doc for doc in yaml.safe_load_all(output) if doc]


def find(objects: list[dict], kind: str, name_suffix: str = "") -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, f"expected one {kind} *{name_suffix}, got {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def pod_specs(objects: list[dict]) -> Iterator[tuple[dict, dict]]:
    """(object, pod spec) for everything that runs containers."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "Job"):
            yield obj, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "Pod":
            yield obj, obj["spec"]


def secret_values(objects: list[dict], extra: dict[str, dict[str, str]] | None = None) -> dict[str, dict[str, str]]:
    """{secret name: {key: decoded value}} for the rendered Secrets plus `extra` ones."""
    secrets = {
        o["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in (o.get("data") or {}).items()}
        for o in objects
        if o["kind"] == "Secret"
    }
    return secrets | (extra or {})


def config_maps(objects: list[dict]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data") or {} for o in objects if o["kind"] == "ConfigMap"}


def env_names(container: dict, objects: list[dict]) -> set[str]:
    """Every variable a container gets: its envFrom ConfigMaps' keys and its env entries."""
    maps = config_maps(objects)
    names = {e["name"] for e in container.get("env", [])}
    for source in container.get("envFrom", []):
        names |= set(maps[source["configMapRef"]["name"]])
    return names


def resolve_env(
    container: dict,
    objects: list[dict],
    fields: dict[str, str] | None = None,
    extra_secrets: dict[str, dict[str, str]] | None = None,
) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then env entries
    (secretKeyRef, fieldRef, $(VAR) expansion of earlier entries), from the rendered objects."""
    secrets = secret_values(objects, extra_secrets)
    maps = config_maps(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in maps, f"ConfigMap {name} is not rendered"
        env.update(maps[name])
    for entry in container.get("env", []):
        if "value" in entry:
            value = entry["value"]
            for name, known in env.items():  # Kubernetes expands $(NAME) of earlier entries
                value = value.replace(f"$({name})", known)
        elif ref := entry.get("valueFrom", {}).get("secretKeyRef"):
            assert ref["name"] in secrets, f"{entry['name']}: Secret {ref['name']} is not there"
            assert ref["key"] in secrets[ref["name"]], f"{entry['name']}: key {ref['key']} not in Secret {ref['name']}"
            value = secrets[ref["name"]][ref["key"]]
        elif ref := entry.get("valueFrom", {}).get("fieldRef"):
            value = (fields or {})[ref["fieldPath"]]
        else:
            raise AssertionError(f"unsupported env entry {entry}")
        env[entry["name"]] = value
    return env


def declared_env(container: dict, objects: list[dict]) -> dict[str, object]:
    """{name: value, or the valueFrom reference}: envFrom ConfigMaps' data, then env entries."""
    maps = config_maps(objects)
    env: dict[str, object] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])})
    return env
