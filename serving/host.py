"""What the machine allows this process: the memory limit the MemoryNearLimit alert compares the
resident memory with (monitoring/alerts.yml). A container's cgroup limit when one is set (that is
what the kernel enforces), else the machine's memory."""

from __future__ import annotations

from pathlib import Path

CGROUP_FILES = (Path("/sys/fs/cgroup/memory.max"),                     # cgroup v2
                Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))   # cgroup v1


def memory_limit_bytes(cgroup_files: tuple[Path, ...] = CGROUP_FILES, meminfo: Path = Path("/proc/meminfo")) -> float:
    """The cgroup memory limit, or MemTotal when none is set (v2 'max', v1's huge sentinel); 0 if unknown."""
    total = 0.0
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = float(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    for path in cgroup_files:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (not total or int(text) < total):
            return float(text)
    return total
