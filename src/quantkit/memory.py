"""Resident memory of this process (Linux /proc; ru_maxrss elsewhere)."""
from __future__ import annotations

from pathlib import Path


def rss_bytes(peak: bool) -> int:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in bytes (Linux).

    Not ru_maxrss: Linux carries it over fork and exec, so a process started by a big parent
    (a benchmark holding a model) would report the parent's peak as its own.
    """
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if peak:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0
