"""deploy/install.sh: its syntax, the exact helm/kubectl/docker sequence it runs, and its
kubectl steps run for real against a kube-apiserver (the Secrets Morgana and LiveKit read)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from morgana.api.config import service_password_problem
from morgana_devtools.kube_apiserver import KubeApiServer, ensure_binaries
from tests.deploy.conftest import (
    INSTALL_SH,
    ROOT,
    VALUES,
    VERSIONS_ENV,
    load_yaml,
    read_versions,
)

REPOS = {
    "cnpg": "https://cloudnative-pg.github.io/charts",
    "valkey": "https://valkey.io/valkey-helm/",
    "livekit": "https://helm.livekit.io",
}


def run_install(
    *steps: str, env: dict[str, str] | None = None, path_prefix: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "LLM_MODEL",
            "LIVEKIT_API_KEY",
            "LIVEKIT_API_SECRET",
            "JWT_SECRET_KEY",
            "API_USER_PASSWORD",
            "MORGANA_NAMESPACE",
            "MORGANA_VALUES",
            "SKIP_IMAGES",
        )
    }
    full_env.update(env or {})
    if path_prefix:
        full_env["PATH"] = f"{path_prefix}:{full_env['PATH']}"
    result = subprocess.run(
        ["bash", str(INSTALL_SH), *steps], env=full_env, capture_output=True, text=True, timeout=180, cwd=ROOT
    )
    if check:
        assert result.returncode == 0, f"install.sh {' '.join(steps)} failed:\n{result.stderr}"
    return result


# ---- Static checks ----


def test_install_scripts_parse_and_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed by scripts/install-test-deps.sh (make test)"
    for script in sorted([*ROOT.glob("deploy/*.sh"), *ROOT.glob("scripts/*.sh")]):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert os.access(script, os.X_OK), f"{script} is not executable"
        result = subprocess.run(
            [shellcheck, "-x", "-P", str(ROOT), str(script)], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_versions_file_is_plain_shell_assignments() -> None:
    versions = read_versions()
    sourced = subprocess.run(
        ["bash", "-c", f'set -eua; source "{VERSIONS_ENV}"; env -0'],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"]},
    )
    assert sourced.returncode == 0, sourced.stderr
    env = dict(item.split("=", 1) for item in sourced.stdout.split("\0") if "=" in item)
    for key, value in versions.items():
        assert env.get(key) == value, key
    assert set(versions) == {
        "CNPG_OPERATOR_CHART_VERSION",
        "CNPG_CLUSTER_CHART_VERSION",
        "VALKEY_CHART_VERSION",
        "LIVEKIT_SERVER_CHART_VERSION",
        "LIVEKIT_SERVER_VERSION",
    }


def test_no_version_is_hardcoded_outside_versions_env() -> None:
    versions = read_versions()
    for path in (INSTALL_SH, ROOT / "Tiltfile", *VALUES.glob("*.yaml")):
        text = path.read_text()
        for key, value in versions.items():
            assert not re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", text), (
                f"{path.relative_to(ROOT)} hardcodes {key}={value}; read it from deploy/versions.env"
            )


def test_livekit_server_image_is_the_release_the_test_suite_runs() -> None:
    script = (ROOT / "scripts/build-livekit-server.sh").read_text()
    match = re.search(r"LIVEKIT_SERVER_VERSION:-(v[0-9.]+)", script)
    assert match, "scripts/build-livekit-server.sh no longer names its default version"
    assert read_versions()["LIVEKIT_SERVER_VERSION"] == match[1]


# ---- The full sequence, with recording stand-ins for helm, kubectl and docker ----


def recorded(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


def helm_installs(calls: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {c["argv"][2]: c["argv"] for c in calls if c["tool"] == "helm" and c["argv"][:2] == ["upgrade", "--install"]}


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} in {argv}"
    return argv[argv.index(name) + 1]


def test_a_full_run_installs_everything_in_order_with_the_pinned_versions(shims: tuple[Path, Path]) -> None:
    bin_dir, record = shims
    versions = read_versions()
    result = run_install(env={"RECORD": str(record)}, path_prefix=bin_dir)
    calls = recorded(record)
    helm = [c["argv"] for c in calls if c["tool"] == "helm"]

    # Repositories first, by their published URLs.
    adds = {argv[2]: argv[3] for argv in helm if argv[:2] == ["repo", "add"]}
    assert adds == REPOS
    assert ["repo", "update", "cnpg", "valkey", "livekit"] in helm

    installs = helm_installs(calls)
    assert list(installs) == ["cnpg", "morgana-db", "morgana-valkey", "livekit-server", "morgana"]
    expected = {
        "cnpg": ("cnpg/cloudnative-pg", "CNPG_OPERATOR_CHART_VERSION", "cnpg-system", None),
        "morgana-db": ("cnpg/cluster", "CNPG_CLUSTER_CHART_VERSION", "morgana", "cnpg-cluster.yaml"),
        "morgana-valkey": ("valkey/valkey", "VALKEY_CHART_VERSION", "morgana", "valkey.yaml"),
        "livekit-server": ("livekit/livekit-server", "LIVEKIT_SERVER_CHART_VERSION", "morgana", "livekit-server.yaml"),
    }
    for release, (chart, version_key, namespace, values) in expected.items():
        argv = installs[release]
        assert argv[3] == chart
        assert flag(argv, "--version") == versions[version_key]
        assert flag(argv, "--namespace") == namespace
        if values:
            assert flag(argv, "-f") == str(VALUES / values)
    assert "--create-namespace" in installs["cnpg"] and "--wait" in installs["cnpg"]
    assert flag(installs["livekit-server"], "--set") == f"image.tag={versions['LIVEKIT_SERVER_VERSION']}"

    morgana = installs["morgana"]
    assert morgana[3] == str(ROOT / "charts/morgana")
    assert flag(morgana, "-f") == str(VALUES / "morgana-dev.yaml")
    assert "--version" not in morgana and "--wait" in morgana
    assert "image.registry=localhost:5001" in morgana and "image.tag=dev" in morgana

    # Order: secrets before what mounts them, the database ready and images pushed before Morgana.
    def index(pred) -> int:
        return next(i for i, c in enumerate(calls) if pred(c))

    def helm_at(release: str) -> int:
        return index(lambda c: c["tool"] == "helm" and c["argv"][:3] == ["upgrade", "--install", release])

    secrets_at = index(lambda c: c["tool"] == "kubectl" and c["argv"][:3] == ["create", "secret", "generic"])
    wait_at = index(lambda c: c["tool"] == "kubectl" and c["argv"][:1] == ["wait"])
    pushes = [i for i, c in enumerate(calls) if c["tool"] == "docker" and c["argv"][0] == "push"]
    assert helm_at("cnpg") < helm_at("morgana-db") < wait_at < helm_at("morgana")
    assert secrets_at < helm_at("livekit-server") < helm_at("morgana")
    assert len(pushes) == 3 and max(pushes) < helm_at("morgana")
    assert "port-forward svc/morgana-api 8000:8000" in result.stderr

    # The images it pushes are the ones the dev values deploy.
    builds = [c["argv"] for c in calls if c["tool"] == "docker" and c["argv"][0] == "build"]
    tags = [f"localhost:5001/morgana-{c}:dev" for c in ("api", "agent", "controller")]
    assert [flag(b, "-t") for b in builds] == tags
    for b in builds:
        component = flag(b, "-t").split("morgana-")[1].split(":")[0]
        assert flag(b, "-f") == str(ROOT / f"images/{component}/Dockerfile") and b[-1] == str(ROOT)


def test_single_steps_and_skipping_images(shims: tuple[Path, Path]) -> None:
    bin_dir, record = shims
    run_install("repos", env={"RECORD": str(record)}, path_prefix=bin_dir)
    assert {c["tool"] for c in recorded(record)} <= {"helm", "kubectl"}
    assert not helm_installs(recorded(record))
    record.unlink()
    run_install(
        env={
            "RECORD": str(record),
            "SKIP_IMAGES": "1",
            "OPENAI_BASE_URL": "http://ollama:11434/v1",
            "LLM_MODEL": "llama3.2",
        },
        path_prefix=bin_dir,
    )
    calls = recorded(record)
    assert not [c for c in calls if c["tool"] == "docker"]
    morgana = helm_installs(calls)["morgana"]
    assert "llm.baseUrl=http://ollama:11434/v1" in morgana and "llm.model=llama3.2" in morgana
    assert run_install("nonsense", env={"RECORD": str(record)}, path_prefix=bin_dir, check=False).returncode == 2


def test_the_dev_values_are_refused_outside_kind(shims: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, record = shims
    env = {"RECORD": str(record), "FAKE_CONTEXT": "gke_prod_europe"}
    refused = run_install("morgana", env=env, path_prefix=bin_dir, check=False)
    assert refused.returncode != 0 and "refusing" in refused.stderr
    assert not helm_installs(recorded(record))
    own_values = tmp_path / "prod.yaml"
    own_values.write_text("environment: production\n")
    run_install("morgana", env={**env, "MORGANA_VALUES": str(own_values)}, path_prefix=bin_dir)
    argv = helm_installs(recorded(record))["morgana"]
    assert flag(argv, "-f") == str(own_values)
    assert not [a for a in argv if a.startswith("image.")], "a production values file keeps its own images"


# ---- The kubectl steps for real ----


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    with KubeApiServer(log_dir=tmp_path_factory.mktemp("kube-logs")) as server:
        yield server


def kubectl() -> str:
    """The kubectl scripts/build-k8s-tools.sh builds (pinned to the API server's version)."""
    return str(ensure_binaries()["kubectl"])


def with_kubectl(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PATH": f"{Path(kubectl()).parent}:{os.environ['PATH']}"}


def secret_data(kube: KubeApiServer, name: str, namespace: str = "morgana") -> dict[str, str]:
    result = subprocess.run(
        [kubectl(), "get", "secret", name, "-n", namespace, "-o", "json"],
        env={**os.environ, "KUBECONFIG": str(kube.kubeconfig)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    secret = json.loads(result.stdout)
    assert "kubectl.kubernetes.io/last-applied-configuration" not in secret["metadata"].get("annotations", {})
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def test_secrets_are_generated_kept_and_overridden(kube: KubeApiServer) -> None:
    env = with_kubectl({"KUBECONFIG": str(kube.kubeconfig), "MORGANA_NAMESPACE": "morgana"})
    first = run_install("namespace", "secrets", env=env)
    assert "OPENAI_API_KEY is not set" in first.stderr
    livekit, morgana = secret_data(kube, "morgana-livekit"), secret_data(kube, "morgana-secrets")

    assert set(livekit) == {"api-key", "api-secret", "keys.yaml"}
    assert yaml.safe_load(livekit["keys.yaml"]) == {livekit["api-key"]: livekit["api-secret"]}
    assert len(livekit["api-secret"]) >= 32 and livekit["api-key"].startswith("API")
    assert set(morgana) == {"jwt-secret", "openai-api-key", "agent-password"}
    assert re.fullmatch(r"[0-9a-f]{64}", morgana["jwt-secret"])
    assert service_password_problem(morgana["agent-password"]) is None
    assert morgana["openai-api-key"] == "not-configured"

    # Run again: nothing changes (users stay logged in, LiveKit and Morgana keep matching).
    run_install("namespace", "secrets", env=env)
    assert secret_data(kube, "morgana-livekit") == livekit
    assert secret_data(kube, "morgana-secrets") == morgana

    # Values from the environment win, the others are kept; odd characters stay valid YAML.
    odd = 'x"y\\z: #not-a-comment-0123456789abcdef0123'
    run_install("secrets", env={**env, "OPENAI_API_KEY": "sk-test-123", "LIVEKIT_API_SECRET": odd})
    updated_lk, updated = secret_data(kube, "morgana-livekit"), secret_data(kube, "morgana-secrets")
    assert updated["openai-api-key"] == "sk-test-123"
    assert updated["jwt-secret"] == morgana["jwt-secret"] and updated["agent-password"] == morgana["agent-password"]
    assert updated_lk["api-key"] == livekit["api-key"] and updated_lk["api-secret"] == odd
    assert yaml.safe_load(updated_lk["keys.yaml"]) == {livekit["api-key"]: odd}


def test_the_secrets_hold_every_key_the_dev_release_and_livekit_read(kube: KubeApiServer, helm_binary: Path) -> None:
    env = with_kubectl({"KUBECONFIG": str(kube.kubeconfig), "MORGANA_NAMESPACE": "refs"})
    run_install("namespace", "secrets", env=env)
    rendered = subprocess.run(
        [
            str(helm_binary),
            "template",
            "morgana",
            str(ROOT / "charts/morgana"),
            "-n",
            "refs",
            "-f",
            str(VALUES / "morgana-dev.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert rendered.returncode == 0, rendered.stderr
    refs: set[tuple[str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
    walk(objects)
    for obj in objects:  # volumes and the autoscaler's credentials reference Secrets too
        if obj["kind"] == "AgentAutoscaler":
            creds = obj["spec"]["livekit"]["credentialsSecretRef"]
            refs |= {(creds["name"], creds["apiKeyKey"]), (creds["name"], creds["apiSecretKey"])}
    assert refs, "the dev release reads no Secret at all?"
    # CloudNativePG generates morgana-db-app (type kubernetes.io/basic-auth: username, password, ...).
    db_refs = {key for name, key in refs if name == "morgana-db-app"}
    assert db_refs == {"username", "password"}
    created = {name: secret_data(kube, name, "refs") for name in {n for n, _ in refs if n != "morgana-db-app"}}
    for name, key in refs - {("morgana-db-app", k) for k in db_refs}:
        assert key in created[name], f"the dev release reads {name}/{key}, which install.sh does not create"
    # LiveKit mounts its key file from the same Secret.
    livekit = load_yaml(VALUES / "livekit-server.yaml")
    assert livekit["storeKeysInSecret"]["existingSecret"] == "morgana-livekit"
    assert livekit["livekit"]["key_file"] in created["morgana-livekit"]
