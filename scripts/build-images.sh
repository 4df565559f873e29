#!/usr/bin/env bash
# Build Morgana's images from their Dockerfiles with podman, on a machine that reaches no image
# registry (only the package registries):
#
#   bash scripts/build-images.sh [api|agent|controller ...]     (default: all three)
#
# The Dockerfiles stay as they are for real registries. What this machine needs instead lives
# here, never in a Dockerfile:
#   - the two base images they start FROM, built locally under the same names:
#       docker.io/library/python:3.11-slim-bookworm  Debian bookworm minbase + python3.11
#                                                    (mmdebstrap), trusting this machine's CAs
#                                                    (/usr/local/share/ca-certificates: the egress
#                                                    proxy re-signs TLS, and `uv sync` in a build
#                                                    must reach PyPI through it)
#       ghcr.io/astral-sh/uv:<version>               FROM scratch with /uv and /uvx from the
#                                                    uv wheel (static musl binaries)
#   - podman settings: no default rlimits (raising one needs CAP_SYS_RESOURCE, which these
#     machines lack), and storage inside the tools cache so that CI reuses base images and
#     layers between runs of a clean clone.
#
# Images are tagged localhost/morgana-<name>:${IMAGE_TAG:-dev}. The last lines on stdout are
# "<image> <size in bytes>", one per image built; everything else goes to stderr.
# Idempotent: the base images and every unchanged layer are reused (a cold run takes several
# minutes, mostly the base's Debian packages and the images' Python wheels).
#
# Env: IMAGE_TAG, MORGANA_TOOLS_DIR, DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
IMAGE_TAG="${IMAGE_TAG:-dev}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PYTHON_VERSION=3.11
PYTHON_BASE="docker.io/library/python:${PYTHON_VERSION}-slim-bookworm"
UV_VERSION="$(sed -n 's#^FROM ghcr.io/astral-sh/uv:\([0-9.]*\) AS uv$#\1#p' "$ROOT/images/api/Dockerfile")"
UV_BASE="ghcr.io/astral-sh/uv:$UV_VERSION"
# Bump when the way the bases are made changes, so that cached ones are rebuilt.
BASE_REVISION=1

log() { echo "build-images: $*" >&2; }

# shellcheck source=scripts/podman-env.sh
source "$ROOT/scripts/podman-env.sh"

for dockerfile in "$ROOT"/images/*/Dockerfile; do
    # Every base a Dockerfile names must be one made here.
    while read -r base; do
        case "$base" in
            "$UV_BASE" | "python:\${PYTHON_VERSION}-slim-bookworm" | uv) ;;
            *) log "$dockerfile starts FROM $base, which this script does not provide"; exit 1 ;;
        esac
    done < <(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$dockerfile")
    grep -q "^ARG PYTHON_VERSION=$PYTHON_VERSION$" "$dockerfile" \
        || { log "$dockerfile does not default to Python $PYTHON_VERSION"; exit 1; }
done

# A base is there: the registry's own (pulled on a machine that reaches it: used as it is), or
# one made here at the current revision.
have_image() {
    podman image exists "$1" || return 1
    local revision
    revision="$(podman image inspect --format '{{index .Labels "morgana.base-revision"}}' "$1")"
    [[ -z "$revision" || "$revision" == "<no value>" || "$revision" == "$BASE_REVISION" ]]
}

ensure_python_base() {
    have_image "$PYTHON_BASE" && return 0
    local rootfs="$BASES_DIR/python-$PYTHON_VERSION-bookworm-r$BASE_REVISION.tar" start=$SECONDS
    if [[ ! -s "$rootfs" ]]; then
        command -v mmdebstrap >/dev/null || { log "mmdebstrap is missing (bash scripts/install-test-deps.sh)"; return 1; }
        log "building the Debian bookworm + Python $PYTHON_VERSION base (takes a couple of minutes once)"
        mkdir -p "$BASES_DIR"
        local cas=(/usr/local/share/ca-certificates/*.crt)
        local hooks=()
        # mmdebstrap runs its hooks with the new root directory as "$1": single quotes on purpose.
        # shellcheck disable=SC2016
        if [[ -e "${cas[0]}" ]]; then
            # This machine's CAs, for the build stage's `uv sync` behind the re-signing proxy.
            hooks+=(--customize-hook='mkdir -p "$1/usr/local/share/ca-certificates"')
            for ca in "${cas[@]}"; do
                hooks+=(--customize-hook="copy-in $ca /usr/local/share/ca-certificates")
            done
            hooks+=(--customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null')
        fi
        # shellcheck disable=SC2016
        mmdebstrap --quiet --variant=minbase --format=tar \
            --include=python$PYTHON_VERSION,python3-venv,python-is-python3,ca-certificates,passwd \
            --aptopt='Acquire::Retries "3"' \
            "${hooks[@]}" \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
            bookworm "$rootfs.part" "$DEBIAN_MIRROR" >&2
        mv -f "$rootfs.part" "$rootfs"
    fi
    podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL morgana.base-revision=$BASE_REVISION" \
        --change 'CMD ["python3"]' \
        "$rootfs" "$PYTHON_BASE" >/dev/null
    log "base $PYTHON_BASE ready ($((SECONDS - start)) s)"
}

ensure_uv_base() {
    have_image "$UV_BASE" && return 0
    local work
    work="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    local pip=(python3 -m pip)
    if ! python3 -m pip --version >/dev/null 2>&1; then
        # uv's virtualenvs (make test runs in one) have no pip: a throwaway one that has.
        python3 -m venv "$work/venv" >&2
        pip=("$work/venv/bin/python" -m pip)
    fi
    "${pip[@]}" download --quiet --no-deps --only-binary=:all: --platform musllinux_1_1_x86_64 \
        --dest "$work" "uv==$UV_VERSION" >&2
    mkdir -p "$work/root"
    python3 - "$work" <<'EOF'
import sys, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
wheel = next(work.glob("uv-*.whl"))
with zipfile.ZipFile(wheel) as zf:
    for member in zf.namelist():
        name = member.rsplit("/", 1)[-1]
        if member.split("/")[0].endswith(".data") and name in ("uv", "uvx"):
            target = work / "root" / name
            target.write_bytes(zf.read(member))
            target.chmod(0o755)
EOF
    [[ -x "$work/root/uv" && -x "$work/root/uvx" ]] || { log "no uv binaries in the uv $UV_VERSION wheel"; return 1; }
    tar -C "$work/root" -cf "$work/uv.tar" uv uvx
    podman import --change "LABEL morgana.base-revision=$BASE_REVISION" "$work/uv.tar" "$UV_BASE" >/dev/null
    log "base $UV_BASE ready"
}

build() {
    local name="$1" start=$SECONDS ref="localhost/morgana-$1:$IMAGE_TAG" previous
    previous="$(podman image inspect --format '{{.Id}}' "$ref" 2>/dev/null || true)"
    log "building $ref from images/$name/Dockerfile"
    podman build --quiet --network host --layers --pull=never \
        -f "$ROOT/images/$name/Dockerfile" -t "$ref" "$ROOT" >&2
    log "built morgana-$name in $((SECONDS - start)) s"
    # The image this tag named before (the last build of other code): its own layers, hundreds
    # of MB, would otherwise pile up in the cache build after build.
    if [[ -n "$previous" && "$previous" != "$(podman image inspect --format '{{.Id}}' "$ref")" ]]; then
        podman rmi "$previous" >/dev/null 2>&1 || true
    fi
}

names=("$@")
((${#names[@]})) || names=(api agent controller)
for name in "${names[@]}"; do
    [[ -f "$ROOT/images/$name/Dockerfile" ]] || { log "no images/$name/Dockerfile"; exit 1; }
done
ensure_python_base
ensure_uv_base
for name in "${names[@]}"; do
    build "$name"
done
for name in "${names[@]}"; do
    echo "localhost/morgana-$name:$IMAGE_TAG $(podman image inspect --format '{{.Size}}' "localhost/morgana-$name:$IMAGE_TAG")"
done
