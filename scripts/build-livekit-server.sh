#!/usr/bin/env bash
# Build a real LiveKit server (github.com/livekit/livekit-server) from its Go module, pinned,
# into a cache OUTSIDE the repo so fresh clones (CI) reuse it:
#
#   ${MORGANA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/morgana/tools}/livekit-server-<version>/livekit-server
#
# Idempotent: a cached binary whose `--version` runs is reused at once. The cold build takes
# a few minutes (module download + compile); a flock keeps concurrent builds from clashing.
# The binary's path is the last line on stdout; everything else goes to stderr.
#
# Env: LIVEKIT_SERVER_VERSION (default v1.13.5, a release tag: newer main uses replace
# directives that `go install` refuses), MORGANA_TOOLS_DIR, GO (default: go on PATH, else
# /usr/local/go/bin/go).
set -euo pipefail

VERSION="${LIVEKIT_SERVER_VERSION:-v1.13.5}"
MODULE="github.com/livekit/livekit-server"
TOOLS_DIR="${MORGANA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/morgana/tools}"
DEST_DIR="$TOOLS_DIR/livekit-server-$VERSION"
BIN="$DEST_DIR/livekit-server"

log() { echo "build-livekit-server: $*" >&2; }

cached() { [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; }

if cached; then
    echo "$BIN"
    exit 0
fi

GO="${GO:-$(command -v go || true)}"
GO="${GO:-/usr/local/go/bin/go}"
[[ -x "$GO" ]] || { log "no Go toolchain found (set GO=/path/to/go)"; exit 1; }

mkdir -p "$DEST_DIR"
exec 9>"$DEST_DIR/.lock"
flock 9
# Another process may have finished the build while we waited for the lock.
if cached; then
    echo "$BIN"
    exit 0
fi

WORK="$(mktemp -d "$DEST_DIR/.build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"

log "building $MODULE@$VERSION with $("$GO" version) (takes a few minutes the first time)"
start=$SECONDS
if ! GOBIN="$WORK/bin" "$GO" install "$MODULE/cmd/server@$VERSION" >&2; then
    log "go install failed; retrying via a temporary module and go build"
    mkdir -p "$WORK/mod"
    (
        cd "$WORK/mod"
        "$GO" mod init morgana-livekit-build >&2
        "$GO" get "$MODULE@$VERSION" >&2
        "$GO" build -trimpath -o "$WORK/bin/server" "$MODULE/cmd/server" >&2
    )
fi
log "built in $((SECONDS - start)) s"

"$WORK/bin/server" --version >&2
# Same filesystem (the work dir is inside DEST_DIR), so the rename is atomic.
mv -f "$WORK/bin/server" "$BIN"
echo "$BIN"
