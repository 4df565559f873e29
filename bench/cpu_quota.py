"""Equal CPU quotas for server processes, from Linux cgroups (v1 `cpu` or v2 `cpu.max`).

On a machine whose cores the load (the client, the model stand-in, Postgres) also needs, N workers
cannot be given N cores of their own; what can be given is an equal CPU quota per worker. One
worker at quota q against N workers at q each shows whether the workers scale, with the cores
left over for the load. Needs root and a cgroup mount; `CpuQuotas.available()` says whether both
are here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import psutil

_V1 = Path("/sys/fs/cgroup/cpu")
_V2 = Path("/sys/fs/cgroup")
# A short period: the quota is spent in slices of 4 ms per 10 ms (at 0.4 CPU) rather than in one
# burst followed by a long throttled stretch that would add its length to latencies.
PERIOD_US = 10_000


def server_workers(pid: int) -> list[int]:
    """The processes that serve requests: a gunicorn master's workers, or the process itself
    (whatever helpers it may have started)."""
    process = psutil.Process(pid)
    if any("gunicorn" in part for part in process.cmdline()):
        return [child.pid for child in process.children()]
    return [pid]


class CpuQuotas:
    """Cgroups of `cores` CPU each, one per confined process, removed by `release()`."""

    def __init__(self, cores: float, name: str = "morgana-bench") -> None:
        self.cores = cores
        self._name = f"{name}-{os.getpid()}"
        self._groups: list[Path] = []

    @staticmethod
    def available() -> bool:
        if os.geteuid() != 0:
            return False
        return (_V1 / "cpu.cfs_quota_us").exists() or _v2_controls_cpu()

    def confine(self, pid: int) -> None:
        """Move `pid` (all its threads) into a cgroup of its own with this quota."""
        quota = max(1000, round(self.cores * PERIOD_US))
        if (_V1 / "cpu.cfs_quota_us").exists():
            group = _V1 / f"{self._name}-{len(self._groups)}"
            group.mkdir()
            self._groups.append(group)
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            group = _V2 / f"{self._name}-{len(self._groups)}"
            group.mkdir()
            self._groups.append(group)
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        (group / "cgroup.procs").write_text(str(pid))

    def release(self) -> None:
        """Move every confined process back to the root group and remove the groups."""
        root = _V1 if (_V1 / "cpu.cfs_quota_us").exists() else _V2
        for group in self._groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (root / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self._groups.clear()


def _v2_controls_cpu() -> bool:
    controllers = _V2 / "cgroup.subtree_control"
    return controllers.exists() and "cpu" in controllers.read_text().split()
