"""The dependency charts' values files use only keys their charts have at the pinned versions.

The charts cannot be downloaded here, so the keys were read from the upstream sources with the
search tools and recorded in upstream_keys/<chart>-<version>.txt (each file says where from).
A version bump in deploy/versions.env fails these tests until the keys are re-recorded.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import VALUES, load_yaml, read_versions

UPSTREAM = Path(__file__).parent / "upstream_keys"
CHARTS = {
    # values file: (chart name, versions.env key)
    "livekit-server.yaml": ("livekit-server", "LIVEKIT_SERVER_CHART_VERSION"),
    "cnpg-cluster.yaml": ("cluster", "CNPG_CLUSTER_CHART_VERSION"),
    "valkey.yaml": ("valkey", "VALKEY_CHART_VERSION"),
}


def allowed_keys(chart: str, version: str) -> tuple[set[str], set[str]]:
    """(exact paths, prefixes allowing anything below) from the recorded upstream key list."""
    path = UPSTREAM / f"{chart}-{version}.txt"
    assert path.is_file(), f"no recorded keys for {chart} {version}: read them upstream into {path.name}"
    exact, prefixes = set(), set()
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith(".*"):
            prefixes.add(line[:-2])
        else:
            exact.add(line)
    return exact, prefixes


def leaf_paths(values: Any, prefix: str = "") -> list[str]:
    """Dotted paths to every non-mapping value (an empty mapping counts as a leaf)."""
    if isinstance(values, dict) and values:
        return [p for key, value in values.items() for p in leaf_paths(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def is_allowed(path: str, exact: set[str], prefixes: set[str]) -> bool:
    if path in exact or path in prefixes:
        return True
    return any(path.startswith(prefix + ".") for prefix in prefixes)


@pytest.mark.parametrize("values_file", sorted(CHARTS))
def test_values_use_only_upstream_keys_at_the_pinned_version(values_file: str) -> None:
    chart, version_key = CHARTS[values_file]
    version = read_versions()[version_key]
    exact, prefixes = allowed_keys(chart, version)
    header = (UPSTREAM / f"{chart}-{version}.txt").read_text().splitlines()[0]
    assert version in header, f"{chart}-{version}.txt does not say it records version {version}"
    values = load_yaml(VALUES / values_file)
    unknown = [p for p in leaf_paths(values) if not is_allowed(p, exact, prefixes)]
    assert not unknown, f"{values_file}: keys not in {chart} {version}: {unknown}"


@pytest.mark.parametrize("values_file", sorted(CHARTS))
def test_values_files_are_for_development_and_say_what_production_changes(values_file: str) -> None:
    text = (VALUES / values_file).read_text()
    assert "kind" in text and "Production" in text
    chart, _ = CHARTS[values_file]
    assert chart in text


def test_the_key_checker_rejects_what_it_should() -> None:
    exact, prefixes = {"a.b", "c"}, {"r"}
    assert is_allowed("a.b", exact, prefixes) and is_allowed("r.limits.cpu", exact, prefixes)
    assert not is_allowed("a.x", exact, prefixes) and not is_allowed("rr", exact, prefixes)
    assert leaf_paths({"a": {"b": 1, "e": {}}, "n": None}) == ["a.b", "a.e", "n"]


def test_livekit_uses_one_udp_port_instead_of_the_charts_range() -> None:
    rtc = load_yaml(VALUES / "livekit-server.yaml")["livekit"]["rtc"]
    assert isinstance(rtc["udp_port"], int) and isinstance(rtc["tcp_port"], int)
    # null deletes the chart's default range (50000-60000); LiveKit muxes only without one.
    assert "port_range_start" in rtc and rtc["port_range_start"] is None
    assert "port_range_end" in rtc and rtc["port_range_end"] is None


def test_postgres_is_named_and_owned_as_morgana_expects() -> None:
    cnpg = load_yaml(VALUES / "cnpg-cluster.yaml")
    dev = load_yaml(VALUES / "morgana-dev.yaml")
    chart_defaults = load_yaml(Path(__file__).resolve().parents[2] / "charts/morgana/values.yaml")
    assert cnpg["fullnameOverride"] == "morgana-db"
    assert chart_defaults["postgres"]["host"] == dev["postgres"]["host"] == "morgana-db-rw"
    assert cnpg["cluster"]["initdb"] == {"database": "morgana", "owner": "morgana"}
    assert dev["postgres"]["database"] == cnpg["cluster"]["initdb"]["database"]
    assert dev["postgres"]["existingSecret"] == f"{cnpg['fullnameOverride']}-app"
    assert dev["postgres"]["secretKeys"] == {"username": "username", "password": "password"}
    # An immutable image tag: CloudNativePG no longer publishes the rolling `18`-style tags.
    image = cnpg["cluster"]["imageName"]
    assert image.startswith("ghcr.io/cloudnative-pg/postgresql:")
    tag = image.rsplit(":", 1)[1]
    assert tag.split(".")[0] == cnpg["version"]["postgresql"] and "-" in tag


def test_valkey_and_livekit_keep_the_service_names_morgana_defaults_to() -> None:
    chart_defaults = load_yaml(Path(__file__).resolve().parents[2] / "charts/morgana/values.yaml")
    valkey = load_yaml(VALUES / "valkey.yaml")
    livekit = load_yaml(VALUES / "livekit-server.yaml")
    assert valkey["fullnameOverride"] == chart_defaults["redis"]["host"] == "morgana-valkey"
    assert valkey["service"]["port"] == chart_defaults["redis"]["port"] == 6379
    assert (
        chart_defaults["livekit"]["url"]
        == f"ws://{livekit['fullnameOverride']}:{livekit['loadBalancer']['servicePort']}"
        == "ws://livekit-server:80"
    )
    assert livekit["loadBalancer"]["type"] == "disable"


def test_livekit_config_rendered_the_way_the_chart_renders_it(helm_binary: Path, tmp_path: Path) -> None:
    """The chart's ConfigMap is `toYaml .Values.livekit` over its defaults (livekit-server
    templates/configmap.yaml and values.yaml, read upstream): with our values the real helm must
    drop the default UDP port range (null deletes a default) and keep the single muxed port."""
    chart = tmp_path / "livekit-server"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: livekit-server\nversion: 1.9.0\n")
    (chart / "values.yaml").write_text(
        "livekit:\n  port: 7880\n  log_level: info\n  rtc:\n    tcp_port: 7881\n    port_range_start: 50000\n"
        "    port_range_end: 60000\n    use_external_ip: true\n  redis: {}\n  keys: {}\n"
        "  turn:\n    enabled: false\n    loadBalancerAnnotations: {}\n"
    )
    (chart / "templates/configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: livekit-server\ndata:\n"
        "  config.yaml: |\n{{ toYaml .Values.livekit | indent 4 }}\n"
    )
    result = subprocess.run(
        [str(helm_binary), "template", "livekit-server", str(chart), "-f", str(VALUES / "livekit-server.yaml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(yaml.safe_load(result.stdout)["data"]["config.yaml"])
    rtc = config["rtc"]
    assert "port_range_start" not in rtc and "port_range_end" not in rtc
    assert (rtc["udp_port"], rtc["tcp_port"], rtc["use_external_ip"]) == (7882, 7881, False)
    assert config["key_file"] == "keys.yaml" and config["keys"] == {}
