#!/usr/bin/env bash
# Build what a real single-node Kubernetes cluster needs beside the control plane that
# build-k8s-tools.sh builds (etcd, kube-apiserver, kube-controller-manager), pinned, into the
# same cache outside the repo:
#
#   ${MORGANA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/morgana/tools}/<tool>-<version>/<tool>
#
#   kubelet, kube-scheduler, kube-proxy   k8s.io/kubernetes/cmd/<tool> at KUBERNETES_VERSION, built
#                                         the way build-k8s-tools.sh builds kube-apiserver
#   coredns                               github.com/coredns/coredns at COREDNS_VERSION
#   pause                                 the pod sandbox's process: a static C program that sleeps,
#                                         reaps children and exits on SIGTERM/SIGINT (gcc -static)
#
# Used by morgana_devtools.kube_node. Containerd, runc, the CNI plugins and iptables come from
# Debian (install-test-deps.sh). Idempotent: cached binaries whose version check runs are reused;
# a flock per tool keeps concurrent builds apart. A cold build takes about ten minutes on two cores
# (the three Kubernetes commands share one module download). The binary paths are the last five
# lines on stdout (kubelet, kube-scheduler, kube-proxy, coredns, pause); everything else goes to
# stderr.
#
# Env: KUBERNETES_VERSION (default v1.34.4), COREDNS_VERSION (default v1.12.4), MORGANA_TOOLS_DIR,
# GO (default: go on PATH, else /usr/local/go/bin/go), CC (default gcc).
set -euo pipefail
shopt -s inherit_errexit

KUBERNETES_VERSION="${KUBERNETES_VERSION:-v1.34.4}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.12.4}"
TOOLS_DIR="${MORGANA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/morgana/tools}"
HERE="$(cd "$(dirname "$0")" && pwd)"

log() { echo "build-node-tools: $*" >&2; }

GO="${GO:-$(command -v go || true)}"
GO="${GO:-/usr/local/go/bin/go}"
CC="${CC:-gcc}"
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

# build_kubernetes_command and ensure, shared with build-k8s-tools.sh.
# shellcheck source=scripts/k8s-build-lib.sh
source "$HERE/k8s-build-lib.sh"

check_kubelet() { "$1" --version; }
check_kube-scheduler() { "$1" --version; }
check_kube-proxy() { "$1" --version; }
check_coredns() { "$1" -version; }
check_pause() { "$1" -v; }

build_kubelet() { build_kubernetes_command kubelet "$@"; }
build_kube-scheduler() { build_kubernetes_command kube-scheduler "$@"; }
build_kube-proxy() { build_kubernetes_command kube-proxy "$@"; }

build_coredns() {
    mkdir -p "$2/mod"
    cd "$2/mod"
    printf 'module morgana-coredns-build\n\ngo 1.24.0\n\nrequire github.com/coredns/coredns %s\n' "$1" >go.mod
    "$GO" build -trimpath -o "$2/bin/coredns" github.com/coredns/coredns >&2
}

build_pause() {
    mkdir -p "$2/bin"
    cat >"$2/pause.c" <<'EOF'
/* The pod sandbox's process: holds the pod's namespaces until told to stop. */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) { puts("pause (morgana) 3.10"); return 0; }
    struct sigaction on_stop = {.sa_handler = stop}, on_child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    sigaction(SIGINT, &on_stop, NULL);
    sigaction(SIGTERM, &on_stop, NULL);
    sigaction(SIGCHLD, &on_child, NULL);
    for (;;) pause();
}
EOF
    "$CC" -Os -static -o "$2/bin/pause" "$2/pause.c" >&2
}

kubelet_bin="$(ensure kubelet "$KUBERNETES_VERSION")"
scheduler_bin="$(ensure kube-scheduler "$KUBERNETES_VERSION")"
proxy_bin="$(ensure kube-proxy "$KUBERNETES_VERSION")"
coredns_bin="$(ensure coredns "$COREDNS_VERSION")"
pause_bin="$(ensure pause 3.10)"
echo "$kubelet_bin"
echo "$scheduler_bin"
echo "$proxy_bin"
echo "$coredns_bin"
echo "$pause_bin"
