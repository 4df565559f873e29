#!/usr/bin/env bash
# podman with this project's settings (scripts/podman-env.sh): `bash scripts/podman.sh images`.
set -euo pipefail
# shellcheck source=scripts/podman-env.sh
source "$(dirname "$0")/podman-env.sh"
exec podman "$@"
