"""The controller image's build and start commands, run on this machine (no Docker engine here).

The `uv sync` lines, the entry point, user, ports and environment are read from the Dockerfile
itself, so the image and this test cannot drift apart; the result must serve an AgentAutoscaler
on a real Kubernetes API server against a real LiveKit server, answer its liveness probe and
metrics, write nothing to disk, and exit cleanly on SIGTERM, as Kubernetes runs it, leaving
neither a peering entry nor a finalizer behind.
"""

import os
import signal
import subprocess
from pathlib import Path

import httpx

from morgana.devtools.kube_apiserver import KubeApiServer
from morgana.devtools.livekit_server import LiveKitServer
from morgana.devtools.services import free_port
from tests.controller.harness import Cluster, eventually
from tests.images.dockerfile import ROOT, build_image_venv, container_env_here, exec_form, runtime_env, runtime_stage

DOCKERFILE = ROOT / "images" / "controller" / "Dockerfile"


def test_image_installs_the_locked_controller_and_it_scales_probes_and_stops(tmp_path: Path) -> None:
    venv = build_image_venv(DOCKERFILE, tmp_path, extra="controller")
    python = venv / "bin" / "python"
    for module, why in (("pytest", "test dependencies"), ("sqlalchemy", "the API's database stack"),
                        ("fastapi", "the API's web framework"), ("livekit.agents", "the voice worker's framework"),
                        ("onnxruntime", "the voice worker's VAD runtime")):
        leaked = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        assert leaked.returncode != 0, f"{why} ({module}) leaked into the controller image"

    assert exec_form(DOCKERFILE, "ENTRYPOINT") == ["morgana-controller"]
    assert not [args for op, args in runtime_stage(DOCKERFILE) if op == "CMD"]
    assert [args for op, args in runtime_stage(DOCKERFILE) if op == "USER"] == ["10001:10001"]
    declared = runtime_env(DOCKERFILE)
    assert declared["ENVIRONMENT"] == "production", declared
    assert (declared["HEALTH_PORT"], declared["METRICS_PORT"]) == ("8080", "9102"), declared
    exposed = [args.split() for op, args in runtime_stage(DOCKERFILE) if op == "EXPOSE"]
    assert exposed == [["8080", "9102"]], exposed

    container_tmp = tmp_path / "container-tmp"
    container_tmp.mkdir()

    health_port, metrics_port = free_port(), free_port()
    workdir = tmp_path / "run"  # no stray .env from the checkout
    workdir.mkdir()
    log = tmp_path / "controller.log"
    with KubeApiServer(log_dir=tmp_path / "kube") as kube, \
            LiveKitServer("APIimagetest", "image-test-secret-" + "7" * 32, log_path=tmp_path / "livekit.log") as lk:
        cluster = Cluster(kube)
        cluster.install_crds()
        cluster.namespace("voice")
        cluster.livekit_secret("voice", "livekit", lk)
        cluster.deployment("voice", "agents", replicas=0)
        image_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LIVEKIT_", "WATCH_", "PEERING_"))},
            **container_env_here(declared, venv, container_tmp),
            "KUBECONFIG": str(kube.kubeconfig), "WATCH_NAMESPACE": "voice",
            "HEALTH_PORT": str(health_port), "METRICS_PORT": str(metrics_port),
        }
        with log.open("ab") as out:
            process = subprocess.Popen([str(venv / "bin" / "morgana-controller")], cwd=workdir, env=image_env,
                                       stdout=out, stderr=subprocess.STDOUT)
        try:
            def healthy() -> bool:
                assert process.poll() is None, log.read_text(errors="replace")[-6000:]
                try:
                    return httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            eventually(healthy, 60, what="controller /healthz")
            cluster.autoscaler("voice", "agents", {
                "targetRef": {"name": "agents"}, "agentName": "morgana-agent", "pollIntervalSeconds": 1,
                "livekit": {"url": lk.url, "credentialsSecretRef": {"name": "livekit"}}})
            # minReplicas 1 against a Deployment at 0: scaled up at the first tick, by the image's code.
            eventually(lambda: cluster.replicas("voice", "agents") == 1, 15, what="scaled to minReplicas")
            eventually(lambda: cluster.condition("voice", "agents", "Ready").get("status") == "True", 10,
                       what="Ready")
            metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
            assert 'morgana_controller_desired_replicas{autoscaler="agents",namespace="voice"} 1.0' in metrics

            process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"controller did not exit within 30 s of SIGTERM:\n"
                                     f"{log.read_text(errors='replace')[-6000:]}") from None
            assert code == 0, log.read_text(errors="replace")[-6000:]
            # It left the peering on its way out, so a standby replica takes over at once ...
            peers = cluster.get("/apis/kopf.dev/v1/namespaces/voice/kopfpeerings/morgana-controller").get("status")
            assert not peers, peers
            # ... and took its finalizer off, so the resource can be deleted with no controller
            # running (helm uninstall deletes the controller's Deployment before custom resources).
            path = "/apis/morgana.dev/v1alpha1/namespaces/voice/agentautoscalers/agents"
            assert not cluster.get(path)["metadata"].get("finalizers")
            cluster.delete(path)
            eventually(lambda: cluster.request("GET", path, ok=(200, 404)).status_code == 404, 5,
                       what="deleted without a controller")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    # Nothing written: the root filesystem can be read-only and /tmp is not even needed.
    assert not list(container_tmp.rglob("*")) and not list(workdir.rglob("*"))
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-6000:]
