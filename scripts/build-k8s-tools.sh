#!/usr/bin/env bash
# Build the real Kubernetes test tools from the Go module proxy, pinned, into a cache OUTSIDE
# the repo so fresh clones (CI) reuse them:
#
#   ${MORGANA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/morgana/tools}/<tool>-<version>/<tool>
#
# for <tool> in helm, etcd, kube-apiserver, kube-controller-manager, kubectl (used by
# morgana_devtools.kube_apiserver; kubectl for the deploy scripts' tests).
#
# Idempotent: a cached binary whose version command runs is reused at once. A cold build takes
# several minutes (module download + compile; kube-apiserver is by far the largest); a flock
# per tool keeps concurrent builds from clashing. The binary paths are the last five
# lines on stdout (helm, etcd, kube-apiserver,
# kube-controller-manager, kubectl); everything else goes to stderr.
#
# How each is built (all CGO_ENABLED=0, -trimpath):
#   helm            `go install helm.sh/helm/v3/cmd/helm@<v>` (no replace directives).
#   etcd            `go install` refuses its replace directives (etcd#18501), so a throwaway
#                   module requires go.etcd.io/etcd/server/v3 <v> and builds its main package
#                   (go.etcd.io/etcd/server/v3, which calls etcdmain.Main).
#   kube-apiserver  k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them
#                   with ./staging/...; a throwaway module requires k8s.io/kubernetes v1.Y.Z and
#                   replaces each staging module (read from k8s.io/kubernetes's go.mod) with
#                   its published v0.Y.Z, then builds k8s.io/kubernetes/cmd/kube-apiserver.
#   kube-controller-manager  the same way: it runs the Deployment/ReplicaSet controllers, so
#                   tests see real Pods created and removed (pod-deletion-cost honoured).
#
# Also the Prometheus Operator's ServiceMonitor CRD (from its Go module, pinned), printed first.
#
# Env: PROMETHEUS_OPERATOR_VERSION (default v0.85.0), HELM_VERSION (default v3.21.4), ETCD_VERSION (default v3.6.16), KUBERNETES_VERSION
# (default v1.34.4; etcd 3.6 is what Kubernetes 1.34 ships with), MORGANA_TOOLS_DIR,
# GO (default: go on PATH, else /usr/local/go/bin/go).
set -euo pipefail
shopt -s inherit_errexit  # so failures inside $(ensure ...) abort the script

HELM_VERSION="${HELM_VERSION:-v3.21.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.34.4}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
TOOLS_DIR="${MORGANA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/morgana/tools}"

log() { echo "build-k8s-tools: $*" >&2; }

GO="${GO:-$(command -v go || true)}"
GO="${GO:-/usr/local/go/bin/go}"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

# check_<tool> BIN: succeeds when BIN is a working binary.
check_helm() {
    "$1" version --short || return 1
    # Built without the release's -X flags, helm assumes Kubernetes v1.20 for `helm template`
    # and refuses charts needing newer; a cached binary from such a build is rebuilt.
    local chart
    chart="$(mktemp -d)"
    mkdir -p "$chart/templates"
    printf 'apiVersion: v2\nname: probe\nversion: 0.1.0\n' >"$chart/Chart.yaml"
    printf 'kube: {{ .Capabilities.KubeVersion.Minor }}\n' >"$chart/templates/probe.yaml"
    [[ "$("$1" template probe "$chart" 2>/dev/null | sed -n 's/^kube: //p')" == "$(helm_kube_minor)" ]]
    local ok=$?
    rm -rf "$chart"
    return $ok
}

# The Kubernetes minor helm's client-go is at (v0.36.x -> 36), as helm's Makefile stamps it.
helm_kube_minor() {
    local gomod
    gomod="$("$GO" mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')"
    sed -n 's#^[[:space:]]*k8s\.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$gomod" | head -1
}
check_etcd() { "$1" --version; }
check_kube-apiserver() { "$1" --version; }
check_kube-controller-manager() { "$1" --version; }
check_kubectl() { "$1" version --client; }

# build_<tool> VERSION WORK: leaves the binary at WORK/bin/<tool>.
build_helm() {
    # The -X flags helm's release Makefile sets: without them `helm version` reports only the
    # minor ("v3.21") and `helm template`/`lint` assume Kubernetes v1.20.
    local minor ldflags="-X helm.sh/helm/v3/internal/version.version=$1" pkg
    minor="$(helm_kube_minor)"
    [[ -n "$minor" ]] || { log "cannot read helm's client-go version"; return 1; }
    for pkg in pkg/chartutil pkg/lint/rules; do
        ldflags+=" -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$minor"
    done
    GOBIN="$2/bin" "$GO" install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$1" >&2
}

build_etcd() {
    mkdir -p "$2/mod"
    cd "$2/mod"
    printf 'module morgana-etcd-build\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$1" >go.mod
    "$GO" build -trimpath -o "$2/bin/etcd" go.etcd.io/etcd/server/v3 >&2
}

build_kube-apiserver() { build_kubernetes_command kube-apiserver "$@"; }
build_kube-controller-manager() { build_kubernetes_command kube-controller-manager "$@"; }
build_kubectl() { build_kubernetes_command kubectl "$@"; }

# build_kubernetes_command CMD VERSION WORK: a k8s.io/kubernetes/cmd/CMD binary at WORK/bin/CMD.
build_kubernetes_command() {
    local cmd="$1"
    shift
    local version="$1" staging_version="v0.${1#v1.}" kgomod ldflags="" minor key
    minor="${1#v1.}"
    minor="${minor%%.*}"
    # What hack/lib/version.sh stamps; otherwise the server reports v0.0.0-master to clients
    # (helm's kubeVersion checks, /version).
    for key in "gitVersion=$version" gitMajor=1 "gitMinor=$minor" gitTreeState=clean; do
        ldflags+=" -X k8s.io/component-base/version.$key -X k8s.io/client-go/pkg/version.$key"
    done
    # k8s.io/kubernetes's own go.mod, from the module cache: its replace block lists the staging modules.
    kgomod="$("$GO" mod download -json "k8s.io/kubernetes@$version" 2>&1)" \
        || { log "go mod download k8s.io/kubernetes@$version failed: $kgomod"; return 1; }
    kgomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' <<<"$kgomod")"
    [[ -f "$kgomod" ]] || { log "cannot find go.mod of k8s.io/kubernetes@$version"; return 1; }
    mkdir -p "$2/mod"
    cd "$2/mod"
    {
        printf 'module morgana-kube-apiserver-build\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes %s\n\nreplace (\n' "$version"
        # Every `k8s.io/<name> => ./staging/src/k8s.io/<name>` becomes the published v0.Y.Z.
        sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "$kgomod" \
            | while read -r m; do printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"; done
        printf ')\n'
    } >go.mod
    "$GO" build -trimpath -ldflags "$ldflags" -o "$2/bin/$cmd" "k8s.io/kubernetes/cmd/$cmd" >&2
}

# ensure TOOL VERSION: prints the path of a working, cached TOOL binary (building it if needed).
ensure() {
    local tool="$1" version="$2"
    local dest="$TOOLS_DIR/$tool-$version" bin="$TOOLS_DIR/$tool-$version/$tool"
    if [[ -x "$bin" ]] && "check_$tool" "$bin" >/dev/null 2>&1; then
        echo "$bin"
        return 0
    fi
    [[ -x "$GO" ]] || { log "no Go toolchain found (set GO=/path/to/go)"; return 1; }
    mkdir -p "$dest"
    (
        exec 9>"$dest/.lock"
        flock 9
        # Another process may have finished the build while we waited for the lock.
        if [[ -x "$bin" ]] && "check_$tool" "$bin" >/dev/null 2>&1; then
            exit 0
        fi
        work="$(mktemp -d "$dest/.build.XXXXXX")"
        trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
        log "building $tool $version with $("$GO" version) (takes minutes the first time)"
        start=$SECONDS
        ("build_$tool" "$version" "$work")
        log "built $tool $version in $((SECONDS - start)) s"
        "check_$tool" "$work/bin/$tool" >&2
        # Same filesystem (the work dir is inside dest), so the rename is atomic.
        mv -f "$work/bin/$tool" "$bin"
    )
    echo "$bin"
}

# The Prometheus Operator's ServiceMonitor CRD, so tests install the chart's ServiceMonitors
# into a real API server: read from the operator's Go module (its example/ directory).
ensure_servicemonitor_crd() {
    local dest="$TOOLS_DIR/prometheus-operator-crds-$PROMETHEUS_OPERATOR_VERSION"
    local crd="$dest/monitoring.coreos.com_servicemonitors.yaml" dir
    if [[ ! -s "$crd" ]]; then
        dir="$("$GO" mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
            | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
        [[ -f "$dir/example/prometheus-operator-crd/$(basename "$crd")" ]] \
            || { log "no ServiceMonitor CRD in prometheus-operator $PROMETHEUS_OPERATOR_VERSION"; return 1; }
        mkdir -p "$dest"
        # A name of this process's own: two builds may fetch it at once.
        cp "$dir/example/prometheus-operator-crd/$(basename "$crd")" "$crd.$$.tmp"
        mv -f "$crd.$$.tmp" "$crd"
    fi
    echo "$crd"
}

helm_bin="$(ensure helm "$HELM_VERSION")"
etcd_bin="$(ensure etcd "$ETCD_VERSION")"
kube_apiserver_bin="$(ensure kube-apiserver "$KUBERNETES_VERSION")"
kube_controller_manager_bin="$(ensure kube-controller-manager "$KUBERNETES_VERSION")"
kubectl_bin="$(ensure kubectl "$KUBERNETES_VERSION")"
servicemonitor_crd="$(ensure_servicemonitor_crd)"
echo "$servicemonitor_crd"
echo "$helm_bin"
echo "$etcd_bin"
echo "$kube_apiserver_bin"
echo "$kube_controller_manager_bin"
echo "$kubectl_bin"
