"""The images tier: the real images, built from images/*/Dockerfile, run as the chart runs them.

- `images`: the three images (scripts/build-images.sh; podman's layer cache makes a rebuild of
  unchanged code fast), with their sizes and the build time.
- `release`: the chart rendered by `helm template` the way its README tells an operator to
  install it (every credential in an existing Secret, the agent's password made by
  `openssl rand -hex 16`), against this session's real Postgres, Valkey, model stand-in and a
  LiveKit server of its own. The containers get exactly the environment the kubelet would
  build from that rendering; only ports that pods would have to themselves are moved.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from morgana_devtools.forward import Forwarder
from morgana_devtools.livekit_server import LiveKitServer
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey, free_port
from tests.chart.helm import find, render, resolve_env
from tests.conftest import OPENAI_KEY
from tests.images.containers import IMAGE_TAG, BuiltImages, Container, build_images

DATABASE = "morgana_images"


@pytest.fixture(scope="session")
def images() -> BuiltImages:
    built = build_images()
    print(
        f"\nimages built in {built.seconds:.0f} s: "
        + ", ".join(f"{c} {size / 1e6:.0f} MB" for c, size in built.sizes.items())
    )
    return built


@pytest.fixture(scope="session")
def postgres_tcp(postgres: EmbeddedPostgres) -> Iterator[int]:
    """The session's Postgres on a TCP port (it listens on a unix socket only), with a database of
    this tier's own: what a Postgres Service gives a pod."""
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    forwarder = Forwarder("127.0.0.1", free_port(), postgres_socket(postgres)).start()
    yield forwarder.port
    forwarder.stop()


def postgres_socket(postgres: EmbeddedPostgres) -> str:
    """The path of the embedded server's unix socket (it listens on no TCP port)."""
    (path,) = [str(p) for p in Path(postgres.socket_dir).glob(".s.PGSQL.*") if p.suffix != ".lock"]
    return path


@pytest.fixture(scope="session")
def images_livekit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKitServer]:
    """A LiveKit server of this tier's own, so that its agent never takes another test's calls."""
    with LiveKitServer(
        "APIimages", secrets.token_hex(32), log_path=tmp_path_factory.mktemp("images-livekit") / "livekit.log"
    ) as server:
        yield server


def openssl_hex(size: int) -> str:
    """What `openssl rand -hex SIZE` prints: the README's recipe for the chart's credentials."""
    return subprocess.run(
        ["openssl", "rand", "-hex", str(size)], capture_output=True, text=True, check=True
    ).stdout.strip()


@dataclass
class Release:
    sets: list[str]
    secrets: dict[str, dict[str, str]]

    def __post_init__(self) -> None:
        self.objects = render(values=[], sets=self.sets)

    def rendered(self, *sets: str) -> Release:
        """The same release with more values set."""
        return Release([*self.sets, *sets], self.secrets)

    def pod(self, kind: str, suffix: str) -> tuple[dict, dict]:
        """(pod spec, its one container) of the rendered Deployment or Job named *suffix."""
        spec = find(self.objects, kind, suffix)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        return spec, container

    def env(self, container: dict, pod_name: str) -> dict[str, str]:
        return resolve_env(
            container, self.objects, {"metadata.name": pod_name, "metadata.namespace": "voice"}, self.secrets
        )

    def container(self, kind: str, suffix: str, images: BuiltImages, workdir: Path, **overrides: str) -> Container:
        spec, container = self.pod(kind, suffix)
        name = f"morgana{suffix}-{secrets.token_hex(3)}"
        env = {**self.env(container, name), **overrides}
        assert container["image"] in images.refs.values(), container["image"]
        return Container.from_pod(spec, container, image=container["image"], env=env, workdir=workdir, name=name)


@pytest.fixture(scope="session")
def release(
    postgres_tcp: int, valkey: EmbeddedValkey, fake_openai: FakeOpenAIProcess, images_livekit: LiveKitServer
) -> Release:
    credentials = {
        "morgana-db-app": {"username": "postgres", "password": openssl_hex(16)},
        "morgana-livekit": {"api-key": images_livekit.api_key, "api-secret": images_livekit.api_secret},
        "morgana-secrets": {
            "jwt-secret": openssl_hex(32),
            "openai-api-key": OPENAI_KEY,
            "agent-password": openssl_hex(16),
        },
    }
    sets = [
        "image.registry=localhost",
        f"image.tag={IMAGE_TAG}",
        "image.pullPolicy=Never",
        "postgres.host=127.0.0.1",
        f"postgres.port={postgres_tcp}",
        f"postgres.database={DATABASE}",
        "postgres.existingSecret=morgana-db-app",
        "postgres.secretKeys.username=username",
        "redis.host=127.0.0.1",
        f"redis.port={valkey.port}",
        f"livekit.url={images_livekit.url}",
        "livekit.existingSecret=morgana-livekit",
        f"llm.baseUrl={fake_openai.base_url}",
        "llm.existingSecret=morgana-secrets",
        "auth.existingSecret=morgana-secrets",
        "agentUser.existingSecret=morgana-secrets",
    ]
    return Release(sets, credentials)


@pytest.fixture(scope="session")
def migrated(images: BuiltImages, release: Release, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The migration Job's container, run to completion: its logs."""
    with release.container("Job", "-migrate", images, tmp_path_factory.mktemp("migrate")) as job:
        code = job.wait(180)
        logs = job.logs()
    assert code == 0, logs[-6000:]
    return logs
