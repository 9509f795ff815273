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


def release_file_pages(t) -> int:
    """Drop from this process's resident set the pages of a tensor that is a view into a
    memory-mapped *file* (safetensors loads that way), once it is no longer needed: Linux counts
    every page read through the mapping as resident until the mapping closes, so quantizing a
    checkpoint layer by layer would otherwise end with the whole float file resident. Only whole
    pages inside the tensor are released, and only when they lie in a file mapping (anonymous
    memory is never touched; a released file page reads back from the file if used again).
    Returns the bytes released (0 where unsupported)."""
    import ctypes
    import mmap
    import sys

    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi <= lo:
        return 0
    if _file_mapping(lo, hi) is None:
        return 0  # anonymous or shared-writable memory: leave it alone
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return hi - lo if libc.madvise(lo, hi - lo, 4) == 0 else 0  # MADV_DONTNEED
    except (OSError, AttributeError):
        return 0


def _file_mapping(lo: int, hi: int, maps: list | None = None) -> str | None:
    """The file whose private or read-only mapping holds [lo, hi), else None (Linux)."""
    try:
        lines = maps if maps is not None else Path("/proc/self/maps").read_text().splitlines()
        for line in lines:
            parts = line.split()
            a, b = (int(x, 16) for x in parts[0].split("-"))
            if a <= lo and hi <= b:
                if len(parts) < 6 or not parts[5].startswith("/") or ("w" in parts[1] and "p" not in parts[1]):
                    return None
                return parts[5]
    except (OSError, ValueError):
        return None
    return None


def file_backed(tensors) -> list[bool]:
    """For each CPU tensor: does it live in a file mapping (a memory-mapped checkpoint)?"""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return [False] * len(tensors)
    return [t.numel() > 0 and _file_mapping(t.data_ptr(), t.data_ptr() + 1, maps) is not None for t in tensors]


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim; a no-op elsewhere). glibc
    raises its mmap threshold after large frees, so a loop of big temporaries (quantizing layer
    after layer) otherwise leaves hundreds of MB of freed-but-resident heap."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
