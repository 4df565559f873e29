"""charts/morgana rendered by the real helm: lint, Kubernetes schemas, values schema, and the
wiring between the chart and the processes it runs (env names, secrets, probes, commands)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from morgana.agent.config import AgentSettings
from morgana.api.config import ApiSettings
from morgana_devtools.kube_apiserver import KUBERNETES_VERSION, servicemonitor_crd
from tests.chart.helm import (
    CHART,
    CI_VALUES,
    DEFAULT_VALUES,
    ROOT,
    env_names,
    find,
    helm,
    pod_specs,
    render,
    resolve_env,
    secret_values,
    template,
)

KUBE_SCHEMA_VERSION = KUBERNETES_VERSION.lstrip("v").rsplit(".", 1)[0] + ".0"
CI_IDS = [p.name.removesuffix("-values.yaml") for p in CI_VALUES]


@pytest.fixture(scope="module", params=CI_VALUES, ids=CI_IDS)
def rendered(request: pytest.FixtureRequest) -> tuple[Path, list[dict]]:
    return request.param, render([request.param])


def crd_validator(path: Path) -> tuple[str, jsonschema.Draft7Validator]:
    crd = next(d for d in yaml.safe_load_all(path.read_text()) if d)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = version["schema"]["openAPIV3Schema"]
    return f"{group}/{version['name']}/{kind}", jsonschema.Draft7Validator(schema)


def custom_resource_validators() -> dict[str, jsonschema.Draft7Validator]:
    paths = [*sorted((CHART / "crds").glob("*.yaml")), servicemonitor_crd()]
    return dict(crd_validator(p) for p in paths)


def test_the_ci_value_files_cover_the_documented_cases() -> None:
    assert set(CI_IDS) >= {"default", "minimal", "production", "existing-secrets"}


@pytest.mark.parametrize("values", CI_VALUES, ids=CI_IDS)
def test_helm_lint_strict_passes(values: Path) -> None:
    result = helm("lint", CHART, "--strict", "-f", values)
    assert "0 chart(s) failed" in result.stdout


def test_every_rendered_object_matches_the_kubernetes_schemas(rendered: tuple[Path, list[dict]]) -> None:
    custom = custom_resource_validators()
    checked = set()
    for obj in rendered[1]:
        key = f"{obj['apiVersion']}/{obj['kind']}"
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in custom:
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in custom[key].iter_errors(obj)]
            assert not errors, f"{name}: {errors}"
        else:
            try:
                kubernetes_validate.validate(obj, KUBE_SCHEMA_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(f"{name}: {error.message} at {list(error.path)}") from error
        checked.add(obj["kind"])
    assert {"Deployment", "Service"} <= checked


def test_default_release_has_every_component() -> None:
    objects = render([DEFAULT_VALUES])
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Deployment", "morgana-api"),
        ("Deployment", "morgana-agent"),
        ("Deployment", "morgana-controller"),
        ("Service", "morgana-api"),
        ("Job", "morgana-migrate"),
        ("Secret", "morgana"),
        ("Secret", "morgana-hook"),
        ("PodDisruptionBudget", "morgana-api"),
        ("PodDisruptionBudget", "morgana-agent"),
        ("Role", "morgana-controller"),
        ("Role", "morgana-agent"),
        ("AgentAutoscaler", "morgana-agent"),
        ("Pod", "morgana-test-api-health"),
        ("CustomResourceDefinition", "agentautoscalers.morgana.dev"),
    ]:
        assert expected in kinds, f"missing {expected}"
    dashboards = [o for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]
    assert len(dashboards) == len(list((CHART / "dashboards").glob("*.json"))) > 0
    for cm in dashboards:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (model,) = (json.loads(text) for text in cm["data"].values())
        assert model["uid"] and model["panels"]


def test_containers_run_with_restricted_security_defaults(rendered: tuple[Path, list[dict]]) -> None:
    for obj, spec in pod_specs(rendered[1]):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"] and container["resources"]["limits"]["memory"], name


def test_api_probes_use_health_and_readiness_endpoints() -> None:
    api = find(render(), "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["startupProbe"]["httpGet"]["path"] == "/health"


def test_agent_grace_period_outlasts_its_drain() -> None:
    objects = render()
    agent = find(objects, "Deployment", "-agent")["spec"]["template"]["spec"]
    env = resolve_env(agent["containers"][0], objects, {"metadata.name": "p", "metadata.namespace": "n"})
    assert agent["terminationGracePeriodSeconds"] > int(env["DRAIN_TIMEOUT_SECONDS"])
    result = template(sets=["agent.drainTimeoutSeconds=900"], check=False)
    assert result.returncode != 0
    assert "must exceed agent.drainTimeoutSeconds" in result.stderr


def test_autoscaled_agents_leave_replicas_to_the_controller() -> None:
    agent = find(render(), "Deployment", "-agent")
    assert "replicas" not in agent["spec"], "helm upgrades would reset the controller's replica count"
    autoscaler = find(render(), "AgentAutoscaler")
    assert autoscaler["spec"]["targetRef"]["name"] == agent["metadata"]["name"]
    assert autoscaler["spec"]["roomsPerWorker"] == 4
    fixed = find(render(sets=["controller.autoscaler.enabled=false", "agent.replicaCount=3"]), "Deployment", "-agent")
    assert fixed["spec"]["replicas"] == 3


def test_chart_secret_holds_exactly_the_referenced_keys() -> None:
    objects = render()
    secrets = secret_values(objects)
    # The LiveKit keys apart (the controller reads them, and may read nothing else); the hook's
    # copy, for the migration Job, holds both.
    assert set(secrets["morgana-livekit"]) == {"api-key", "api-secret"}
    assert not set(secrets["morgana-livekit"]) & set(secrets["morgana"])
    assert secrets["morgana-hook"] == secrets["morgana"] | secrets["morgana-livekit"]
    referenced: dict[str, set[str]] = {"morgana": set(), "morgana-livekit": set()}
    for _, spec in pod_specs(objects):
        for container in spec["containers"]:
            for entry in container.get("env", []):
                if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                    assert ref["key"] in secrets[ref["name"]], entry
                    if ref["name"] in referenced:
                        referenced[ref["name"]].add(ref["key"])
    for name, keys in referenced.items():
        assert keys == set(secrets[name]), f"{name}: keys stored but never used, or used but never stored"
    hook = find(objects, "Secret", "-hook")["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "hook-succeeded" in hook["helm.sh/hook-delete-policy"]


def test_existing_secrets_replace_the_chart_secret() -> None:
    objects = render([CHART / "ci" / "existing-secrets-values.yaml"])
    assert not [o for o in objects if o["kind"] == "Secret"], "no credentials given: the chart must not render a Secret"
    expected = {
        "POSTGRES_PASSWORD": ("pg-app", "pg-password"),
        "REDIS_PASSWORD": ("redis-auth", "redis-pass"),
        "LIVEKIT_API_KEY": ("lk-keys", "key"),
        "LIVEKIT_API_SECRET": ("lk-keys", "secret"),
        "OPENAI_API_KEY": ("openai", "token"),
        "JWT_SECRET_KEY": ("jwt", "signing-key"),
        "API_USER_PASSWORD": ("agent-user", "pw"),
    }
    seen = set()
    for _, spec in pod_specs(objects):
        for container in spec["containers"]:
            for entry in container.get("env", []):
                if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                    assert (ref["name"], ref["key"]) == expected[entry["name"]], entry
                    seen.add(entry["name"])
    assert seen == set(expected)
    autoscaler = find(objects, "AgentAutoscaler")["spec"]["livekit"]["credentialsSecretRef"]
    assert autoscaler == {"name": "lk-keys", "apiKeyKey": "key", "apiSecretKey": "secret"}
    controller_role = find(objects, "Role", "-controller")
    secret_rule = next(r for r in controller_role["rules"] if "secrets" in r["resources"])
    assert secret_rule == {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["lk-keys"], "verbs": ["get"]}


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["api.workers=four"], "at '/api/workers': got string, want integer"),
        (["api.replicas=2"], "additional properties 'replicas' not allowed"),
        (["agent.maxConcurrentCalls=0"], "/agent/maxConcurrentCalls"),
        (["environment=prod"], "/environment"),
        (["logFormat=text"], "/logFormat"),
        (["api.rateLimits.chat=lots"], "/api/rateLimits/chat"),
        (["auth.jwtSecret=short"], "/auth/jwtSecret"),
        (["livekit.url=http://livekit:7880"], "/livekit/url"),
        (["controller.autoscaler.pollIntervalSeconds=0"], "/controller/autoscaler/pollIntervalSeconds"),
        (["redis.tls=yes"], "/redis/tls"),
        (["grafana.dashboards.enabled=1"], "/grafana/dashboards/enabled"),
        (["agentUser.password=Short_Passw0rd"], "/agentUser/password"),
    ],
)
def test_values_schema_rejects_bad_values_with_a_clear_message(sets: list[str], message: str) -> None:
    result = template(sets=sets, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "set auth.jwtSecret"),
        (["auth.jwtSecret=" + "x" * 32], "set livekit.apiKey and livekit.apiSecret"),
        (["auth.jwtSecret=" + "x" * 32, "livekit.apiKey=k", "livekit.apiSecret=" + "y" * 32], "set postgres.password"),
    ],
)
def test_missing_credentials_fail_with_the_value_to_set(values: list[str], message: str) -> None:
    result = template(values=[], sets=values, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def settings_env_names(settings_class: type) -> set[str]:
    return {name.upper() for name in settings_class.model_fields}


def test_every_env_variable_the_chart_sets_is_read_by_its_process() -> None:
    """A misspelt variable would be silently ignored: each must be a setting (or a documented extra)."""
    from morgana_controller.config import ControllerSettings

    # Read by gunicorn_conf.py / uvicorn rather than the settings class:
    api = settings_env_names(ApiSettings) | {
        "WEB_CONCURRENCY",
        "GUNICORN_GRACEFUL_TIMEOUT",
        "FORWARDED_ALLOW_IPS",
        "REDIS_PASSWORD",
    }
    readers = {
        "api": api,
        "migrate": api,  # the same settings as the API it prepares
        "agent": settings_env_names(AgentSettings) | {"POD_NAME", "POD_NAMESPACE"},
        "controller": settings_env_names(ControllerSettings) | {"POD_NAME"},
        "controller-stop": settings_env_names(ControllerSettings),
        "test": {"MORGANA_URL"},
    }
    for values in CI_VALUES:
        objects = render([values])
        for obj, spec in pod_specs(objects):
            component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
            for container in spec["containers"]:
                unknown = env_names(container, objects) - readers[component]
                assert not unknown, f"{values.name}: {obj['metadata']['name']} sets unread {unknown}"


def check_config(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`morgana-api check-config` with exactly `env` (and PATH)."""
    return subprocess.run(
        [sys.executable, "-m", "morgana.api.cli", "check-config"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=60,
    )


@pytest.mark.parametrize("values", [DEFAULT_VALUES, CHART / "ci" / "minimal-values.yaml"], ids=["default", "minimal"])
def test_rendered_api_environment_is_accepted_in_production(values: Path, tmp_path: Path) -> None:
    """`morgana-api check-config` with exactly the env the chart gives the API and its Job (the
    minimal values, without the agent, once failed here: an agent email without a password)."""
    objects = render([values])
    environments = []
    for suffix in ("-api", "-migrate"):
        obj = find(objects, "Deployment" if suffix == "-api" else "Job", suffix)
        env = resolve_env(obj["spec"]["template"]["spec"]["containers"][0], objects)
        environments.append(env)
        assert env["ENVIRONMENT"] == "production"
        result = check_config(env, tmp_path)
        assert result.returncode == 0, result.stderr
        assert "configuration ok" in result.stdout
        assert "warning" not in result.stderr, result.stderr
    # The Job (inline env, it runs before the ConfigMap exists) and the API see the same settings;
    # only the Job, which creates the agent's account, gets its credentials.
    api_env, job_env = environments
    agent_account = {"API_USER_EMAIL", "API_USER_PASSWORD"}
    assert not agent_account & set(api_env)
    assert {k: v for k, v in api_env.items() if k in job_env} == {
        k: v for k, v in job_env.items() if k not in agent_account
    }
    assert (agent_account <= set(job_env)) == (values == DEFAULT_VALUES)


def api_environment(sets: list[str]) -> dict[str, str]:
    objects = render(sets=sets)
    return resolve_env(find(objects, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0], objects)


def test_the_playground_and_resumable_streams_follow_their_values(tmp_path: Path) -> None:
    """The playground is off unless its value turns it on (and the API then starts with it);
    chat streams are kept for resuming, and go on when their client leaves, unless told otherwise."""
    default = api_environment([])
    assert default["PLAYGROUND_ENABLED"] == "false"
    assert (default["CHAT_STREAM_RESUME_SECONDS"], default["CHAT_STREAM_ON_DISCONNECT"]) == ("600", "continue")
    chosen = api_environment(
        ["api.playground.enabled=true", "api.chatStreams.resumeSeconds=0", "api.chatStreams.onDisconnect=cancel"]
    )
    assert chosen["PLAYGROUND_ENABLED"] == "true"
    assert (chosen["CHAT_STREAM_RESUME_SECONDS"], chosen["CHAT_STREAM_ON_DISCONNECT"]) == ("0", "cancel")
    result = check_config(chosen, tmp_path)
    assert result.returncode == 0, result.stderr
    refused = template(sets=["api.chatStreams.onDisconnect=later"], check=False)
    assert refused.returncode != 0 and "onDisconnect" in refused.stderr


def test_the_agents_account_goes_only_where_it_is_used() -> None:
    """With the agent: the migration Job (which creates the account) and the workers (which log in
    with it). Without it: nowhere, and no password is stored, unless one is given for workers
    run elsewhere."""
    objects = render()
    holders = {
        obj["metadata"]["name"]
        for obj, spec in pod_specs(objects)
        if {"API_USER_EMAIL", "API_USER_PASSWORD"} <= env_names(spec["containers"][0], objects)
    }
    assert holders == {"morgana-migrate", "morgana-agent"}

    minimal = CHART / "ci" / "minimal-values.yaml"
    objects = render([minimal])
    assert not [
        obj["metadata"]["name"]
        for obj, spec in pod_specs(objects)
        if {"API_USER_EMAIL", "API_USER_PASSWORD"} & env_names(spec["containers"][0], objects)
    ]
    assert "agent-password" not in secret_values(objects)["morgana"]

    password = "0123456789abcdef0123456789abcdef"  # what `openssl rand -hex 16` prints
    objects = render([minimal], sets=[f"agentUser.password={password}"])
    job = find(objects, "Job", "-migrate")["spec"]["template"]["spec"]["containers"][0]
    assert resolve_env(job, objects)["API_USER_PASSWORD"] == password


def test_rendered_agent_environment_loads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    objects = render()
    agent = find(objects, "Deployment", "-agent")["spec"]["template"]["spec"]["containers"][0]
    env = resolve_env(agent, objects, {"metadata.name": "morgana-agent-abc", "metadata.namespace": "voice"})
    monkeypatch.chdir(tmp_path)  # no .env file
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = AgentSettings()
    assert settings.morgana_backend_url == "http://morgana-api:8000"
    assert settings.api_user_password.get_secret_value() == "Agent_Passw0rd_for_CI"
    assert settings.max_concurrent_calls == 4
    assert (
        settings.drain_timeout_seconds
        < find(objects, "Deployment", "-agent")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_redis_password_is_spliced_into_the_url() -> None:
    objects = render(sets=["redis.password=s3cret"])
    api = find(objects, "Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    env = resolve_env(api, objects)
    assert env["REDIS_URL"] == "redis://:s3cret@morgana-valkey:6379/0"


class _AliveButNotReady(http.server.BaseHTTPRequestHandler):
    """An API whose /health answers and whose /ready says a dependency is down."""

    def do_GET(self) -> None:
        ok = self.path == "/health"
        body = {"status": "ok"} if ok else {"status": "unavailable", "components": {"postgres": "unreachable"}}
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: object) -> None:
        pass


def run_helm_test_command(url: str) -> subprocess.CompletedProcess[str]:
    pod = find(render(), "Pod", "-api-health")
    container = pod["spec"]["containers"][0]
    assert container["command"][0] == "python"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MORGANA_URL"] == "http://morgana-api:8000"
    return subprocess.run(
        [sys.executable, *container["command"][1:]],
        env={**os.environ, "MORGANA_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_helm_test_pod_passes_against_a_ready_api(api) -> None:
    result = run_helm_test_command(api.url)
    assert result.returncode == 0, result.stderr
    assert "/ready ready" in result.stdout


def test_helm_test_pod_fails_when_the_api_is_not_ready() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AliveButNotReady)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_helm_test_command(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert result.returncode != 0
    assert "503" in result.stderr


def test_values_file_documents_every_key() -> None:
    """Every leaf of values.yaml has a `## @param` line, and every @param names a real key."""
    text = (CHART / "values.yaml").read_text()
    documented = {line.split()[2] for line in text.splitlines() if line.strip().startswith("## @param ")}

    def leaves(node: object, prefix: str = "") -> set[str]:
        if (
            isinstance(node, dict)
            and node
            and not prefix.endswith(("resources", "SecurityContext", "requests", "podSelector"))
        ):
            return set().union(*(leaves(v, f"{prefix}.{k}" if prefix else k) for k, v in node.items()))
        return {prefix}

    keys = leaves(yaml.safe_load(text))
    assert keys - documented == set(), "undocumented values"
    assert documented - keys == set(), "documented values that do not exist"


def test_values_schema_covers_every_key() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)

    def missing(node: dict, sub: dict, path: str) -> list[str]:
        out = []
        for key, value in node.items():
            props = sub.get("properties", {})
            if key not in props:
                if sub.get("additionalProperties") is False:
                    out.append(f"{path}{key}")
                continue
            if isinstance(value, dict):
                out += missing(value, props[key], f"{path}{key}.")
        return out

    assert missing(values, schema, "") == []


def test_chart_readme_parameters_table_is_current() -> None:
    """Regenerate with `python scripts/chart_params.py --write` after editing values.yaml."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_params", ROOT / "scripts" / "chart_params.py")
    assert spec and spec.loader
    chart_params = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chart_params)
    readme = (CHART / "README.md").read_text()
    current = readme.split(chart_params.BEGIN, 1)[1].split(chart_params.END, 1)[0].strip()
    assert current == chart_params.table().strip()


def test_controller_role_reads_only_the_livekit_secret_and_scales_only_through_the_subresource() -> None:
    """The chart's Role is the controller's only RBAC source (its tests run under it): the
    Secret grant is narrowed to the LiveKit credentials, and Deployments are read, never written."""
    role = find(render(), "Role", "-controller")
    (secrets,) = (r for r in role["rules"] if r["resources"] == ["secrets"])
    assert secrets["resourceNames"] == ["morgana-livekit"] and secrets["verbs"] == ["get"]
    (deployments,) = (r for r in role["rules"] if r["resources"] == ["deployments"])
    assert deployments["verbs"] == ["get"]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] for r in role["rules"])


def test_the_chart_makes_the_controllers_peering_object() -> None:
    """Made by the chart, so that `helm uninstall` removes it: the controller may not create it."""
    objects = render()
    controller = find(objects, "Deployment", "-controller")["spec"]["template"]["spec"]["containers"][0]
    peering_name = resolve_env(controller, objects, {"metadata.name": "p"})["PEERING_NAME"]
    peering = find(objects, "KopfPeering")
    assert peering["metadata"]["name"] == peering_name
    role = find(objects, "Role", "-controller")
    (rule,) = (r for r in role["rules"] if r["resources"] == ["kopfpeerings"])
    assert "create" not in rule["verbs"]


def test_uninstall_first_stops_the_controller_with_a_hook_of_its_own() -> None:
    """A pre-delete hook Job runs `morgana-controller stop` on the controller's Deployment, with a
    ServiceAccount whose Role allows that and nothing more; all of it removed once it succeeded."""
    objects = render()
    hook_objects = [o for o in objects if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]
    assert sorted(o["kind"] for o in hook_objects) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    for obj in hook_objects:
        assert obj["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        weight = int(obj["metadata"]["annotations"]["helm.sh/hook-weight"])
        assert weight < 0 if obj["kind"] != "Job" else weight == 0, obj["kind"]  # RBAC before the Job
    job = find(objects, "Job", "-controller-stop")["spec"]["template"]["spec"]
    controller = find(objects, "Deployment", "-controller")
    assert job["containers"][0]["image"] == controller["spec"]["template"]["spec"]["containers"][0]["image"]
    assert job["containers"][0]["args"][:3] == ["stop", "--deployment", controller["metadata"]["name"]]
    assert job["serviceAccountName"] == find(objects, "ServiceAccount", "-controller-stop")["metadata"]["name"]
    rules = find(objects, "Role", "-controller-stop")["rules"]
    assert rules == [
        {
            "apiGroups": ["apps"],
            "resources": ["deployments"],
            "resourceNames": ["morgana-controller"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale"],
            "resourceNames": ["morgana-controller"],
            "verbs": ["patch"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": ["morgana.dev"], "resources": ["agentautoscalers"], "verbs": ["get", "list", "patch"]},
    ]
    assert not [
        o
        for o in render([CHART / "ci" / "minimal-values.yaml"])
        if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"
    ]


def test_network_policies_let_in_only_what_each_component_serves() -> None:
    """(What a CNI enforces is not tested here: none runs. What the policies say is.)"""
    ingress_ns = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    objects = render(
        sets=[
            "networkPolicy.apiFrom[0].namespaceSelector.matchLabels.kubernetes\\.io/metadata\\.name=ingress-nginx",
            "networkPolicy.agentEgress.enabled=true",
            "networkPolicy.postgres.enabled=true",
            "networkPolicy.redis.enabled=true",
        ]
    )
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {"morgana-api", "morgana-agent", "morgana-controller", "morgana-postgres", "morgana-redis"}
    release = {"app.kubernetes.io/name": "morgana", "app.kubernetes.io/instance": "morgana"}

    http, metrics = policies["morgana-api"]["ingress"]
    assert http["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert http["from"] == [{"podSelector": {"matchLabels": release}}, ingress_ns]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    # The workers and the controller serve only metrics and probes.
    for name in ("morgana-agent", "morgana-controller"):
        assert [rule["ports"][0]["port"] for rule in policies[name]["ingress"]] == ["metrics", "health"]
    assert policies["morgana-agent"]["ingress"][1]["ports"][1] == {"port": "ready", "protocol": "TCP"}
    agent = policies["morgana-agent"]
    assert agent["policyTypes"] == ["Ingress", "Egress"]
    assert agent["egress"][0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"
    assert {"port": 7882, "protocol": "UDP"} in agent["egress"][1]["ports"]
    # Postgres from the API and the migration Job only (and CloudNativePG's own); Redis from the API.
    (postgres,) = policies["morgana-postgres"]["ingress"]
    assert postgres["from"][0]["podSelector"]["matchExpressions"] == [
        {"key": "app.kubernetes.io/component", "operator": "In", "values": ["api", "migrate"]}
    ]
    (redis,) = policies["morgana-redis"]["ingress"]
    assert redis["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert redis["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["api"]

    # By default: every port of the API open to all, egress open, no policy for other charts' pods.
    defaults = {o["metadata"]["name"]: o["spec"] for o in render() if o["kind"] == "NetworkPolicy"}
    assert set(defaults) == {"morgana-api", "morgana-agent", "morgana-controller"}
    assert "from" not in defaults["morgana-api"]["ingress"][0]
    assert defaults["morgana-agent"]["policyTypes"] == ["Ingress"]
