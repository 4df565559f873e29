"""A real single-node Kubernetes cluster for tests: pods that really run.

Beside the control plane of `kube_apiserver` (etcd, kube-apiserver, kube-controller-manager with
every controller), this starts containerd (Debian's, on a private socket and root), kube-scheduler,
a kubelet and kube-proxy (iptables), all at the pinned Kubernetes version, built from the Go module
proxy by `scripts/build-node-tools.sh` and cached. Pods get addresses on a private bridge (cni0,
10.244.0.0/24, the Debian CNI plugins); Services work through kube-proxy's iptables rules, from
pods and from this machine. Images come from this machine only: `load_image` moves an image from
podman's storage (scripts/build-images.sh) into containerd, and pods use `imagePullPolicy: Never`.

    with KubeApiServer(advertise_address=host_address()) as kube, KubeNode(kube) as node:
        node.load_image("localhost/morgana-api:test")
        ...

`stop()` leaves nothing behind: workloads first, then kube-proxy's rules (`--cleanup`), the
kubelet, the pod sandboxes, containerd, the bridge, the leftover iptables chains and mounts.
Needs root (a kubelet manages cgroups, mounts and network namespaces).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from morgana_devtools.kube_apiserver import KUBERNETES_VERSION, KubeApiServer, KubeClient, tools_dir
from morgana_devtools.services import eventually, free_ports

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-node-tools.sh"
PODMAN = ROOT / "scripts" / "podman.sh"
COREDNS_VERSION = os.environ.get("COREDNS_VERSION", "v1.12.4")
PAUSE_VERSION = "3.10"
NODE_TOOLS = ("kubelet", "kube-scheduler", "kube-proxy", "coredns", "pause")
POD_SUBNET = "10.244.0.0/24"
CNI_NETWORK = "morgana"  # the bridge plugin names its per-pod NAT chains' rules after it
CLUSTER_DNS = "10.96.0.10"
BRIDGE = "cni0"
PAUSE_IMAGE = f"localhost/pause:{PAUSE_VERSION}"
COREDNS_IMAGE = f"localhost/coredns:{COREDNS_VERSION}"
NAMESPACE_K8S = "k8s.io"  # containerd's namespace for the kubelet's containers and images


def node_binary(tool: str) -> Path:
    version = {"coredns": COREDNS_VERSION, "pause": PAUSE_VERSION}.get(tool, KUBERNETES_VERSION)
    return tools_dir() / f"{tool}-{version}" / tool


def ensure_node_binaries() -> dict[str, Path]:
    """{tool: path} for kubelet, kube-scheduler, kube-proxy, coredns and pause (built once, cached)."""
    paths = {tool: node_binary(tool) for tool in NODE_TOOLS}
    if all(os.access(path, os.X_OK) for path in paths.values()):
        return paths
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        env={**os.environ, "KUBERNETES_VERSION": KUBERNETES_VERSION, "COREDNS_VERSION": COREDNS_VERSION},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed:\n{result.stderr[-4000:]}")
    lines = result.stdout.strip().splitlines()[-len(NODE_TOOLS) :]
    return dict(zip(NODE_TOOLS, map(Path, lines), strict=True))


def host_address() -> str:
    """This machine's address on its default route: where pods reach the API server."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # a documentation address: nothing is sent, this only picks the route
        return str(probe.getsockname()[0])


class KubeNode:
    """containerd + kube-scheduler + kubelet + kube-proxy (+ CoreDNS as a Deployment) on `kube`."""

    def __init__(self, kube: KubeApiServer, *, name: str = "morgana-node", dns: bool = True) -> None:
        if not kube.for_node:
            raise ValueError("start the KubeApiServer with advertise_address=host_address() for a node")
        self.kube = kube
        self.name = name
        self.dns = dns
        self.address = kube.advertise_address
        self.dir = Path(tempfile.mkdtemp(prefix="kube-node-"))
        self.socket = self.dir / "containerd" / "containerd.sock"
        self.kubelet_dir = self.dir / "kubelet"
        self.binaries: dict[str, Path] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.kubelet_port, self.kubelet_healthz, self.proxy_metrics, self.proxy_healthz = free_ports(4)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> KubeNode:
        self.binaries = self.binaries or ensure_node_binaries()
        try:
            self._start_containerd(timeout)
            self._load_pause_image()
            self._spawn(
                "kube-scheduler", f"--kubeconfig={self.kube.kubeconfig}", "--leader-elect=false", "--secure-port=0"
            )
            self._start_kubelet()
            self._start_kube_proxy()
            client = KubeClient(self.kube)
            eventually(
                lambda: self._ready(client),
                timeout,
                interval=0.5,
                what=lambda: f"node {self.name} Ready\n{self.log_tail('kubelet')}",
            )
            if self.dns:
                self._start_coredns(client, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self, client: KubeClient) -> bool:
        response = client.request("GET", f"/api/v1/nodes/{self.name}", ok=(200, 404))
        if response.status_code == 404:
            return False
        conditions = response.json().get("status", {}).get("conditions") or []
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def stop(self) -> None:
        """Workloads, then every component, then what they left on the machine."""
        if self.processes.get("kubelet") is not None and self.processes["kubelet"].poll() is None:
            self._delete_workloads()
        for tool in ("kube-proxy", "kubelet", "kube-scheduler"):
            self._terminate(tool)
        if "kube-proxy" in self.binaries:
            subprocess.run([str(self.binaries["kube-proxy"]), "--cleanup"], capture_output=True, timeout=60)
        if self.socket.exists() and self.processes.get("containerd") is not None:
            self._remove_sandboxes()
        self._terminate("containerd")
        self._clean_host()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KubeNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- images --------------------------------------------------------------------------------

    def load_image(self, ref: str) -> None:
        """Copy an image from podman's storage into the node's containerd (pods: imagePullPolicy Never)."""
        archive = self.dir / "image.tar"
        try:
            subprocess.run(
                ["bash", str(PODMAN), "save", "--format", "docker-archive", "-o", str(archive), ref],
                check=True,
                capture_output=True,
                timeout=600,
            )
            self.ctr("images", "import", "--no-unpack=false", str(archive))
        finally:
            archive.unlink(missing_ok=True)

    def ctr(self, *args: str) -> str:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", NAMESPACE_K8S, *args],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def _load_pause_image(self) -> None:
        self._build_scratch_image(PAUSE_IMAGE, self.binaries["pause"], ["/pause"], user="65535")
        self.load_image(PAUSE_IMAGE)

    def _build_scratch_image(self, ref: str, binary: Path, entrypoint: list[str], *, user: str) -> None:
        context = self.dir / f"image-{binary.name}"
        context.mkdir(exist_ok=True)
        shutil.copy2(binary, context / binary.name)
        (context / "Containerfile").write_text(
            f"FROM scratch\nCOPY {binary.name} /{binary.name}\nUSER {user}\nENTRYPOINT {json.dumps(entrypoint)}\n"
        )
        subprocess.run(
            ["bash", str(PODMAN), "build", "-q", "-t", ref, str(context)], check=True, capture_output=True, timeout=600
        )

    # --- components ----------------------------------------------------------------------------

    def _start_containerd(self, timeout: float) -> None:
        d = self.dir / "containerd"
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True)
        (cni / "net.d" / "10-morgana.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": CNI_NETWORK,
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": BRIDGE,
                            "isGateway": True,
                            "ipMasq": True,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_SUBNET}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(cni / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                }
            )
        )
        d.mkdir(parents=True, exist_ok=True)
        config = d / "config.toml"
        config.write_text(f'''version = 2
root = "{d / "root"}"
state = "{d / "state"}"
[grpc]
  address = "{self.socket}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / "net.d"}"
''')
        self._spawn("containerd", "--config", str(config), binary="containerd")
        eventually(
            lambda: self._containerd_up(),
            timeout,
            interval=0.2,
            what=lambda: f"containerd serving\n{self.log_tail('containerd')}",
        )

    def _containerd_up(self) -> bool:
        self._check_alive("containerd")
        try:
            self.ctr("version")
        except RuntimeError:
            return False
        return True

    def _start_kubelet(self) -> None:
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "kubelet.json"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": self.address,
                    "port": self.kubelet_port,
                    "readOnlyPort": 0,
                    "healthzPort": self.kubelet_healthz,
                    "healthzBindAddress": "127.0.0.1",
                    "cgroupDriver": "cgroupfs",
                    "failSwapOn": False,
                    "failCgroupV1": False,
                    "protectKernelDefaults": False,
                    "containerRuntimeEndpoint": f"unix://{self.socket}",
                    "clusterDNS": [CLUSTER_DNS],
                    "clusterDomain": "cluster.local",
                    "resolvConf": "/etc/resolv.conf",
                    "serializeImagePulls": False,
                    # This machine's disk and memory are shared: no evictions, no image garbage collection
                    # of the images loaded by hand (nothing could pull them back).
                    "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(self.kube.ca_file)},
                    },
                    "authorization": {"mode": "Webhook"},
                    "staticPodPath": "",
                }
            )
        )
        self._spawn(
            "kubelet",
            f"--config={config}",
            f"--kubeconfig={self.kube.kubeconfig}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.address}",
            f"--root-dir={self.kubelet_dir}",
            f"--cert-dir={self.kubelet_dir / 'pki'}",
        )

    def _start_kube_proxy(self) -> None:
        config = self.dir / "kube-proxy.json"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "mode": "iptables",
                    "clientConnection": {"kubeconfig": str(self.kube.kubeconfig)},
                    "clusterCIDR": POD_SUBNET,
                    "hostnameOverride": self.name,
                    "bindAddress": self.address,
                    "metricsBindAddress": f"127.0.0.1:{self.proxy_metrics}",
                    "healthzBindAddress": f"127.0.0.1:{self.proxy_healthz}",
                    # It may not raise the machine's conntrack limits here.
                    "conntrack": {"maxPerCore": 0},
                }
            )
        )
        self._spawn("kube-proxy", f"--config={config}")

    def _start_coredns(self, client: KubeClient, timeout: float) -> None:
        # As root, with only NET_BIND_SERVICE (port 53), as the upstream image long ran.
        self._build_scratch_image(COREDNS_IMAGE, self.binaries["coredns"], ["/coredns"], user="0")
        self.load_image(COREDNS_IMAGE)
        for manifest in coredns_objects():
            path = manifest.pop("_path")
            client.request("POST", path, manifest, ok=(201, 409))

        def available() -> bool:
            status = client.get("/apis/apps/v1/namespaces/kube-system/deployments/coredns").get("status", {})
            return bool(status.get("availableReplicas"))

        eventually(available, timeout, interval=0.5, what="CoreDNS available")

    # --- processes -----------------------------------------------------------------------------

    def _spawn(self, tool: str, *args: str, binary: str | None = None) -> None:
        executable = binary or str(self.binaries[tool])
        with (self.dir / f"{tool}.log").open("ab") as log:
            self.processes[tool] = subprocess.Popen(
                [executable, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _check_alive(self, tool: str) -> None:
        process = self.processes[tool]
        if process.poll() is not None:
            raise RuntimeError(f"{tool} exited ({process.returncode}):\n{self.log_tail(tool)}")

    def _terminate(self, tool: str, timeout: float = 20.0) -> None:
        process = self.processes.pop(tool, None)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self, tool: str, lines: int = 40) -> str:
        try:
            text = (self.dir / f"{tool}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # --- teardown ------------------------------------------------------------------------------

    def _delete_workloads(self) -> None:
        """Delete every non-system namespace's pods and wait, so that each container stops
        through its own SIGTERM path and the kubelet unmounts its volumes."""
        client = KubeClient(self.kube)
        try:
            pods = client.get("/api/v1/pods")["items"]
            for pod in pods:
                meta = pod["metadata"]
                client.request(
                    "DELETE",
                    f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                    {"gracePeriodSeconds": 5},
                    ok=(200, 202, 404),
                )
            # Those pods, not any a ReplicaSet makes in their place (the kubelet's stop ends those).
            deleted = {pod["metadata"]["uid"] for pod in pods}

            def gone() -> bool:
                return not deleted & {pod["metadata"]["uid"] for pod in client.get("/api/v1/pods")["items"]}

            eventually(gone, 60, interval=0.5, what="every pod gone")
        except (AssertionError, OSError, RuntimeError):
            pass  # the kubelet stops anyway; what it left is removed below
        finally:
            client.http.close()

    def _remove_sandboxes(self) -> None:
        try:
            for task in self.ctr("tasks", "list", "-q").split():
                subprocess.run(
                    ["ctr", "--address", str(self.socket), "-n", NAMESPACE_K8S, "tasks", "kill", "-s", "SIGKILL", task],
                    capture_output=True,
                    timeout=30,
                )
                subprocess.run(
                    ["ctr", "--address", str(self.socket), "-n", NAMESPACE_K8S, "tasks", "delete", "-f", task],
                    capture_output=True,
                    timeout=30,
                )
            for container in self.ctr("containers", "list", "-q").split():
                subprocess.run(
                    ["ctr", "--address", str(self.socket), "-n", NAMESPACE_K8S, "containers", "delete", container],
                    capture_output=True,
                    timeout=30,
                )
        except RuntimeError:
            pass

    def _clean_host(self) -> None:
        """What the node leaves on the machine whatever its private directories: the bridge, the
        network namespaces and mounts of its pods, the kubelet's fixed paths, iptables chains."""
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
        for mount in reversed(_mounts()):
            if mount.startswith((str(self.dir), "/run/netns/cni-", "/var/lib/kubelet")):
                subprocess.run(["umount", "-l", mount], capture_output=True)
        for netns in Path("/run/netns").glob("cni-*"):
            netns.unlink(missing_ok=True)
        for tool in ("iptables", "ip6tables"):
            for chain in ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT", "KUBE-PROXY-CANARY"):
                for table in ("filter", "nat", "mangle"):
                    subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
                    subprocess.run([tool, "-t", table, "-D", "OUTPUT", "-j", chain], capture_output=True)
                    subprocess.run([tool, "-t", table, "-D", "INPUT", "-j", chain], capture_output=True)
                    subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)
        _remove_masquerade_rules()
        for path in ("/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/var/lib/cni"):
            shutil.rmtree(path, ignore_errors=True)


def _remove_masquerade_rules() -> None:
    """The bridge plugin's per-pod NAT rules and chains (ipMasq) for pods that never had a CNI DEL
    (their sandboxes removed with containerd at teardown), from this run and any earlier one."""
    listed = subprocess.run(["iptables", "-t", "nat", "-S", "POSTROUTING"], capture_output=True, text=True)
    for line in listed.stdout.splitlines():
        if f'name: \\"{CNI_NETWORK}\\"' not in line or not line.startswith("-A POSTROUTING"):
            continue
        rule = shlex.split(line)[2:]
        chain = rule[rule.index("-j") + 1] if "-j" in rule else ""
        subprocess.run(["iptables", "-t", "nat", "-D", "POSTROUTING", *rule], capture_output=True)
        if chain.startswith("CNI-"):
            subprocess.run(["iptables", "-t", "nat", "-F", chain], capture_output=True)
            subprocess.run(["iptables", "-t", "nat", "-X", chain], capture_output=True)


def _mounts() -> list[str]:
    try:
        return [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return []


def coredns_objects() -> list[dict]:
    """CoreDNS for cluster.local at CLUSTER_DNS: its RBAC, Corefile, Deployment and Service, each
    with the API path it is created at (`_path`)."""
    labels = {"k8s-app": "kube-dns"}
    corefile = """.:53 {
    errors
    health :8080
    ready :8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 30
    loop
    reload
}
"""
    return [
        {"_path": "/api/v1/namespaces/kube-system/serviceaccounts", "metadata": {"name": "coredns"}},
        {
            "_path": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
            ],
        },
        {
            "_path": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
        },
        {
            "_path": "/api/v1/namespaces/kube-system/configmaps",
            "metadata": {"name": "coredns"},
            "data": {"Corefile": corefile},
        },
        {
            "_path": "/apis/apps/v1/namespaces/kube-system/deployments",
            "metadata": {"name": "coredns", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "containers": [
                            {
                                "name": "coredns",
                                "image": COREDNS_IMAGE,
                                "imagePullPolicy": "Never",
                                "args": ["-conf", "/etc/coredns/Corefile"],
                                "ports": [
                                    {"containerPort": 53, "protocol": "UDP", "name": "dns"},
                                    {"containerPort": 53, "protocol": "TCP", "name": "dns-tcp"},
                                ],
                                "securityContext": {
                                    "capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]},
                                    "readOnlyRootFilesystem": True,
                                },
                                "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                                "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}},
                            }
                        ],
                        "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                    },
                },
            },
        },
        {
            "_path": "/api/v1/namespaces/kube-system/services",
            "metadata": {"name": "kube-dns", "labels": labels},
            "spec": {
                "selector": labels,
                "clusterIP": CLUSTER_DNS,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        },
    ]
