"""The chart installed on the real node as its README tells an operator to: every credential in an
existing Secret (made with `openssl rand -hex`), the images built from the Dockerfiles, Postgres,
Valkey and the model outside the release. The migration hook Job, the API pods and the `helm test`
Pod all really run: nothing marks them done.

Postgres, Valkey and the OpenAI-protocol stand-in run on this machine and the pods reach them at
its address (the node's), as they would reach managed services; LiveKit, the agent and the
controller come with the next scenarios of the node tier.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import psycopg
import pytest
from httpx_sse import connect_sse

from morgana_devtools.forward import Forwarder
from morgana_devtools.kube_apiserver import KubeApiServer, KubeClient
from morgana_devtools.kube_node import KubeNode
from morgana_devtools.openai_server import FakeOpenAIProcess
from morgana_devtools.services import EmbeddedPostgres, EmbeddedValkey, eventually, free_port
from tests.chart.helm import CHART, helm
from tests.conftest import OPENAI_KEY, STRONG_PASSWORD, bearer, unique_email
from tests.images.conftest import openssl_hex, postgres_socket
from tests.images.containers import IMAGE_TAG

NAMESPACE = "voice"
RELEASE = "morgana"
DATABASE = "morgana_node"


@dataclass
class Installed:
    api_url: str
    kube: KubeApiServer
    database_url: str


@pytest.fixture(scope="module")
def installed(
    cluster: tuple[KubeApiServer, KubeNode],
    kube: KubeClient,
    node_image: Callable[[str], str],
    postgres: EmbeddedPostgres,
) -> Iterator[Installed]:
    api_server, node = cluster
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
        conn.execute(f'CREATE DATABASE "{DATABASE}"')
    database = Forwarder(node.address, free_port(), postgres_socket(postgres)).start()
    valkey = EmbeddedValkey(host=node.address).start()
    model = FakeOpenAIProcess(api_key=OPENAI_KEY, host=node.address)
    model.start()
    try:
        node_image("api")
        kube.namespace(NAMESPACE)
        credentials = {
            "morgana-db-app": {"username": "postgres", "password": openssl_hex(16)},
            "morgana-livekit": {"api-key": "APInode", "api-secret": openssl_hex(32)},
            "morgana-secrets": {
                "jwt-secret": openssl_hex(32),
                "openai-api-key": OPENAI_KEY,
                "agent-password": openssl_hex(16),
            },
        }
        for name, data in credentials.items():
            kube.request(
                "POST",
                f"/api/v1/namespaces/{NAMESPACE}/secrets",
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
                ok=(201, 409),
            )
        sets = {
            "image.registry": "localhost",
            "image.tag": IMAGE_TAG,
            "image.pullPolicy": "Never",
            "postgres.host": node.address,
            "postgres.port": str(database.port),
            "postgres.database": DATABASE,
            "postgres.existingSecret": "morgana-db-app",
            "postgres.secretKeys.username": "username",
            "redis.host": node.address,
            "redis.port": str(valkey.port),
            "livekit.url": "ws://livekit.invalid:7880",
            "livekit.existingSecret": "morgana-livekit",
            "llm.baseUrl": model.base_url,
            "llm.existingSecret": "morgana-secrets",
            "auth.existingSecret": "morgana-secrets",
            "agentUser.existingSecret": "morgana-secrets",
            # This scenario's parts: the API and its migration Job (the voice parts come next).
            "agent.enabled": "false",
            "controller.enabled": "false",
            "controller.autoscaler.enabled": "false",
        }
        args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
        helm(
            "install",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "5m",
            *args,
            kubeconfig=api_server.kubeconfig,
            timeout=420,
        )
        service = kube.get(f"/api/v1/namespaces/{NAMESPACE}/services/{RELEASE}-api")
        port = service["spec"]["ports"][0]["port"]
        yield Installed(f"http://{service['spec']['clusterIP']}:{port}", api_server, postgres.url(DATABASE))
        helm(
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "2m",
            kubeconfig=api_server.kubeconfig,
            check=False,
            timeout=180,
        )
    finally:
        model.stop()
        valkey.stop()
        database.stop()


def test_install_runs_the_migration_job_brings_the_api_ready_and_helm_test_passes(
    installed: Installed, kube: KubeClient
) -> None:
    # The hook Job ran to completion on the node (helm deletes it once it succeeded, so its
    # work is what shows): the schema is at its head and the agent's account exists.
    with psycopg.connect(installed.database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall()
        agents = conn.execute("SELECT count(*) FROM users WHERE email = 'voice-agent@morgana.local'").fetchone()
        assert agents == (1,)
    pods = kube.get(f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=app.kubernetes.io/component=api")["items"]
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    for pod in pods:
        conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert conditions["Ready"] == "True", pod["status"]
        (container,) = pod["status"]["containerStatuses"]
        assert container["restartCount"] == 0, container
    ready = httpx.get(installed.api_url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["components"] == {"postgres": "ok", "redis": "ok"}, ready.text
    result = helm(
        "test",
        RELEASE,
        "--namespace",
        NAMESPACE,
        "--timeout",
        "2m",
        kubeconfig=installed.kube.kubeconfig,
        check=False,
        timeout=180,
    )
    assert result.returncode == 0 and "Phase:          Succeeded" in result.stdout, result.stdout + result.stderr


def test_through_the_api_service_a_user_chats_and_reads_the_history(installed: Installed) -> None:
    with httpx.Client(base_url=installed.api_url, timeout=30) as http:
        email = unique_email()
        registered = http.post("/api/v1/auth/register", json={"email": email, "password": STRONG_PASSWORD})
        assert registered.status_code == 200, registered.text
        login = http.post("/api/v1/auth/login", data={"username": email, "password": STRONG_PASSWORD})
        assert login.status_code == 200, login.text
        session = http.post("/api/v1/auth/session", headers=bearer(login.json()["access_token"]))
        assert session.status_code == 200, session.text
        token = session.json()["token"]["access_token"]
        said = f"hello from the node {secrets.token_hex(3)}"
        with connect_sse(
            http,
            "POST",
            "/api/v1/chatbot/chat/stream",
            headers=bearer(token),
            json={"messages": [{"role": "user", "content": said}]},
        ) as source:
            assert source.response.status_code == 200
            events = [json.loads(event.data) for event in source.iter_sse()]
        assert events[-1] == {"content": "", "done": True}, events[-1]
        reply = "".join(event["content"] for event in events)
        assert said in reply, reply
        history = eventually(lambda: http.get("/api/v1/chatbot/messages", headers=bearer(token)).json()["messages"], 10)
        assert [(m["role"], m["content"]) for m in history] == [("user", said), ("assistant", reply)]
