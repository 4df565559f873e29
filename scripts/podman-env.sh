# shellcheck shell=bash
# Sourced by the scripts that run podman: the settings every podman call of this project uses.
#   - no default rlimits: podman raises some by default, which needs CAP_SYS_RESOURCE, and
#     these machines lack it ("error setting rlimit type 7: operation not permitted");
#   - runc: crun refuses these machines' hybrid cgroup layout ("cgroups in hybrid mode not
#     supported");
#   - image storage inside the tools cache (not /var/lib/containers), so that a clean clone
#     (CI) reuses the base images and layers built before; run state under /run.
# Exports CONTAINERS_CONF, CONTAINERS_STORAGE_CONF and BASES_DIR.
_podman_tools_dir="${MORGANA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/morgana/tools}"
_podman_state="$_podman_tools_dir/containers"
BASES_DIR="$_podman_state/bases"
mkdir -p "$_podman_state/storage" "$BASES_DIR"
cat >"$_podman_state/containers.conf.$$" <<CONF
[containers]
default_ulimits = []

[engine]
events_logger = "file"
runtime = "runc"
CONF
cat >"$_podman_state/storage.conf.$$" <<CONF
[storage]
driver = "overlay"
graphroot = "$_podman_state/storage"
runroot = "/run/morgana-containers"
CONF
mv -f "$_podman_state/containers.conf.$$" "$_podman_state/containers.conf"
mv -f "$_podman_state/storage.conf.$$" "$_podman_state/storage.conf"
export CONTAINERS_CONF="$_podman_state/containers.conf"
export CONTAINERS_STORAGE_CONF="$_podman_state/storage.conf"
export BASES_DIR
unset _podman_tools_dir _podman_state
