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

# build_kubernetes_command and ensure, shared with build-node-tools.sh.
# shellcheck source=scripts/k8s-build-lib.sh
source "$(dirname "$0")/k8s-build-lib.sh"

build_kube-apiserver() { build_kubernetes_command kube-apiserver "$@"; }
build_kube-controller-manager() { build_kubernetes_command kube-controller-manager "$@"; }
build_kubectl() { build_kubernetes_command kubectl "$@"; }

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
