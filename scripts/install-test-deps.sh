#!/usr/bin/env bash
# Install the Debian/Ubuntu packages the test suite needs, and nothing else:
#
#   espeak-ng   real speech for the fake OpenAI server's POST /v1/audio/speech
#               (devtools/morgana_devtools/openai_server/)
#   chromium    the browser the playground's tests drive with Playwright (tests/playground);
#               Playwright itself never downloads one
#   npm         (when no npm is on PATH) to rebuild the playground from its lock file
#   the shellcheck linter, run on every shell script of the repo (tests/deploy)
#   podman, buildah and runc to build the images from their Dockerfiles and run them as
#   containers, and mmdebstrap to make the local stand-in for their Debian base image
#   (scripts/build-images.sh, tests/containers)
#   containerd, the CNI plugins and iptables for the real node (morgana_devtools.kube_node), and
#   gcc + libc6-dev for its pod sandbox's tiny static `pause` (scripts/build-node-tools.sh)
#
# Idempotent and fast when everything is present: a `dpkg -s` check per package, no network.
# Only when something is missing does it run `apt-get update` (once) and
# `apt-get install -y --no-install-recommends <missing...>`. Runs as root (CI) or, failing
# that, through sudo. Says what it did on stdout; exits non-zero if it could not install.
set -euo pipefail

PACKAGES=(espeak-ng chromium shellcheck podman buildah runc mmdebstrap containerd containernetworking-plugins iptables gcc libc6-dev)
# npm rebuilds the playground (scripts/build-playground.sh; tests/playground/test_build.py): Debian's,
# with its nodejs, unless a Node.js installed otherwise (NodeSource, nvm) already brings an npm.
if ! command -v npm >/dev/null 2>&1; then
    PACKAGES+=(npm)
fi

log() { echo "install-test-deps: $*"; }

# No pipe into grep -q: under pipefail, dpkg's SIGPIPE on a long description would read as "missing".
installed() { [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]; }

if ! command -v dpkg >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    for pkg in "${PACKAGES[@]}"; do
        if ! command -v "$pkg" >/dev/null 2>&1; then
            log "no dpkg/apt-get here; install these packages by hand: ${PACKAGES[*]}" >&2
            exit 1
        fi
    done
    log "no dpkg/apt-get, but ${PACKAGES[*]} found on PATH; nothing to do"
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if installed "$pkg"; then
        log "$pkg already installed"
    else
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} == 0)); then
    log "nothing to do"
    exit 0
fi

SUDO=()
if ((EUID != 0)); then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    else
        log "need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)

log "installing: ${missing[*]}"
log "running apt-get update"
"${SUDO[@]}" apt-get "${APT_OPTS[@]}" update -qq
"${SUDO[@]}" apt-get "${APT_OPTS[@]}" install -y -qq --no-install-recommends "${missing[@]}"

for pkg in "${missing[@]}"; do
    if ! installed "$pkg"; then
        log "$pkg is still not installed after apt-get install" >&2
        exit 1
    fi
    log "installed $pkg"
done
if ! espeak-ng --version >/dev/null 2>&1; then
    log "espeak-ng is installed but does not run" >&2
    exit 1
fi
log "done"
