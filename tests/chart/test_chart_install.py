"""helm install, upgrade, test and uninstall of charts/morgana against a real Kubernetes API server.

etcd, kube-apiserver and kube-controller-manager run on loopback (see KubeApiServer): objects
are admitted, validated (built-in schemas, the CRDs' OpenAPI schemas and CEL rules, RBAC) and
reconciled (Deployments get ReplicaSets and Pods). No kubelet runs containers here, so helm runs
with `--no-hooks`: nothing would ever complete a hook Job, and nothing here pretends to. The hooks
(the migration Job, the uninstall's controller-stop Job, the `helm test` Pod) run for real on the
node tier (tests/node), where the kubelet runs them.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator

import httpx
import pytest
import yaml

from morgana_devtools.kube_apiserver import KubeApiServer, servicemonitor_crd
from morgana_devtools.services import eventually
from tests.chart.helm import CHART, DEFAULT_VALUES, helm

NAMESPACE = "voice"
RELEASE = "morgana"
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


def ok(response: httpx.Response) -> dict:
    assert response.is_success, (
        f"{response.request.method} {response.request.url}: {response.status_code} {response.text}"
    )
    return response.json()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeApiServer]:
    with KubeApiServer(log_dir=tmp_path_factory.mktemp("kube-logs"), controller_manager=True) as server:
        yield server


@pytest.fixture(scope="module")
def client(kube: KubeApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=kube.url,
        headers={"Authorization": f"Bearer {kube.token}"},
        verify=ssl.create_default_context(cafile=kube.ca_file),
        timeout=30,
    ) as c:
        yield c


def create_namespace(client: httpx.Client, name: str) -> None:
    ok(client.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}))


@pytest.fixture(scope="module")
def release(kube: KubeApiServer, client: httpx.Client) -> str:
    """The chart installed with its defaults, ServiceMonitors on (the Prometheus Operator's CRD installed first)."""
    crd = yaml.safe_load(servicemonitor_crd().read_text())
    ok(client.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=crd))
    eventually(lambda: established(client, crd["metadata"]["name"]), 30, what="the ServiceMonitor CRD")
    create_namespace(client, NAMESPACE)
    helm(
        "install",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "-f",
        DEFAULT_VALUES,
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--no-hooks",
        "--timeout",
        "2m",
        kubeconfig=kube.kubeconfig,
    )
    return RELEASE


def established(client: httpx.Client, name: str) -> bool:
    response = client.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
    conditions = (response.json().get("status") or {}).get("conditions") or [] if response.is_success else []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def get(client: httpx.Client, path: str) -> dict:
    return ok(client.get(path))


def names(client: httpx.Client, path: str) -> set[str]:
    return {item["metadata"]["name"] for item in get(client, path)["items"]}


def test_install_creates_every_component(release: str, client: httpx.Client) -> None:
    ns = f"/namespaces/{NAMESPACE}"
    assert names(client, f"/apis/apps/v1{ns}/deployments") == {"morgana-api", "morgana-agent", "morgana-controller"}
    assert {"morgana-api", "morgana-agent-metrics", "morgana-controller-metrics"} <= names(
        client, f"/api/v1{ns}/services"
    )
    assert names(client, f"/apis/policy/v1{ns}/poddisruptionbudgets") == {"morgana-api", "morgana-agent"}
    assert names(client, f"/apis/monitoring.coreos.com/v1{ns}/servicemonitors") == {
        "morgana-api",
        "morgana-agent",
        "morgana-controller",
    }
    dashboards = get(client, f"/api/v1{ns}/configmaps?labelSelector=grafana_dashboard%3D1")["items"]
    assert len(dashboards) == len(list((CHART / "dashboards").glob("*.json")))
    assert {"morgana-api", "morgana-agent"} <= names(client, f"/api/v1{ns}/configmaps")
    secret = get(client, f"/api/v1{ns}/secrets/morgana")
    assert base64.b64decode(secret["data"]["jwt-secret"]).decode().startswith("0f1e2d3c")


def test_notes_tell_how_to_reach_and_check_the_release(release: str, kube: KubeApiServer) -> None:
    notes = helm("get", "notes", RELEASE, "--namespace", NAMESPACE, kubeconfig=kube.kubeconfig).stdout
    assert f"kubectl --namespace {NAMESPACE} port-forward svc/morgana-api 8000:8000" in notes
    assert f"helm test {RELEASE} --namespace {NAMESPACE}" in notes
    assert "kubectl --namespace voice get agentautoscalers" in notes
    assert "WARNING" not in notes  # production values


def test_crd_is_established_and_the_autoscaler_accepted(release: str, client: httpx.Client) -> None:
    assert established(client, "agentautoscalers.morgana.dev")
    autoscaler = get(client, f"/apis/morgana.dev/v1alpha1/namespaces/{NAMESPACE}/agentautoscalers/morgana-agent")
    assert autoscaler["spec"]["targetRef"]["name"] == "morgana-agent"
    assert autoscaler["spec"]["livekit"]["credentialsSecretRef"]["name"] == "morgana-livekit"


def test_the_api_server_enforces_the_crd_schema(release: str, client: httpx.Client) -> None:
    bad = get(client, f"/apis/morgana.dev/v1alpha1/namespaces/{NAMESPACE}/agentautoscalers/morgana-agent")
    bad = {
        "apiVersion": bad["apiVersion"],
        "kind": bad["kind"],
        "metadata": {"name": "broken"},
        "spec": {**bad["spec"], "minReplicas": 5, "maxReplicas": 2},
    }
    response = client.post(f"/apis/morgana.dev/v1alpha1/namespaces/{NAMESPACE}/agentautoscalers", json=bad)
    assert response.status_code == 422, response.text


def test_hooks_are_rendered_for_helm_to_run(release: str, kube: KubeApiServer) -> None:
    """What helm will run as hooks (run for real on the node tier): the migration Job before
    install and upgrade, the controller's stop Job before delete, the health check as the test."""
    rendered = helm("get", "hooks", RELEASE, "--namespace", NAMESPACE, kubeconfig=kube.kubeconfig).stdout
    hooks = list(yaml.safe_load_all(rendered))
    when = {(h["kind"], h["metadata"]["name"]): h["metadata"]["annotations"]["helm.sh/hook"] for h in hooks if h}
    assert when[("Job", "morgana-migrate")] == "pre-install,pre-upgrade"
    assert when[("Job", "morgana-controller-stop")] == "pre-delete"
    assert when[("Pod", "morgana-test-api-health")] == "test"
    (migrate,) = [h for h in hooks if h and h["metadata"]["name"] == "morgana-migrate"]
    assert migrate["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]


def test_controller_manager_creates_pods_from_the_deployments(release: str, client: httpx.Client) -> None:
    def api_pods() -> list[dict]:
        selector = "app.kubernetes.io/instance%3Dmorgana,app.kubernetes.io/component%3Dapi"
        pods = get(client, f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector={selector}")["items"]
        return pods if len(pods) == 2 else []

    pods = eventually(api_pods, 30, what="two API pods")
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False


def can(
    client: httpx.Client,
    service_account: str,
    verb: str,
    resource: str,
    *,
    group: str = "",
    subresource: str = "",
    name: str = "",
    namespace: str = NAMESPACE,
) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{NAMESPACE}:{service_account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"],
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
                "subresource": subresource,
                "name": name,
            },
        },
    }
    return ok(client.post("/apis/authorization.k8s.io/v1/subjectaccessreviews", json=review))["status"]["allowed"]


def test_controller_has_exactly_the_access_it_needs(release: str, client: httpx.Client) -> None:
    sa = "morgana-controller"
    assert can(client, sa, "patch", "deployments", group="apps", subresource="scale", name="morgana-agent")
    assert can(client, sa, "watch", "agentautoscalers", group="morgana.dev")
    assert can(client, sa, "patch", "agentautoscalers", group="morgana.dev", subresource="status")
    assert can(client, sa, "get", "secrets", name="morgana-livekit")
    assert not can(client, sa, "get", "secrets", name="morgana")  # the JWT key, passwords, the model's key
    assert can(client, sa, "create", "events")
    assert can(client, sa, "get", "agentautoscalers", group="morgana.dev")
    assert can(client, sa, "patch", "kopfpeerings", group="kopf.dev", name="morgana-controller")
    assert not can(client, sa, "create", "kopfpeerings", group="kopf.dev")  # the chart makes it
    assert not can(client, sa, "list", "customresourcedefinitions", group="apiextensions.k8s.io", namespace="")
    assert not can(client, sa, "get", "secrets", name="someone-elses")
    assert not can(client, sa, "list", "secrets")
    assert not can(client, sa, "patch", "deployments", group="apps", name="morgana-agent")
    assert not can(client, sa, "delete", "pods")
    assert not can(client, sa, "patch", "deployments", group="apps", subresource="scale", namespace="default")


def test_agent_may_only_annotate_pods(release: str, client: httpx.Client) -> None:
    """RBAC: patch pods, nothing else (not even read them); the chart's admission policy narrows
    the patch to the deletion-cost annotation of the worker's own pod (tests/agent)."""
    assert can(client, "morgana-agent", "patch", "pods")
    assert not can(client, "morgana-agent", "get", "pods")
    assert not can(client, "morgana-agent", "list", "pods")
    assert not can(client, "morgana-agent", "delete", "pods")
    policy = get(
        client, "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/voice-morgana-agent-pod-cost"
    )
    assert "system:serviceaccount:voice:morgana-agent" in policy["spec"]["matchConditions"][0]["expression"]
    assert not can(client, "morgana-agent", "get", "secrets", name="morgana")
    assert not can(client, "morgana-api", "get", "pods")
    assert not can(client, "morgana-api", "get", "secrets", name="morgana")


def test_upgrade_keeps_the_controllers_replicas(release: str, kube: KubeApiServer, client: httpx.Client) -> None:
    deployments = f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments"
    # What the autoscaler does: scale the workers through the scale subresource.
    ok(client.patch(f"{deployments}/morgana-agent/scale", json={"spec": {"replicas": 5}}, headers=MERGE_PATCH))

    helm(
        "upgrade",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "-f",
        DEFAULT_VALUES,
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "api.replicaCount=3",
        "--set",
        "logLevel=DEBUG",
        "--no-hooks",
        "--timeout",
        "2m",
        kubeconfig=kube.kubeconfig,
    )

    assert get(client, f"{deployments}/morgana-agent")["spec"]["replicas"] == 5
    assert get(client, f"{deployments}/morgana-api")["spec"]["replicas"] == 3
    history = helm("history", RELEASE, "--namespace", NAMESPACE, "-o", "yaml", kubeconfig=kube.kubeconfig)
    assert [h["status"] for h in yaml.safe_load(history.stdout)] == ["superseded", "deployed"]


def test_uninstall_removes_the_release_but_keeps_the_crd(
    release: str, kube: KubeApiServer, client: httpx.Client
) -> None:
    helm(
        "uninstall", RELEASE, "--namespace", NAMESPACE, "--no-hooks", "--wait", "--timeout", "1m",
        kubeconfig=kube.kubeconfig,
    )  # fmt: skip
    ns = f"/namespaces/{NAMESPACE}"
    assert names(client, f"/apis/apps/v1{ns}/deployments") == set()
    assert client.get(f"/api/v1{ns}/secrets/morgana").status_code == 404
    assert names(client, f"/apis/rbac.authorization.k8s.io/v1{ns}/roles") == set()
    assert names(client, f"/apis/morgana.dev/v1alpha1{ns}/agentautoscalers") == set()
    assert names(client, "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies") == set()
    # Helm never deletes CRDs from crds/ (that would delete every user's AgentAutoscalers).
    assert established(client, "agentautoscalers.morgana.dev")


def test_production_values_install_with_existing_secrets(
    kube: KubeApiServer, client: httpx.Client, release: str
) -> None:
    """Ingress, HPA, ServiceMonitors and every credential from Secrets the operator made."""
    namespace = "prod"
    create_namespace(client, namespace)
    for name, data in {
        "morgana-db-app": {"username": "morgana", "password": "pg"},
        "morgana-valkey-auth": {"password": "valkey"},
        "livekit-keys": {"api-key": "APIprod", "api-secret": "p" * 40},
        "morgana-openai": {"openai-api-key": "sk-prod"},
        "morgana-auth": {"jwt-secret": "j" * 64},
        "morgana-agent-user": {"agent-password": "Agent_Passw0rd_prod"},
    }.items():
        ok(
            client.post(
                f"/api/v1/namespaces/{namespace}/secrets",
                json={"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data},
            )
        )
    create_namespace(client, "monitoring")
    helm(
        "install",
        "morgana",
        CHART,
        "--namespace",
        namespace,
        "-f",
        CHART / "ci" / "production-values.yaml",
        "--no-hooks",
        "--timeout",
        "2m",
        kubeconfig=kube.kubeconfig,
    )
    assert names(client, f"/apis/networking.k8s.io/v1/namespaces/{namespace}/ingresses") == {"morgana-api"}
    assert names(client, f"/apis/autoscaling/v2/namespaces/{namespace}/horizontalpodautoscalers") == {"morgana-api"}
    assert client.get(f"/api/v1/namespaces/{namespace}/secrets/morgana").status_code == 404
    assert len(get(client, "/api/v1/namespaces/monitoring/configmaps?labelSelector=grafana_dashboard%3D1")["items"]) > 0
    helm("uninstall", "morgana", "--namespace", namespace, "--no-hooks", kubeconfig=kube.kubeconfig)
