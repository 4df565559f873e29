# Shared by build-k8s-tools.sh and build-node-tools.sh (sourced, not run): building a command of
# k8s.io/kubernetes from the Go module proxy, and the cached, locked, checked `ensure`.
# The caller defines GO, TOOLS_DIR, log, and check_<tool>/build_<tool> for each tool it ensures.
# shellcheck shell=bash

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
    cd "$2/mod" || return 1
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

