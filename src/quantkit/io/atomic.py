"""Atomic outputs: write to a temporary sibling, rename into place only when complete.

An interrupted or failed write (any exception, KeyboardInterrupt included) leaves no partial
output behind, and an existing output at the final path is replaced only after the new one is
complete. The temporary sibling lives in the same folder as the final path, so the rename
stays on one filesystem::

    with atomic_dir("out/model") as tmp:      # tmp = out/.model.tmp-XXXX
        save_everything_into(tmp)
    with atomic_file("out/report.json", "w") as f:
        f.write(text)
    with atomic_path("out/model.gguf") as tmp: # for writers that want a path, not a handle
        writer.write_to(tmp)
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_dir", "atomic_file", "atomic_path"]


def _remove(path: Path) -> None:
    """Remove a file, link or folder; missing is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable where the OS allows it (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` is set aside first and removed afterwards."""
    if not (final.exists() or final.is_symlink()):
        os.replace(tmp, final)
    elif not final.is_dir() and not tmp.is_dir():
        os.replace(tmp, final)  # file over file: atomic on POSIX and Windows
    else:
        # A folder cannot be replaced in one step: move the old one aside, put the new one in,
        # then drop the old one. If the second rename fails, put the old one back.
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        old.rmdir()
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
        _remove(old)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `final_path`; rename it to `final_path` on success.

    On any exception (or KeyboardInterrupt) the temporary folder is removed and an existing
    `final_path` is left untouched.
    """
    final = Path(final_path).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        _move_into_place(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `final_path` (the file does not exist yet).

    For writers that take a path rather than a file object. On success the file written there
    is renamed to `final_path`; on failure it is removed.
    """
    final = Path(final_path).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {tmp}")
        _move_into_place(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_file(final_path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to `final_path` for writing; rename it into place on success.

    `mode` must be a write mode ("wb" or "w"); text mode defaults to UTF-8. The data is flushed
    and fsynced before the rename. On failure the temporary file is removed.
    """
    if mode not in ("w", "wb", "wt", "w+", "wb+", "w+b"):
        raise ValueError(f"atomic_file writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    final = Path(final_path).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the permissions open() would give
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
