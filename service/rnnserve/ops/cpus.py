"""How many CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

`os.cpu_count()` counts the machine's CPUs, so a pod limited to 2 CPUs on a 64-core node would
start 64 workers that then fight over 2 CPUs' worth of time. Kubernetes expresses a CPU limit as
a CFS quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`); a fraction of a
CPU rounds up, so a 1.5-CPU pod gets 2 workers and a 0.5-CPU pod 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def quota_cpus(root: Path = CGROUP) -> int | None:
    """CPUs the cgroup quota allows (rounded up), or None without a quota."""
    v2 = root / "cpu.max"
    try:
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else math.ceil(int(quota) / int(period))
        quota_file = root / "cpu" / "cpu.cfs_quota_us"
        period_file = root / "cpu" / "cpu.cfs_period_us"
        if quota_file.exists():
            quota_us = int(quota_file.read_text())
            return None if quota_us <= 0 else math.ceil(quota_us / int(period_file.read_text()))
    except (OSError, ValueError):
        return None
    return None


def available_cpus(root: Path = CGROUP) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = quota_cpus(root)
    return max(1, min(cpus, quota) if quota else cpus)
