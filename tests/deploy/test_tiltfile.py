"""The Tiltfile, evaluated against recording stand-ins for Tilt (see tiltfile_sim.py).

Each test checks something `tilt up` depends on and would only find out on a developer's
machine: the builds, the live update paths, the image references Tilt must inject, the order
of resources and the pinned versions.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.chart.helm import declared_env
from tests.deploy.conftest import (
    INSTALL_SH,
    ROOT,
    VALUES,
    Dockerfile,
    controller_dockerfile_text,
    dockerfile,
    load_yaml,
)
from tests.deploy.tiltfile_sim import (
    FallBackOn,
    Link,
    PortForward,
    Run,
    Sync,
    TiltRun,
    evaluate,
)

IMAGE_REFS = {"morgana-api": "api", "morgana-agent": "agent", "morgana-controller": "controller"}
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod")


def component_dockerfile(run: TiltRun, component: str) -> Dockerfile:
    """The Dockerfile text the Tiltfile read for a component (the overlay's for the controller)."""
    if component == "controller" and not (ROOT / "images/controller/Dockerfile").exists():
        return Dockerfile(controller_dockerfile_text())
    return dockerfile(component)


def containers(objects: Iterable[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload object, container) for every container of every workload."""
    found = []
    for obj in objects:
        if obj.get("kind") not in WORKLOAD_KINDS:
            continue
        spec = obj["spec"]
        if obj["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        pod = spec if obj["kind"] == "Pod" else spec["template"]["spec"]
        found += [(obj, c) for c in pod.get("containers", []) + pod.get("initContainers", [])]
    return found


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def repository(image: str) -> str:
    """An image reference without its tag or digest, normalised as Tilt matches them."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def workload(run: TiltRun, kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in run.objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name} rendered {len(matches)} times"
    return matches[0]


def install_sh_releases() -> dict[str, dict[str, str]]:
    """`helm upgrade --install RELEASE CHART --version "$VAR" [--namespace NS] [-f FILE]` in install.sh."""
    text = INSTALL_SH.read_text().replace("\\\n", " ")
    releases = {}
    for match in re.finditer(r"helm upgrade --install (\S+) (\S+)(.*)", text):
        release, chart, rest = match[1], match[2], match[3]
        words = shlex.split(rest)
        entry = {"chart": chart}
        if "--version" in words:
            entry["version_var"] = words[words.index("--version") + 1].strip("${}")
        if "-f" in words:
            entry["values"] = words[words.index("-f") + 1].replace("$VALUES/", "deploy/values/")
        if "--namespace" in words:
            entry["namespace"] = words[words.index("--namespace") + 1]
        releases[release] = entry
    return releases


# ---- Images ----


def test_every_image_is_built_from_its_own_dockerfile_with_the_repo_root_as_context(tilt_variant: TiltRun) -> None:
    refs = [b.ref for b in tilt_variant.builds]
    assert len(refs) == len(set(refs)), refs
    assert set(refs) <= set(IMAGE_REFS), refs
    assert {"morgana-api", "morgana-agent"} <= set(refs)
    for build in tilt_variant.builds:
        component = IMAGE_REFS[build.ref]
        assert (ROOT / build.context).resolve() == ROOT, f"{build.ref}: context {build.context}"
        assert "dockerfile" not in build.kwargs or (ROOT / build.kwargs["dockerfile"]).is_file()
        contents = build.kwargs.get("dockerfile_contents")
        assert contents, f"{build.ref} builds from neither a Dockerfile nor its contents"
        original = component_dockerfile(tilt_variant, component).text
        # The released image's Dockerfile, unchanged, plus a development layer at the end.
        assert contents.startswith(original), f"{build.ref} does not build images/{component}/Dockerfile"
        assert f"images/{component}/Dockerfile" in tilt_variant.files_read


def test_the_controller_is_built_when_its_dockerfile_exists_and_disabled_otherwise(
    tilt: TiltRun, tilt_with_controller: TiltRun, tilt_without_controller: TiltRun
) -> None:
    assert {b.ref for b in tilt_with_controller.builds} == set(IMAGE_REFS)
    assert "morgana-controller" in {
        o["metadata"]["name"] for o in tilt_with_controller.objects if o["kind"] == "Deployment"
    }
    assert "morgana-controller" not in {b.ref for b in tilt_without_controller.builds}
    (call,) = tilt_without_controller.helm_calls
    assert {"controller.enabled=false", "controller.autoscaler.enabled=false"} <= set(call["set"])
    assert not [
        o
        for o in tilt_without_controller.objects
        if o["metadata"]["name"] == "morgana-controller" and o["kind"] == "Deployment"
    ]
    assert tilt_without_controller.warnings, "deploying without the controller must say so"
    # This checkout is one of the two.
    has_controller = (ROOT / "images/controller/Dockerfile").exists()
    assert ("morgana-controller" in {b.ref for b in tilt.builds}) == has_controller


def test_the_build_context_holds_everything_the_dockerfiles_copy(tilt_variant: TiltRun) -> None:
    for build in tilt_variant.builds:
        only = [entry.rstrip("/") for entry in build.kwargs.get("only", [])]
        assert only, f"{build.ref}: no `only`, every file in the repository would trigger a rebuild"
        df = Dockerfile(build.kwargs["dockerfile_contents"])
        for source in df.context_copies():
            source = source.rstrip("/")
            assert any(source == entry or source.startswith(entry + "/") for entry in only), (
                f"{build.ref}: the Dockerfile copies {source!r}, outside only={only}"
            )
        for entry in only:
            assert (ROOT / entry).exists(), f"{build.ref}: only= lists a missing path {entry}"


def test_live_update_syncs_the_sources_over_the_package_the_image_installed(tilt_variant: TiltRun) -> None:
    for build in tilt_variant.builds:
        component = IMAGE_REFS[build.ref]
        original = component_dockerfile(tilt_variant, component)
        installed = original.installed_package_dir()
        # The runtime stage carries the build stage's virtualenv at the same path.
        venv = original.env(original.stage("build"))["UV_PROJECT_ENVIRONMENT"]
        assert f"--from=build {venv} {venv}" in [rest for op, rest in original.runtime() if op == "COPY"]

        syncs = [s for s in build.live_update if isinstance(s, Sync)]
        assert syncs, f"{build.ref}: no live update sync"
        for step in syncs:
            assert (ROOT / step.src).is_dir(), f"{build.ref}: sync source {step.src} is missing"
            package = Path(step.src.rstrip("/")).name
            assert (ROOT / step.src / "__init__.py").is_file(), f"{build.ref}: {step.src} is not a package"
            assert step.dest.rstrip("/") == original.installed_package_dir(package), (
                f"{build.ref}: syncs {step.src} to {step.dest}"
            )
        # The image's own package is among them (the controller's also carries the shared core).
        own = {"api": "morgana", "agent": "morgana", "controller": "morgana_controller"}[component]
        assert installed.rsplit("/", 1)[0] + "/" + own in [s.dest.rstrip("/") for s in syncs]
        # Dependency changes need the image rebuilt (uv sync), not a file sync.
        (fallback,) = [s for s in build.live_update if isinstance(s, FallBackOn)]
        assert {"pyproject.toml", "uv.lock"} <= set(fallback.paths)
        assert build.live_update.index(fallback) == 0, "fall_back_on must come before the syncs"


def test_the_development_layer_lets_the_app_user_write_what_live_update_writes(tilt_variant: TiltRun) -> None:
    for build in tilt_variant.builds:
        component = IMAGE_REFS[build.ref]
        original = component_dockerfile(tilt_variant, component)
        dev = Dockerfile(build.kwargs["dockerfile_contents"])
        user = original.user()
        uid = user.split(":")[0]
        # Same final user and entry point as the released image.
        assert dev.user() == user
        assert dev.exec_form("ENTRYPOINT") == original.exec_form("ENTRYPOINT")
        added = dev.runtime()[len(original.runtime()) :]
        runs = " && ".join(rest for op, rest in added if op == "RUN")
        for step in build.live_update:
            if isinstance(step, Sync):
                assert re.search(rf"chown -R {uid}(:\d+)? (\S+ )*{re.escape(step.dest.rstrip('/'))}( |$)", runs), runs
        if build.restart:
            restart_dir = str(Path(build.restart["restart_file"]).parent)
            assert re.search(rf"mkdir -p {re.escape(restart_dir)}\b", runs) and re.search(
                rf"chown {uid}(:\d+)? {re.escape(restart_dir)}( |$)", runs
            ), runs


def test_containers_live_updated_by_tilt_have_a_writable_root_filesystem(tilt_variant: TiltRun) -> None:
    built = set(IMAGE_REFS) & {b.ref for b in tilt_variant.builds}
    for obj, container in containers(tilt_variant.objects):
        if repository(container["image"]) in built and obj["kind"] == "Deployment":
            assert container["securityContext"].get("readOnlyRootFilesystem") is False, (
                f"{obj['metadata']['name']}: live update cannot write a read-only root filesystem"
            )


def test_the_api_reloads_gunicorn_after_a_sync(tilt: TiltRun) -> None:
    api = tilt.build("morgana-api")
    assert api.restart is None
    assert isinstance(api.live_update[-1], Run) and api.live_update[-1].cmd == "kill -HUP 1"
    # PID 1 must be gunicorn: `morgana-api serve` execs it only with more than one worker.
    assert dockerfile("api").exec_form("ENTRYPOINT") == ["morgana-api"]
    deployment = workload(tilt, "Deployment", "morgana-api")
    (container,) = pod_spec(deployment)["containers"]
    assert "command" not in container and container.get("args", dockerfile("api").exec_form("CMD")) == ["serve"]
    env = declared_env(container, tilt.objects)
    assert int(env["WEB_CONCURRENCY"]) > 1, "one worker runs uvicorn without gunicorn; SIGHUP would stop it"
    assert "shareProcessNamespace" not in pod_spec(deployment)


def test_agent_and_controller_restart_their_process_with_the_images_command(tilt_variant: TiltRun) -> None:
    restarted = [b for b in tilt_variant.builds if b.ref != "morgana-api"]
    assert restarted
    for build in restarted:
        component = IMAGE_REFS[build.ref]
        original = component_dockerfile(tilt_variant, component)
        assert build.restart, f"{build.ref} must restart its process after a live update"
        assert build.restart["entrypoint"] == original.exec_form("ENTRYPOINT")
        (container,) = pod_spec(workload(tilt_variant, "Deployment", build.ref))["containers"]
        assert "command" not in container, "the chart overrides the command; Tilt's wrapper replaces it"
        # Under Tilt the container runs wrapper + entrypoint + the chart's args (Kubernetes keeps
        # `args` when only `command` changes); that must be what the image runs by default.
        default_cmd = [rest for op, rest in original.runtime() if op == "CMD"]
        image_args = original.exec_form("CMD") if default_cmd else []
        default_argv = original.exec_form("ENTRYPOINT") + container.get("args", image_args)
        under_tilt = build.restart["entrypoint"] + container.get("args", [])
        assert under_tilt == default_argv, f"{build.ref}: {under_tilt} under Tilt, {default_argv} released"
        # The trigger file is baked into the image: no volume may hide it.
        restart_file = build.restart["restart_file"]
        for mount in container.get("volumeMounts", []):
            assert not (restart_file + "/").startswith(mount["mountPath"].rstrip("/") + "/"), (
                f"{build.ref}: {mount['mountPath']} is mounted over the restart file {restart_file}"
            )
        assert not any(isinstance(step, Run) for step in build.live_update), (
            "restart_process appends its own restart step"
        )


# ---- The chart and its images ----


def test_the_morgana_chart_is_rendered_from_the_repo_with_the_dev_values(tilt_variant: TiltRun) -> None:
    (call,) = tilt_variant.helm_calls
    assert (ROOT / call["paths"] / "Chart.yaml").is_file()
    assert call["name"] == "morgana"
    assert call["namespace"] == "morgana"
    assert call["values"] == ["deploy/values/morgana-dev.yaml"]
    for values in call["values"]:
        assert (ROOT / values).is_file()
    assert len(tilt_variant.k8s_yaml) == 2, "the namespace and the chart"


def test_the_namespace_is_applied_with_the_objects_no_resource_waits_for(tilt_variant: TiltRun) -> None:
    namespaces = [o for o in tilt_variant.objects if o["kind"] == "Namespace"]
    assert [o["metadata"]["name"] for o in namespaces] == ["morgana"]
    assigned = {s.split(":")[0] for r in tilt_variant.k8s_resources.values() for s in r.get("objects", [])}
    assert "morgana" not in assigned, "the Namespace must stay with the uncategorized objects"
    for obj in tilt_variant.objects:
        if obj["kind"] not in (
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ):
            assert obj["metadata"].get("namespace") == "morgana", f"{obj['kind']}/{obj['metadata']['name']}"


def test_tilt_replaces_every_morgana_image_the_chart_renders(tilt_variant: TiltRun) -> None:
    built = {b.ref for b in tilt_variant.builds}
    rendered = {repository(c["image"]) for _, c in containers(tilt_variant.objects)}
    morgana_images = {r for r in rendered if r.rsplit("/", 1)[-1].startswith("morgana-")}
    # Tilt injects its images where the rendered reference names the docker_build's image.
    assert morgana_images == built, f"rendered {sorted(morgana_images)}, Tilt builds {sorted(built)}"
    # And the dev values' registry is cleared for that (the chart joins registry and repository).
    (call,) = tilt_variant.helm_calls
    assert "image.registry=" in call["set"]
    dev = load_yaml(VALUES / "morgana-dev.yaml")
    for ref in built:
        component = IMAGE_REFS[ref]
        assert dev.get(component, {}).get("image", {}).get("repository", ref) == ref


def test_tilt_sees_no_helm_test_pods(tilt: TiltRun) -> None:
    assert not [o for o in tilt.objects if o["kind"] == "Pod"], "Tilt drops templates/tests/ objects"


def test_the_model_settings_come_from_the_environment(helm_binary: Path) -> None:
    run = evaluate(
        helm_binary,
        env={
            "OPENAI_BASE_URL": "http://host.docker.internal:11434/v1",
            "LLM_MODEL": "llama3.2",
            "MORGANA_NAMESPACE": "voice-dev",
        },
    )
    (call,) = run.helm_calls
    assert "llm.baseUrl=http://host.docker.internal:11434/v1" in call["set"]
    assert "llm.model=llama3.2" in call["set"]
    assert call["namespace"] == "voice-dev"
    (container,) = pod_spec(workload(run, "Deployment", "morgana-api"))["containers"]
    env = declared_env(container, run.objects)
    assert env["OPENAI_BASE_URL"] == "http://host.docker.internal:11434/v1"
    assert env["LLM_MODEL"] == "llama3.2"
    assert {r["namespace"] for r in run.helm_resources.values()} == {"voice-dev", "cnpg-system"}


# ---- Resources ----


def defined_resources(run: TiltRun) -> set[str]:
    workloads = {o["metadata"]["name"] for o in run.objects if o["kind"] in WORKLOAD_KINDS}
    renamed = {name for name, r in run.k8s_resources.items() if r.get("new_name")}
    return set(run.local_resources) | set(run.helm_resources) | workloads | renamed


def all_resource_deps(run: TiltRun) -> dict[str, list[str]]:
    deps: dict[str, list[str]] = {}
    for group in (run.local_resources, run.helm_resources, run.k8s_resources):
        for name, resource in group.items():
            deps.setdefault(name, [])
            deps[name] += list(resource.get("resource_deps") or [])
    return deps


def test_every_resource_dependency_names_a_resource_and_there_is_no_cycle(tilt_variant: TiltRun) -> None:
    defined = defined_resources(tilt_variant)
    deps = all_resource_deps(tilt_variant)
    for name, needs in deps.items():
        assert name in defined, f"k8s_resource({name!r}) matches no resource"
        for dep in needs:
            assert dep in defined, f"{name} depends on {dep!r}, which is not a resource"
    # Topological order exists.
    done: set[str] = set()
    pending = dict(deps)
    while pending:
        ready = [n for n, needs in pending.items() if set(needs) <= done]
        assert ready, f"dependency cycle among {sorted(pending)}"
        for n in ready:
            done.add(n)
            del pending[n]


def test_resources_start_in_dependency_order(tilt_variant: TiltRun) -> None:
    deps = all_resource_deps(tilt_variant)

    def closure(name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(deps.get(name, []))
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo += deps.get(dep, [])
        return seen

    assert {"helm-repos", "cnpg-operator"} <= closure("morgana-db")
    assert {
        "morgana-db",
        "morgana-db-ready",
        "morgana-migrate",
        "morgana-valkey",
        "livekit-server",
        "morgana-secrets",
    } <= closure("morgana-api")
    assert {"morgana-api", "livekit-server"} <= closure("morgana-agent")
    assert "morgana-secrets" in closure("livekit-server"), "LiveKit mounts the morgana-livekit Secret"
    if "morgana-controller" in deps:
        assert {"livekit-server", "morgana-secrets"} <= closure("morgana-controller")
        crds = tilt_variant.k8s_resources.get("morgana-crds")
        if crds:
            assert "morgana-crds" in closure("morgana-controller")


def test_the_migration_job_runs_once_and_then_on_demand(tilt: TiltRun) -> None:
    migrate = tilt.k8s_resources["morgana-migrate"]
    workload(tilt, "Job", "morgana-migrate")
    assert migrate["trigger_mode"] == "TRIGGER_MODE_MANUAL"
    assert migrate["auto_init"] is True


def test_custom_resources_wait_for_their_definitions(tilt_variant: TiltRun) -> None:
    rendered = {(o["metadata"]["name"], o["kind"].lower()) for o in tilt_variant.objects}
    crd_names = {n for n, k in rendered if k == "customresourcedefinition"}
    assigned: dict[str, str] = {}
    for name, resource in tilt_variant.k8s_resources.items():
        for selector in resource.get("objects", []):
            obj_name, kind = selector.split(":")[:2]
            assert (obj_name, kind) in rendered, f"{name}: objects={selector} matches nothing rendered"
            assigned[selector] = name
    for name in crd_names:
        assert assigned.get(f"{name}:customresourcedefinition") == "morgana-crds"
    for obj in tilt_variant.objects:
        if obj["kind"] == "AgentAutoscaler":
            owner = assigned.get(f"{obj['metadata']['name']}:agentautoscaler")
            assert owner == "morgana-controller", "the AgentAutoscaler goes with the controller"


def test_every_resource_is_labelled(tilt_variant: TiltRun) -> None:
    for group in (tilt_variant.local_resources, tilt_variant.helm_resources):
        for name, resource in group.items():
            assert resource.get("labels"), f"{name} has no label"
    for name, resource in tilt_variant.k8s_resources.items():
        if name in tilt_variant.helm_resources:
            continue
        assert resource.get("labels"), f"{name} has no label"


def test_ports_reach_the_api_and_livekit_without_conflicts(tilt: TiltRun) -> None:
    forwards = [pf for r in tilt.k8s_resources.values() for pf in r.get("port_forwards", [])]
    assert all(isinstance(pf, PortForward) for pf in forwards)
    forwarded = {pf.local_port for pf in forwards}
    kind = load_yaml(ROOT / "kind-config.yaml")
    mapped = {m["hostPort"] for node in kind["nodes"] for m in node.get("extraPortMappings", [])}
    assert {8000, 7880} <= forwarded | mapped
    assert not forwarded & mapped, f"Tilt would forward ports kind already publishes: {forwarded & mapped}"
    assert len(forwarded) == len(forwards)

    (api_forward,) = tilt.k8s_resources["morgana-api"]["port_forwards"]
    (container,) = pod_spec(workload(tilt, "Deployment", "morgana-api"))["containers"]
    assert api_forward.local_port == 8000
    assert api_forward.container_port in {p["containerPort"] for p in container["ports"]}
    links = [lk.url for r in tilt.k8s_resources.values() for lk in r.get("links", []) if isinstance(lk, Link)]
    assert "http://localhost:7880" in links


# ---- Versions and dependency charts: the same as deploy/install.sh ----


def test_dependency_charts_use_the_pinned_versions(tilt: TiltRun, versions: dict[str, str]) -> None:
    releases = install_sh_releases()
    repo_charts = {r: e for r, e in releases.items() if "version_var" in e}
    assert {e["chart"] for e in repo_charts.values()} == {h["chart"] for h in tilt.helm_resources.values()}
    for name, resource in tilt.helm_resources.items():
        release = resource.get("release_name") or name
        assert release in repo_charts, f"Tilt installs release {release}, deploy/install.sh does not"
        expected = repo_charts[release]
        assert resource["chart"] == expected["chart"]
        flags = list(resource.get("flags") or [])
        assert flags.count("--version") == 1
        assert flags[flags.index("--version") + 1] == versions[expected["version_var"]]
        if "values" in expected:
            assert flags[flags.index("--values") + 1] == expected["values"]
            assert (ROOT / expected["values"]).is_file()
            assert expected["values"] in resource.get("deps", []), f"{name} must redeploy when its values change"
        namespace = expected.get("namespace", "").replace("$NAMESPACE", "morgana")
        assert resource.get("namespace") == namespace
    livekit = tilt.helm_resources["livekit-server"]["flags"]
    assert f"image.tag={versions['LIVEKIT_SERVER_VERSION']}" in livekit
    assert "deploy/versions.env" in tilt.files_read


def test_secrets_and_waits_run_deploy_install_sh_steps(tilt: TiltRun) -> None:
    text = INSTALL_SH.read_text()
    steps = set(re.findall(r"^step_([a-z_]+)\(\)", text, re.MULTILINE))
    for name, resource in tilt.local_resources.items():
        words = shlex.split(resource["cmd"])
        assert words[:2] == ["bash", "deploy/install.sh"], f"{name}: {resource['cmd']}"
        for step in words[2:]:
            assert step.replace("-", "_") in steps, f"{name}: install.sh has no step {step}"
    assert shlex.split(tilt.local_resources["morgana-secrets"]["cmd"])[2:] == ["namespace", "secrets"]


def test_the_tiltfile_only_loads_extensions_it_declares(tilt: TiltRun) -> None:
    assert set(tilt.loads) == {"ext://helm_resource", "ext://restart_process"}
    assert tilt.settings["version_settings"]["kwargs"]["constraint"].startswith(">=")


@pytest.mark.parametrize("ref", sorted(IMAGE_REFS))
def test_image_names_match_the_chart_repositories(ref: str) -> None:
    chart_values = load_yaml(ROOT / "charts/morgana/values.yaml")
    assert chart_values[IMAGE_REFS[ref]]["image"]["repository"] == ref


def test_uninstall_hooks_are_not_applied_as_workloads(tilt: TiltRun) -> None:
    """The chart's pre-delete hook stops the controller: Tilt must not apply it with the rest."""
    rendered = [o for o in tilt.objects if o["metadata"]["name"].endswith("-controller-stop")]
    assert not rendered, [f"{o['kind']}/{o['metadata']['name']}" for o in rendered]
    assert "morgana-controller" in tilt.k8s_resources
