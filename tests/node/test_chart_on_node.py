"""Scenarios 1 and 2 of the node tier: the chart's first install, and a chat through its Service.

`installed` (conftest) is the operator's install: Postgres, Valkey and LiveKit as pods of the
cluster, the migration hook Job, the API, agent and controller pods and the `helm test` Pod all
really run on the node: nothing marks them done.
"""

from __future__ import annotations

import json
import secrets

import httpx
import psycopg
import pytest
from httpx_sse import connect_sse

from morgana_devtools.services import eventually
from tests.conftest import STRONG_PASSWORD, bearer, unique_email
from tests.node.conftest import NAMESPACE, RELEASE, Installed, ready

# The first test sets up the tier's install: images, the cluster's own services, `helm install`.
pytestmark = pytest.mark.timeout(900)


def test_install_runs_the_migration_job_brings_the_api_ready_and_helm_test_passes(installed: Installed) -> None:
    # The hook Job ran the image's migrate command to completion on the node, before helm made
    # the release's objects, and the hook-time copy of the credentials went once it succeeded.
    job = installed.client.get(f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{RELEASE}-migrate")
    assert job["status"].get("succeeded") == 1, job["status"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert job["metadata"]["creationTimestamp"] <= installed.deployment("api")["metadata"]["creationTimestamp"]
    hook_secret = f"/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-hook"
    assert installed.client.request("GET", hook_secret, ok=(404,)).status_code == 404
    # Its work: the schema at its head, the agent's account made.
    with psycopg.connect(installed.database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall()
        agents = conn.execute("SELECT count(*) FROM users WHERE email = 'voice-agent@morgana.local'").fetchone()
        assert agents == (1,)
    pods = installed.pods("api")
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]
    # Every pod of the release, Ready through its own probes, and never restarted.
    for pod in pods + installed.pods("agent") + installed.pods("controller"):
        assert ready(pod), pod["status"]
        (container,) = pod["status"]["containerStatuses"]
        assert container["restartCount"] == 0, container
    checked = httpx.get(installed.api_url + "/ready", timeout=10)
    assert checked.status_code == 200, checked.text
    assert checked.json()["components"] == {"postgres": "ok", "redis": "ok"}, checked.text
    result = installed.helm("test", RELEASE, "--timeout", "2m", timeout=180)
    assert result.returncode == 0 and "Phase:          Succeeded" in result.stdout, result.stdout + result.stderr
    test_pod = installed.client.get(f"/api/v1/namespaces/{NAMESPACE}/pods/{RELEASE}-test-api-health")
    assert test_pod["spec"]["containers"][0]["env"][0] == {"name": "MORGANA_URL", "value": f"http://{RELEASE}-api:8000"}


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
