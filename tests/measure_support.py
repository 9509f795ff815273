"""Independent bounds for what quantkit measures: this process's resident memory (read here from
/proc and getrusage, not through quantkit.memory: a bound taken from the code under test would
check nothing) and a floor under the time of one model forward."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

# An eager forward of a transformers causal LM (embedding, decoder layers of a dozen modules each,
# norm, head: hundreds of Python-level torch calls) takes far longer than this on any machine: a
# floor under a measured forward, so that a measured rate has an upper bound too.
MIN_FORWARD_S = 1e-5


def _status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # "VmRSS:   123456 kB"
    except OSError:
        pass
    return None


def resident_bytes() -> int:
    """The process's resident set now (VmRSS; 0 where /proc is missing). A peak reported after
    this moment cannot be below it."""
    return _status_bytes("VmRSS") or 0


def high_water_bytes() -> int:
    """An upper bound on any high-water mark of this process so far: the larger of VmHWM (which
    /proc/self/clear_refs can reset) and ru_maxrss (never reset; KiB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    maxrss *= 1 if sys.platform == "darwin" else 1024
    return max(maxrss, _status_bytes("VmHWM") or 0)
