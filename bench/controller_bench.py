"""Reaction time of the autoscaling controller, from a load change to the scale patch, on this machine.

    uv run python -m bench.controller_bench [--quick]

Starts etcd + kube-apiserver (no controller manager: only the Deployment's spec.replicas matters
here), a LiveKit server and `morgana-controller` (a real process, watching one namespace), with one
AgentAutoscaler over a Deployment: roomsPerWorker 1, headroom 1, minReplicas 1, so no call needs 1
worker and one call needs 2. A load change is one LiveKit caller (rtc SDK) joining a new room; its
moment is when `connect()` returns (LiveKit has the room and the participant by then). The scale
patch is seen through a watch on the Deployment (the API server's notification of the new
spec.replicas). Each change waits a random part of the poll interval first, so changes land at
every phase of the controller's poll cycle, as real callers do.

1. reaction_poll5   pollIntervalSeconds 5 (the default): caller joins -> replicas 2 (`up`), caller
                    leaves -> replicas 1 (`down`, scaleDownStabilizationSeconds 0 here, so that the
                    window does not hide the reaction); 12 changes each way (--quick 5).
2. reaction_poll1   the same at pollIntervalSeconds 1 (the minimum).
3. stabilised_down  scaleDownStabilizationSeconds 10, poll 1: caller leaves -> replicas 1; the delay
                    should be the window, give or take one poll: the window counts from the last poll
                    that still saw the call (3 changes, --quick 1).

Anchors (what users would otherwise pick), as ratios morgana / anchor:
- KEDA + HPA: KEDA polls its scaler every 30 s (pollingInterval) and the HPA acts on the metric at
  its next 15 s sync, so a load change waits U(0, 30) + U(0, 15) s: median 22.5 s, p95 38.3 s
  (a Prometheus scrape in between, needed for LiveKit's metrics, would add more).
- HPA scale-down stabilisation: 300 s by default; the AgentAutoscaler default is 120 s.

Results: one JSON object per line on stdout and in bench-results/controller.jsonl (the first line is
the command and machine info), then a table. Progress goes to stderr. Every process started here is
stopped in `finally` blocks. CONTROLLER_BENCH_KEEP=1 keeps the logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass

from bench.common import (
    REPO,
    RESULTS_DIR,
    ResultLines,
    interrupt_on_sigterm,
    load_average,
    logger,
    machine_info,
    percentile,
    rounded,
    scratch_dir,
)
from morgana_devtools.kube_apiserver import KubeApiServer
from morgana_devtools.livekit_server import LiveKitServer
from tests.controller.harness import Cluster, ControllerProcess, Crowd, eventually, metric_value

RESULTS = RESULTS_DIR / "controller.jsonl"
COMMAND = "uv run python -m bench.controller_bench"
NAMESPACE = "bench"
SECRET = "livekit"

KEDA_POLL_S, HPA_SYNC_S = 30.0, 15.0
HPA_DOWN_STABILISATION_S, OUR_DOWN_STABILISATION_DEFAULT_S = 300.0, 120.0


def keda_hpa_quantile(q: float, a: float = KEDA_POLL_S, b: float = HPA_SYNC_S) -> float:
    """Quantile of U(0, a) + U(0, b), a >= b (a trapezoid): the KEDA + HPA reaction anchor."""
    if q <= b / (2 * a):
        return math.sqrt(2 * a * b * q)
    if q <= 1 - b / (2 * a):
        return q * a + b / 2
    return a + b - math.sqrt(2 * a * b * (1 - q))


@dataclass(frozen=True)
class Plan:
    changes: int  # load changes each way per poll interval
    stabilised: int  # stabilised scale-downs


FULL = Plan(changes=12, stabilised=3)
QUICK = Plan(changes=5, stabilised=1)


log = logger("controller-bench")


class ReplicaWatch:
    """Watches one Deployment; remembers when each spec.replicas value was announced."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.cluster, self.path, self.name = cluster, f"/apis/apps/v1/namespaces/{namespace}/deployments", name
        self.seen: list[tuple[float, int]] = []
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="replica-watch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            with (
                contextlib.suppress(Exception),
                self.cluster.http.stream(
                    "GET",
                    self.path,
                    timeout=None,
                    params={"watch": "true", "fieldSelector": f"metadata.name={self.name}", "timeoutSeconds": 600},
                ) as response,
            ):
                for line in response.iter_lines():
                    replicas = json.loads(line)["object"]["spec"]["replicas"]
                    with self.changed:
                        self.seen.append((time.monotonic(), replicas))
                        self.changed.notify_all()

    def wait_for(self, replicas: int, since: float, timeout: float) -> float | None:
        """The first moment at or after `since` that spec.replicas was announced as `replicas`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                hit = next((t for t, r in self.seen if t >= since and r == replicas), None)
                if hit is not None or time.monotonic() > deadline:
                    return hit
                self.changed.wait(deadline - time.monotonic())


class Results(ResultLines):
    """`add(bench, metric, value, anchor, unit, **extra)`: ratio = value / anchor."""

    columns = ("value", "anchor")
    headers = ("morgana", "anchor")


class Bench:
    def __init__(
        self,
        res: Results,
        plan: Plan,
        cluster: Cluster,
        watch_cluster: Cluster,
        livekit: LiveKitServer,
        controller: ControllerProcess,
    ) -> None:
        self.res, self.plan, self.cluster, self.livekit, self.controller = res, plan, cluster, livekit, controller
        self.watch_cluster = watch_cluster
        self.random = random.Random(20261126)
        self.serial = 0

    def autoscaler(self, name: str, poll: int, window: int) -> ReplicaWatch:
        self.cluster.deployment(NAMESPACE, name, replicas=1)
        self.cluster.autoscaler(
            NAMESPACE,
            name,
            {
                "targetRef": {"name": name},
                "agentName": "morgana-agent",
                "livekit": {"url": self.livekit.url, "credentialsSecretRef": {"name": SECRET}},
                "roomsPerWorker": 1,
                "headroom": 1,
                "minReplicas": 1,
                "maxReplicas": 4,
                "pollIntervalSeconds": poll,
                "scaleDownStabilizationSeconds": window,
                "redispatch": {"enabled": False},
            },
        )
        eventually(
            lambda: self.cluster.condition(NAMESPACE, name, "Ready").get("status") == "True", 30, what=f"{name} Ready"
        )
        return ReplicaWatch(self.watch_cluster, NAMESPACE, name)

    def remove(self, name: str) -> None:
        self.cluster.delete(f"/apis/morgana.dev/v1alpha1/namespaces/{NAMESPACE}/agentautoscalers/{name}")
        eventually(
            lambda: (
                self.cluster.request(
                    "GET", f"/apis/morgana.dev/v1alpha1/namespaces/{NAMESPACE}/agentautoscalers/{name}", ok=(200, 404)
                ).status_code
                == 404
            ),
            30,
            what=f"{name} deleted",
        )

    def reaction(self, poll: int) -> None:
        name = f"poll{poll}"
        watch = self.autoscaler(name, poll, window=0)
        crowd = Crowd(self.livekit)
        ups: list[float] = []
        downs: list[float] = []
        connects: list[float] = []
        missed = 0
        try:
            for change in range(self.plan.changes):
                for direction, series in (("up", ups), ("down", downs)):
                    time.sleep(self.random.uniform(0, poll))  # a random phase of the poll cycle
                    # The change counts from the moment the caller starts to join (or to hang up):
                    # LiveKit sees it somewhere within connect()/disconnect(), so this includes a little
                    # of the client's own time rather than flattering the controller.
                    changed = time.monotonic()
                    if direction == "up":
                        self.serial += 1
                        crowd.join(f"bench-{self.serial}")
                        connects.append(time.monotonic() - changed)
                    else:
                        crowd.leave()
                    patched = watch.wait_for(2 if direction == "up" else 1, changed, timeout=poll + 10)
                    if patched is None:
                        missed += 1
                        log(f"poll {poll} s, change {change + 1} {direction}: no scale patch within {poll + 10} s")
                        continue
                    series.append(patched - changed)
                    log(f"poll {poll} s, change {change + 1} {direction}: {patched - changed:.2f} s")
        finally:
            crowd.close()
            watch.stopped = True
        decision = self.decision_seconds(name)
        self.remove(name)
        keda_p50, keda_p95 = keda_hpa_quantile(0.5), keda_hpa_quantile(0.95)
        bench = f"reaction_poll{poll}"
        note = f"{len(ups)} changes; ideal poll/2 = {poll / 2:g} s"
        self.res.add(
            bench,
            "up_p50",
            percentile(ups, 50),
            keda_p50,
            "s",
            note=note,
            samples=[rounded(x) for x in ups],
            missed=missed,
        )
        self.res.add(bench, "up_p95", percentile(ups, 95), keda_p95, "s", note=f"ideal 0.95 x poll = {0.95 * poll:g} s")
        self.res.add(
            bench,
            "down_p50",
            percentile(downs, 50),
            None,
            "s",
            note="window 0 s: the raw reaction",
            samples=[rounded(x) for x in downs],
        )
        self.res.add(bench, "down_p95", percentile(downs, 95), None, "s")
        self.res.add(
            bench,
            "connect_mean",
            1000 * sum(connects) / len(connects) if connects else None,
            None,
            "ms",
            note="the caller's own connect(), included in `up`",
        )
        self.res.add(
            bench,
            "decision_mean",
            decision * 1000 if decision is not None else None,
            None,
            "ms",
            note="load read to scale patch (controller histogram)",
        )

    def stabilised_down(self) -> None:
        window, poll = 10, 1
        watch = self.autoscaler("stabilised", poll, window)
        crowd = Crowd(self.livekit)
        delays: list[float] = []
        try:
            for change in range(self.plan.stabilised):
                self.serial += 1
                crowd.join(f"bench-{self.serial}")
                assert watch.wait_for(2, time.monotonic() - 1, timeout=10) is not None, "no scale-up"
                time.sleep(self.random.uniform(0, poll))
                left = time.monotonic()
                crowd.leave()
                patched = watch.wait_for(1, left, timeout=window + poll + 10)
                if patched is not None:
                    delays.append(patched - left)
                    log(f"stabilised scale-down {change + 1}: {patched - left:.2f} s after the last call ended")
                time.sleep(window + 1)  # the once-per-window scale-down guard resets
        finally:
            crowd.close()
            watch.stopped = True
        self.remove("stabilised")
        self.res.add(
            "stabilised_down",
            "delay_p50",
            percentile(delays, 50),
            float(window),
            "s",
            note=f"the window counts from the last poll that saw the call: {window - poll}-{window + poll} s",
            samples=[rounded(x) for x in delays],
        )
        self.res.add(
            "stabilised_down",
            "default_window",
            OUR_DOWN_STABILISATION_DEFAULT_S,
            HPA_DOWN_STABILISATION_S,
            "s",
            note="configured defaults: AgentAutoscaler vs HPA behavior",
        )

    def decision_seconds(self, name: str) -> float | None:
        text = self.controller.metrics()
        labels = {"namespace": NAMESPACE, "autoscaler": name}
        total = metric_value(text, "morgana_controller_decision_duration_seconds_sum", **labels)
        count = metric_value(text, "morgana_controller_decision_duration_seconds_count", **labels)
        return total / count if total is not None and count else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controller_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer load changes (~1.5 minutes)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL

    interrupt_on_sigterm()
    res = Results()
    res.emit(
        {
            "bench": "meta",
            "command": COMMAND + (" --quick" if args.quick else ""),
            "quick": args.quick,
            **machine_info(),
            "anchors": {
                "keda_polling_interval_s": KEDA_POLL_S,
                "hpa_sync_period_s": HPA_SYNC_S,
                "hpa_scale_down_stabilisation_s": HPA_DOWN_STABILISATION_S,
            },
        }
    )
    began = time.monotonic()
    failed = False
    with contextlib.ExitStack() as stack:
        workdir = scratch_dir(stack, "morgana-controller-bench-", "CONTROLLER_BENCH_KEEP", log)
        controller: ControllerProcess | None = None
        try:
            log("starting etcd + kube-apiserver and LiveKit")
            kube = KubeApiServer(log_dir=workdir / "kube")
            stack.callback(kube.stop)
            kube.start()
            livekit = LiveKitServer(
                "APIcontrollerbench",
                "cb-" + os.urandom(24).hex(),
                log_path=workdir / "livekit.log",
                config={"room": {"departure_timeout": 1, "empty_timeout": 5}},
            )
            stack.callback(livekit.stop)
            livekit.start()
            cluster = Cluster(kube)
            cluster.install_crds()
            cluster.namespace(NAMESPACE)
            cluster.livekit_secret(NAMESPACE, SECRET, livekit)
            controller = ControllerProcess(
                {"KUBECONFIG": str(kube.kubeconfig), "WATCH_NAMESPACE": NAMESPACE, "LOG_LEVEL": "WARNING"},
                workdir / "controller.log",
            )
            stack.callback(controller.stop)
            controller.start()
            log(f"ready in {time.monotonic() - began:.1f} s")
            bench = Bench(res, plan, cluster, Cluster(kube), livekit, controller)
            for poll in (5, 1):
                bench.reaction(poll)
            bench.stabilised_down()
            res.emit(
                {
                    "bench": "meta",
                    "controller_log_error_lines": sum(  # kopf's retried requests aside
                        1
                        for line in controller.log().splitlines()
                        if "Traceback" in line or ("ERROR" in line and "will retry" not in line)
                    ),
                    "loadavg": load_average(),
                    "seconds": round(time.monotonic() - began, 1),
                }
            )
        except KeyboardInterrupt:
            failed = True
            log("interrupted; stopping everything")
        except Exception as exc:
            failed = True
            log(f"FAILED: {type(exc).__name__}: {exc}")
            if controller is not None:
                log(f"controller log tail:\n{controller.log_tail()}")
        finally:
            res.write(RESULTS)
            log("stopping everything")
    print(flush=True)
    print(res.table(), flush=True)
    print(
        f"\n(results in {RESULTS.relative_to(REPO)}; total {time.monotonic() - began:.0f} s; ratio = morgana / "
        f"anchor; KEDA + HPA anchor = U(0, {KEDA_POLL_S:g}) + U(0, {HPA_SYNC_S:g}) s)",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
