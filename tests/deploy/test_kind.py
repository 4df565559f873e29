"""kind-config.yaml, ctlptl.yaml and deploy/kind-with-registry.sh: the cluster LiveKit and Tilt expect."""

from __future__ import annotations

import re
import subprocess
import tomllib
from typing import Any
from urllib.parse import urlsplit

import yaml

from tests.deploy.conftest import DEPLOY, INSTALL_SH, ROOT, VALUES, load_yaml

KIND_API = "kind.x-k8s.io/v1alpha4"
CTLPTL_API = "ctlptl.dev/v1alpha1"
CERTS_D = "/etc/containerd/certs.d"


def kind_config() -> dict[str, Any]:
    return load_yaml(ROOT / "kind-config.yaml")


def ctlptl_docs() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((ROOT / "ctlptl.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) == 2, [d.get("kind") for d in docs]
    return by_kind


def port_mappings(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for node in config["nodes"] for m in node.get("extraPortMappings", [])]


def livekit_values() -> dict[str, Any]:
    return load_yaml(VALUES / "livekit-server.yaml")


def test_kind_config_is_a_kind_cluster_with_the_registry_config_dir() -> None:
    config = kind_config()
    assert config["apiVersion"] == KIND_API
    assert config["kind"] == "Cluster"
    assert config["name"] == "morgana"
    patches = [tomllib.loads(p) for p in config["containerdConfigPatches"]]
    assert any(p["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == CERTS_D for p in patches)


def test_livekit_ports_are_mapped_one_to_one_on_the_node_that_runs_livekit() -> None:
    config = kind_config()
    # One node: LiveKit's hostNetwork pod necessarily lands on the node with the mappings.
    assert [n["role"] for n in config["nodes"]] == ["control-plane"]
    values = livekit_values()
    assert values["podHostNetwork"] is True
    assert values.get("replicaCount", 1) == 1
    lk = values["livekit"]
    wanted = {(lk["port"], "TCP"), (lk["rtc"]["tcp_port"], "TCP"), (lk["rtc"]["udp_port"], "UDP")}
    mappings = port_mappings(config)
    assert {(m["containerPort"], m.get("protocol", "TCP")) for m in mappings} == wanted
    for m in mappings:
        # ICE candidates carry LiveKit's own port numbers: outside and inside must match.
        assert m["hostPort"] == m["containerPort"], m
        assert m.get("listenAddress", "0.0.0.0") in ("127.0.0.1", "0.0.0.0")
    assert (7880, "TCP") in wanted


def test_livekit_is_reachable_where_morgana_tells_browsers_to_connect() -> None:
    dev = load_yaml(VALUES / "morgana-dev.yaml")
    public = urlsplit(dev["livekit"]["publicUrl"])
    assert public.scheme == "ws" and public.hostname == "localhost"
    mapped = {m["hostPort"] for m in port_mappings(kind_config()) if m.get("protocol", "TCP") == "TCP"}
    assert public.port == livekit_values()["livekit"]["port"] and public.port in mapped
    lk = livekit_values()["livekit"]["rtc"]
    assert lk["use_external_ip"] is False and lk["enable_loopback_candidate"] is True


def test_ctlptl_declares_the_registry_and_the_same_kind_cluster() -> None:
    docs = ctlptl_docs()
    registry, cluster = docs["Registry"], docs["Cluster"]
    assert registry["apiVersion"] == cluster["apiVersion"] == CTLPTL_API
    assert registry["name"] == "ctlptl-registry" and registry["port"] == 5001
    assert cluster["product"] == "kind"
    assert cluster["registry"] == registry["name"]
    embedded = cluster["kindV1Alpha4Cluster"]
    assert cluster["name"] == "kind-" + embedded["name"]
    expected = {k: v for k, v in kind_config().items() if k not in ("apiVersion", "kind")}
    assert embedded == expected, "ctlptl.yaml's kindV1Alpha4Cluster must equal kind-config.yaml"


def test_every_registry_setting_names_localhost_5001() -> None:
    registry_port = ctlptl_docs()["Registry"]["port"]
    dev = load_yaml(VALUES / "morgana-dev.yaml")
    assert dev["image"]["registry"] == f"localhost:{registry_port}"
    assert re.search(rf'IMAGE_REGISTRY="\$\{{IMAGE_REGISTRY:-localhost:{registry_port}\}}"', INSTALL_SH.read_text())
    script = (DEPLOY / "kind-with-registry.sh").read_text()
    assert re.search(rf'REG_PORT="\$\{{REG_PORT:-{registry_port}\}}"', script)
    assert "kind-config.yaml" in script and CERTS_D in script and "local-registry-hosting" in script


def test_kind_with_registry_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(DEPLOY / "kind-with-registry.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
