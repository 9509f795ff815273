"""quantkit's own compiled CPU kernels, built on first use with torch's C++ extension loader.

`w8a8_avx2()` returns the AVX2 int8 x int8 linear of `w8a8_avx2.cpp` (for x86-64 CPUs with
AVX2 but without VNNI/AMX, where torch has no fast int8 GEMM), or None when it cannot run
here: not an AVX2 x86-64 CPU, no C++ compiler or ninja, a failed build, or
QUANTKIT_NATIVE=0. The first build takes about half a minute and is cached (by source hash)
under ~/.cache/quantkit/torch_extensions (QUANTKIT_CACHE moves ~/.cache/quantkit); later
processes load it in well under a second. Callers fall back to torch ops when it is None,
so nothing depends on it but speed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("w8a8_avx2.cpp")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]
_lock = threading.Lock()
_cache: dict[str, object] = {}


def _cache_dir() -> Path:
    root = os.environ.get("QUANTKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantkit")
    return Path(root) / "torch_extensions"


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip-installed one lives in the environment's
    bin folder, which is not on PATH when the environment is not activated."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(getattr(ninja, "BIN_DIR", ""))
    if bin_dir and bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def why_not_w8a8_avx2() -> str | None:
    """Why the AVX2 kernel cannot be built here (None when it can be tried)."""
    if os.environ.get("QUANTKIT_NATIVE", "1") == "0":
        return "QUANTKIT_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"not an x86-64 CPU ({platform.machine()})"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the CPU has no AVX2 (torch reports {torch.backends.cpu.get_cpu_capability()})"
    from torch.utils import cpp_extension

    _ninja_on_path()
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        return "no C++ compiler (install g++)"
    if not cpp_extension.is_ninja_available():
        return "ninja is missing (pip install ninja)"
    return None


def w8a8_avx2():
    """The compiled module (functions `pack` and `linear`, see w8a8_avx2.cpp) or None."""
    if "w8a8" in _cache:  # every w8a8 matmul asks: no lock once decided
        return _cache["w8a8"]
    with _lock:
        if "w8a8" in _cache:
            return _cache["w8a8"]
        mod = None
        reason = why_not_w8a8_avx2()
        if reason is None:
            try:
                from torch.utils.cpp_extension import load

                tag = hashlib.sha256(_SRC.read_bytes() + " ".join(_FLAGS).encode() + torch.__version__.encode())
                name = f"quantkit_w8a8_avx2_{tag.hexdigest()[:12]}"
                build = _cache_dir() / name
                build.mkdir(parents=True, exist_ok=True)
                if not (build / f"{name}.so").exists():
                    log.warning("building quantkit's AVX2 int8 kernel (once, about half a minute)")
                mod = load(name, [str(_SRC)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                           build_directory=str(build), verbose=False)
            except Exception as e:  # a compiler error is not the user's problem: torch ops still run
                reason = f"the build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''})"
                mod = None
        if mod is None:
            log.info("quantkit's AVX2 int8 kernel is not used: %s", reason)
        _cache["w8a8"] = mod
        return mod
