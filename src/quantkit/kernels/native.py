"""quantkit's own compiled CPU kernels, built on first use with torch's C++ extension loader.

* `wonly()`: the weight-only linear of `wonly.cpp` (every integer width 2-8, nf4/fp4, fp8,
  with any group, double quant included), registered as the torch custom ops
  `torch.ops.quantkit.wonly_linear` / `wonly_dequant`, with AVX2 and AVX-512 paths chosen
  from the CPU (QUANTKIT_ISA=avx2|avx512 forces one). True when the ops are there.
* `w8a8_avx2()`: the AVX2 int8 x int8 linear of `w8a8_avx2.cpp` (for x86-64 CPUs with AVX2
  but without VNNI/AMX, where torch has no fast int8 GEMM), a Python module or None.

Either is unavailable when it cannot run here: not an x86-64 CPU with AVX2, no C++ compiler
or ninja, a failed build, or QUANTKIT_NATIVE=0; callers then use torch ops, and one log line
says why. A first build takes about half a minute and is cached (by source hash) under
~/.cache/quantkit/torch_extensions (QUANTKIT_CACHE moves ~/.cache/quantkit); later processes
load it in well under a second.
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
_HERE = Path(__file__).parent
_lock = threading.Lock()
_cache: dict[str, object] = {}

# name -> (sources, compiler flags, python module?, what it is, for the log)
_EXTENSIONS = {
    "w8a8": (["w8a8_avx2.cpp"], ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"], True,
             "AVX2 int8 kernel"),
    # no -mavx2 for the whole file: each ISA's code is compiled for its own target (#pragma GCC target)
    "wonly": (["wonly.cpp", "wonly_impl.h", "wonly_a8.h"], ["-O3", "-ffp-contract=off", "-fopenmp"], False, "weight-only kernels"),
}
ISAS = {"auto": 0, "avx2": 1, "avx512": 2}


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


def why_not_native() -> str | None:
    """Why quantkit's C++ kernels cannot be built here (None when they can be tried)."""
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


why_not_w8a8_avx2 = why_not_native  # the same conditions


def _build(key: str):
    """Build (or load the cached build of) extension `key`: the module, True for an op
    library, or None; decided once per process."""
    if key in _cache:  # every matmul asks: no lock once decided
        return _cache[key]
    with _lock:
        if key in _cache:
            return _cache[key]
        sources, flags, python_module, what = _EXTENSIONS[key]
        mod = None
        reason = why_not_native()
        if reason is None:
            try:
                from torch.utils.cpp_extension import load

                h = hashlib.sha256(b"".join((_HERE / s).read_bytes() for s in sources))
                h.update(" ".join(flags).encode() + torch.__version__.encode())
                name = f"quantkit_{key}_{h.hexdigest()[:12]}"
                build = _cache_dir() / name
                build.mkdir(parents=True, exist_ok=True)
                if not (build / f"{name}.so").exists():
                    log.warning("building quantkit's %s (once, about half a minute)", what)
                cpp = [str(_HERE / s) for s in sources if s.endswith(".cpp")]
                mod = load(name, cpp, extra_cflags=flags, extra_ldflags=[f for f in flags if f == "-fopenmp"],
                           build_directory=str(build), verbose=False, is_python_module=python_module)
                if not python_module:
                    mod = True
            except Exception as e:  # a compiler error is not the user's problem: torch ops still run
                msg = str(e).strip()
                reason = f"the build failed ({type(e).__name__}: {msg.splitlines()[-1][:200] if msg else ''})"
                mod = None
        if mod is None and key == "wonly":  # every weight-only layer falls back: say so once, visibly
            log.warning("quantkit's %s are not used, torch ops run instead: %s", what, reason)
        elif mod is None:
            log.info("quantkit's %s is not used: %s", what, reason)
        _cache[key] = mod
        return mod


def w8a8_avx2():
    """The compiled module (functions `pack` and `linear`, see w8a8_avx2.cpp) or None."""
    return _build("w8a8")


def wonly() -> bool:
    """Whether torch.ops.quantkit.wonly_linear / wonly_dequant are registered (building them
    on first use)."""
    if _build("wonly") is None:
        return False
    if "wonly_fake" not in _cache:
        from . import wonly_ops  # noqa: F401  (the fake kernels torch.compile traces with)

        _cache["wonly_fake"] = True
    return True


def wonly_isa() -> int:
    """The ISA the weight-only ops run (1 AVX2, 2 AVX-512): QUANTKIT_ISA, else the best."""
    forced = os.environ.get("QUANTKIT_ISA", "auto")
    isa = _isa_cache.get(forced)
    if isa is None:
        key = forced.lower()
        if key not in ISAS:
            from ..errors import QuantkitError

            raise QuantkitError(f"QUANTKIT_ISA={forced} is not one of {', '.join(ISAS)}")
        best = int(torch.ops.quantkit.wonly_best_isa())
        if ISAS[key] > best:
            from ..errors import QuantkitError

            raise QuantkitError(f"QUANTKIT_ISA={forced}, but this CPU has only {'avx2' if best == 1 else 'no AVX2'}")
        isa = _isa_cache[forced] = ISAS[key] or best
    return isa


_isa_cache: dict[str, int] = {}


def wonly_a8_isa() -> int:
    """The path of the int8-activation op (1 AVX2, 2 AVX-512 VNNI): QUANTKIT_ISA=avx2 forces
    AVX2, else the best this CPU has (AVX-512 without VNNI runs the AVX2 path)."""
    isa = wonly_isa()
    if isa == 1:
        return 1
    best = _isa_cache.get("a8")  # asked once: an op call returning an int would break torch.compile's graph
    if best is None:
        best = _isa_cache["a8"] = int(torch.ops.quantkit.wonly_a8_best_isa())
    return best
