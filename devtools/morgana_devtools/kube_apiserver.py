"""A real Kubernetes API server (etcd + kube-apiserver) as child processes, for tests.

The binaries are built from their Go modules at pinned versions by
`scripts/build-k8s-tools.sh` and cached outside the repo (see `ensure_binaries`). There is no
kubelet or scheduler. With `controller_manager=True` a kube-controller-manager runs the workload
controllers (Deployment, ReplicaSet, garbage collector, namespace, service-account tokens), so
a Deployment gets real Pod objects and scale-down removes real Pods (honouring
`controller.kubernetes.io/pod-deletion-cost`); the Pods stay Pending, as nothing runs them.
Without it, objects are stored and validated (RBAC, admission, CRDs) but nothing reconciles them.

    with KubeApiServer() as kube:
        httpx.get(kube.url + "/api/v1/namespaces", headers={"Authorization": f"Bearer {kube.token}"},
                  verify=ssl.create_default_context(cafile=kube.ca_file))
        subprocess.run(["helm", "--kubeconfig", str(kube.kubeconfig), "list", "-A"])

`KubeClient(kube)` is the tests' REST view of it (as the admin, or `.as_token(...)` as someone
else), and `kube.token_kubeconfig(token, path)` a kubeconfig for any bearer token, e.g. one the
TokenRequest API minted for a ServiceAccount bound to a least-privilege Role.

Everything is offline and on 127.0.0.1 with free ports: a fresh CA signs the serving cert,
a fresh key pair signs service-account tokens, and one static token (`.token`) authenticates
user "admin" in group system:masters. Authorization is RBAC, so least-privilege checks can
impersonate other users (`Impersonate-User` header / `--as`) with the admin token.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from morgana_devtools.services import eventually, free_ports

# Keep in step with the defaults of scripts/build-k8s-tools.sh (same env variables).
HELM_VERSION = os.environ.get("HELM_VERSION", "v3.21.4")
ETCD_VERSION = os.environ.get("ETCD_VERSION", "v3.6.16")
KUBERNETES_VERSION = os.environ.get("KUBERNETES_VERSION", "v1.34.4")
PROMETHEUS_OPERATOR_VERSION = os.environ.get("PROMETHEUS_OPERATOR_VERSION", "v0.85.0")
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-k8s-tools.sh"
TOOLS = ("helm", "etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
SERVICE_RANGE = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: the first address of the range
# The controllers a test cluster needs; Jobs are left alone so tests decide when a hook Job completes
# (unless a test runs its pods for real and asks for "job-controller" with `extra_controllers`).
CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
)


def tools_dir() -> Path:
    return Path(
        os.environ.get("MORGANA_TOOLS_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "morgana" / "tools"
    )


def cached_binary(tool: str) -> Path:
    """Where the build script puts `tool` at its pinned version (it may not exist yet)."""
    version = {"helm": HELM_VERSION, "etcd": ETCD_VERSION}.get(tool, KUBERNETES_VERSION)
    return tools_dir() / f"{tool}-{version}" / tool


def servicemonitor_crd() -> Path:
    """The Prometheus Operator's ServiceMonitor CRD at its pinned version (fetched by the build script)."""
    path = (
        tools_dir()
        / f"prometheus-operator-crds-{PROMETHEUS_OPERATOR_VERSION}"
        / "monitoring.coreos.com_servicemonitors.yaml"
    )
    if not path.is_file():
        _run_build_script()
    return path


def ensure_binaries() -> dict[str, Path]:
    """{tool: path} for every tool in TOOLS: cached builds, else build them now (minutes, once)."""
    paths = {tool: cached_binary(tool) for tool in TOOLS}
    if all(os.access(p, os.X_OK) for p in paths.values()):
        return paths
    output = _run_build_script()
    return dict(zip(TOOLS, map(Path, output.strip().splitlines()[-len(TOOLS) :]), strict=True))


def _run_build_script() -> str:
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)],
        env={
            **os.environ,
            "HELM_VERSION": HELM_VERSION,
            "ETCD_VERSION": ETCD_VERSION,
            "KUBERNETES_VERSION": KUBERNETES_VERSION,
            "PROMETHEUS_OPERATOR_VERSION": PROMETHEUS_OPERATOR_VERSION,
        },
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT.name} failed:\n{result.stderr[-4000:]}")
    return result.stdout


def _pem_key(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_pki(directory: Path, addresses: Iterable[str] = ()) -> None:
    """ca.crt/.key, serving.crt/.key (127.0.0.1, localhost, `addresses` and the in-cluster names),
    kubelet-client.crt/.key (the API server's identity towards kubelets: system:masters) and the
    service-account sa.key/sa.pub."""
    now = datetime.datetime.now(datetime.UTC)
    in_cluster = ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"]

    def cert(
        subject: str, key, issuer: x509.Name | None, issuer_key, *, ca: bool, client: bool = False
    ) -> x509.Certificate:
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
        if client:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"))
        name = x509.Name(attributes)
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if client:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        elif not ca:
            ips = ["127.0.0.1", SERVICE_IP, *addresses]
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
                    + [x509.DNSName(name) for name in ["localhost", *in_cluster]]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("morgana-test-ca", ca_key, None, ca_key, ca=True)
    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving_cert = cert("kube-apiserver", serving_key, ca_cert.subject, ca_key, ca=False)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = cert("kube-apiserver-kubelet-client", client_key, ca_cert.subject, ca_key, ca=False, client=True)

    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "ca.key").write_bytes(_pem_key(ca_key))
    (directory / "kubelet-client.crt").write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "kubelet-client.key").write_bytes(_pem_key(client_key))
    (directory / "serving.crt").write_bytes(serving_cert.public_bytes(serialization.Encoding.PEM))
    (directory / "serving.key").write_bytes(_pem_key(serving_key))
    (directory / "sa.key").write_bytes(_pem_key(sa_key))
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


class KubeApiServer:
    """etcd + kube-apiserver on 127.0.0.1 (free ports), with RBAC and a static admin token.

    `.url` is the API server's https URL, `.token` the admin bearer token, `.ca_file` the CA
    that signed its serving cert and `.kubeconfig` a kubeconfig file using all three. State
    lives in a temp dir removed by `stop()`. Use as a context manager, or `start()` / `stop()`.
    """

    def __init__(
        self,
        *,
        binaries: dict[str, Path] | None = None,
        log_dir: Path | None = None,
        controller_manager: bool = False,
        extra_controllers: Iterable[str] = (),
        advertise_address: str = "127.0.0.1",
    ) -> None:
        """`advertise_address`: a host address other than loopback makes the server reachable from
        pods (a real node's, through the `kubernetes` Service), and runs every controller, Jobs'
        included (see kube_node)."""
        self.binaries = binaries
        self.controller_manager = controller_manager
        self.controllers = (*CONTROLLERS, *extra_controllers)
        self.advertise_address = advertise_address
        self.for_node = advertise_address != "127.0.0.1"
        if self.for_node:
            self.controllers = ("*", "-nodeipam")
        self.dir = Path(tempfile.mkdtemp(prefix="kube-apiserver-"))
        self.log_dir = log_dir or self.dir
        self.port, self.etcd_port, self.etcd_peer_port = free_ports(3)
        self.token = secrets.token_urlsafe(32)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    def start(self, timeout: float = 90.0) -> KubeApiServer:
        if self.processes:
            return self
        self.binaries = self.binaries or ensure_binaries()
        try:
            _write_pki(self.dir, [self.advertise_address])
            (self.dir / "tokens.csv").write_text(f'{self.token},admin,admin,"system:masters"\n')
            self._write_kubeconfig()
            etcd_url = f"http://127.0.0.1:{self.etcd_port}"
            peer_url = f"http://127.0.0.1:{self.etcd_peer_port}"
            self._spawn(
                "etcd",
                "--name=default",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync",  # throwaway data: don't pay for durability
                "--log-level=warn",
            )
            self._wait("etcd", etcd_url + "/health", timeout, lambda body: b'"health":"true"' in body)
            d = self.dir
            node_args = (
                [
                    f"--kubelet-client-certificate={d / 'kubelet-client.crt'}",
                    f"--kubelet-client-key={d / 'kubelet-client.key'}",
                    "--kubelet-preferred-address-types=InternalIP,Hostname",
                    "--allow-privileged=true",
                ]
                if self.for_node
                else []
            )
            self._spawn(
                "kube-apiserver",
                f"--etcd-servers={etcd_url}",
                f"--secure-port={self.port}",
                "--bind-address=" + ("0.0.0.0" if self.for_node else "127.0.0.1"),
                f"--advertise-address={self.advertise_address}",
                f"--cert-dir={d / 'certs'}",
                f"--tls-cert-file={d / 'serving.crt'}",
                f"--tls-private-key-file={d / 'serving.key'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",  # without a node: allocations only, no traffic
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                *node_args,
            )
            self._wait("kube-apiserver", self.url + "/readyz", timeout, lambda body: body.strip() == b"ok")
            if self.controller_manager:
                self._spawn(
                    "kube-controller-manager",
                    f"--kubeconfig={self.kubeconfig}",
                    f"--controllers={','.join(self.controllers)}",
                    "--leader-elect=false",
                    "--secure-port=0",  # no serving endpoint needed
                    f"--service-account-private-key-file={d / 'sa.key'}",
                    f"--root-ca-file={self.ca_file}",
                    "--concurrent-deployment-syncs=2",
                    "--concurrent-replicaset-syncs=2",
                    f"--cluster-signing-cert-file={self.ca_file}",
                    f"--cluster-signing-key-file={d / 'ca.key'}",
                )
        except BaseException:
            self.stop(keep_dir=True)
            raise
        return self

    def _spawn(self, tool: str, *args: str) -> None:
        assert self.binaries is not None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{tool}.log").open("ab") as log:
            self.processes.append(
                subprocess.Popen(
                    [str(self.binaries[tool]), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def _wait(self, tool: str, url: str, timeout: float, ok) -> None:
        """Poll `url` (with the admin token and CA) until `ok(body)`; raise with the log's tail."""
        context = ssl.create_default_context(cafile=self.ca_file) if url.startswith("https") else None
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.token}"})
        process = self.processes[-1]

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{tool} exited ({process.returncode}):\n{self.log_tail(tool)}")
            try:
                with urllib.request.urlopen(request, timeout=2, context=context) as response:
                    return bool(ok(response.read()))
            except (urllib.error.URLError, OSError):
                return False

        try:
            eventually(up, timeout, interval=0.2)
        except AssertionError:
            raise TimeoutError(f"{tool} not ready in {timeout} s:\n{self.log_tail(tool)}") from None

    def _write_kubeconfig(self) -> None:
        self.token_kubeconfig(self.token, self.kubeconfig, user="admin")

    def token_kubeconfig(self, token: str, path: Path, *, user: str = "user", namespace: str | None = None) -> Path:
        """A kubeconfig for this server with a bearer token (JSON is YAML: helm, kubectl and
        client libraries all read it)."""
        context = {"cluster": "morgana-test", "user": user, **({"namespace": namespace} if namespace else {})}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "morgana-test",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_file.read_bytes()).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "morgana-test", "context": context}],
            "current-context": "morgana-test",
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def log_tail(self, tool: str, lines: int = 40) -> str:
        try:
            text = (self.log_dir / f"{tool}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0, *, keep_dir: bool = False) -> None:
        """SIGTERM kube-apiserver, then etcd (SIGKILL after `timeout`); remove the temp dir."""
        processes, self.processes = self.processes, []
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class KubeClient:
    """The API server over plain REST, as the admin or with another bearer token (tests' view)."""

    def __init__(self, kube: KubeApiServer, token: str | None = None, timeout: float = 15) -> None:
        self.kube = kube
        self.http = httpx.Client(
            base_url=kube.url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {token or kube.token}"},
            verify=ssl.create_default_context(cafile=str(kube.ca_file)),
        )

    def as_token(self, token: str) -> KubeClient:
        return type(self)(self.kube, token)

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        ok: Iterable[int] = (200, 201),
        merge: bool = False,
        **kwargs: object,
    ) -> httpx.Response:
        headers = {**({"Content-Type": "application/merge-patch+json"} if merge else {}), **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        response = self.http.request(method, path, json=body, headers=headers, **kwargs)  # type: ignore[arg-type]
        assert response.status_code in ok, f"{method} {path}: {response.status_code} {response.text}"
        return response

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body).json()

    def get(self, path: str) -> dict:
        return self.request("GET", path).json()

    def patch(self, path: str, body: dict) -> dict:
        return self.request("PATCH", path, body, merge=True).json()

    def delete(self, path: str) -> None:
        self.request("DELETE", path, ok=(200, 202, 404))

    def namespace(self, name: str) -> None:
        self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}}, ok=(201, 409))

    def service_account_token(self, namespace: str, name: str) -> str:
        """A token from the TokenRequest API, as the kubelet mounts one into a pod."""
        return self.create(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
        )["status"]["token"]
