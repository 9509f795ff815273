"""Atomic outputs that never replace what quantkit did not write.

Every output is written to a temporary sibling and renamed into place only when complete. An
interrupted or failed write (any exception, KeyboardInterrupt and, in the CLI, SIGTERM/SIGHUP
included) leaves no partial output; a writer killed outright (SIGKILL) leaves its temporary
sibling, whose name records its pid, and the next writer of that output removes it::

    with atomic_dir("out/model", kind="checkpoint") as tmp:   # tmp = out/.model.tmp-<pid>-XXXX
        save_everything_into(tmp)
    with atomic_file("out/plan.json", "w", kind="plan") as f:
        f.write(text)
    with atomic_path("out/model.gguf", kind="gguf") as tmp:    # for writers that want a path
        writer.write_to(tmp)

What may be replaced (`check_output`, run before any work and again, under a lock on the
parent folder, right before the rename):
- nothing at the path, or an empty folder;
- a previous quantkit output of the same `kind`: a folder that carries quantkit's marker file
  (`MARKER`, written into every folder output) of that kind, or a file the kind recognises
  (`FILE_KINDS`: a GGUF file by its magic, a plan or sensitivity file by its contents);
- anything else only with `overwrite=True`.
Never, even with `overwrite`: a `protect`ed path (the model source), a folder holding one,
a path inside one, the current folder or one of its parents, the home folder or `/`.
Two writers of the same output are serialized at the rename (`flock` on the parent folder).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from ..errors import OutputError

__all__ = ["MARKER", "atomic_dir", "atomic_file", "atomic_path", "check_output", "is_quantkit_output"]

MARKER = ".quantkit-output"  # {"kind": ...}: this folder was written by quantkit
_FOLDER_KINDS = ("checkpoint", "export", "adapter", "training", "resume", "report", "float", "folder")
_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EDQUOT: "disk quota exceeded"}


def _sniff(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _json_has(path: Path, keys: tuple[str, ...], fmt: str | None = None) -> bool:
    try:
        if path.stat().st_size > 256 << 20:
            return False
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    if not isinstance(d, dict):
        return False
    if fmt is not None:
        return str(d.get("format", "")).startswith(fmt)
    return all(k in d for k in keys)


# kind -> test of an existing file: is it a previous output of this kind?
FILE_KINDS: dict[str, Callable[[Path], bool]] = {
    "gguf": lambda p: _sniff(p, 4) == b"GGUF",
    "plan": lambda p: _json_has(p, (), fmt="quantkit-plan/"),
    "sensitivity": lambda p: _json_has(p, ("schemes", "layers")),
    "json": lambda p: _json_has(p, ()),
    "file": lambda p: True,  # a file inside a folder quantkit owns (checked at the folder)
}


def _legacy_folder(path: Path, kind: str) -> bool:
    """Outputs written before the marker existed, recognised by what quantkit put there."""
    def qc_method():
        try:
            qc = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, ValueError, AttributeError, UnicodeDecodeError):
            return None
        return qc.get("quant_method") if isinstance(qc, dict) else None

    if kind == "checkpoint":
        return qc_method() == "quantkit"
    if kind == "export":
        card = path / "README.md"
        return qc_method() in ("gptq", "compressed-tensors") and card.is_file() and b"quantkit" in _sniff(card, 1 << 16)
    if kind == "adapter":
        return (path / "quantkit_base.json").is_file()
    if kind == "resume":
        return (path / "state.json").is_file() and (path / "trainable.safetensors").is_file()
    if kind == "float":  # io.offload's OFFLOAD/float, a name quantkit chose
        return (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    if kind == "report":
        return (path / "report.md").is_file() and (path / "results.json").is_file()
    if kind == "training":
        return (path / "checkpoint" / "state.json").is_file() or (
            (path / "results.json").is_file() and any((path / d).is_dir() for d in ("model", "adapter", "merged")))
    return False


def is_quantkit_output(path: str | os.PathLike, kind: str) -> bool:
    """Is `path` a previous quantkit output of `kind` (so it may be replaced)?"""
    p = Path(path)
    if kind in FILE_KINDS:
        return p.is_file() and not p.is_symlink() and FILE_KINDS[kind](p)
    if not p.is_dir() or p.is_symlink():
        return False
    marker = p / MARKER
    if marker.is_file():
        try:
            return json.loads(marker.read_text(encoding="utf-8")).get("kind") == kind
        except (OSError, ValueError, AttributeError, UnicodeDecodeError):
            return False
    return _legacy_folder(p, kind)


def _describe(p: Path) -> str:
    if p.is_symlink():
        return "a symbolic link"
    if p.is_dir():
        n = sum(1 for _ in p.iterdir())
        return f"a folder with {n} entr{'y' if n == 1 else 'ies'} that quantkit did not write"
    return "a file that quantkit did not write"


def _inside(a: Path, b: Path) -> bool:
    """Is `a` the same as `b` or inside it?"""
    return a == b or b in a.parents


def check_output(path: str | os.PathLike, kind: str, *, overwrite: bool = False,
                 protect: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse (OutputError) to write `path` unless it is free or quantkit's own output of `kind`
    (module docstring). Cheap: run it before loading a model. Returns the resolved path."""
    if kind not in FILE_KINDS and kind not in _FOLDER_KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    final = Path(path).expanduser()
    real = Path(os.path.realpath(final))
    if not final.name or final.name in (".", ".."):
        raise OutputError(f"cannot write to {path}: name an output {'file' if kind in FILE_KINDS else 'folder'} "
                          "(e.g. out/model), not the current or parent folder")
    cwd = Path(os.path.realpath(os.getcwd()))
    if _inside(cwd, real) or real == Path(os.path.realpath(Path.home())) or real == Path(real.anchor):
        raise OutputError(f"refusing to write to {path}: it is the current folder, one of its parents, the home "
                          "folder or the root; choose a new output path")
    for src in protect:
        if src is None:
            continue
        s = Path(os.path.realpath(Path(src).expanduser()))
        if _inside(real, s) or _inside(s, real):
            where = "is" if real == s else ("is inside" if _inside(real, s) else "contains")
            raise OutputError(f"refusing to write to {path}: it {where} the source model {src}; "
                              "quantkit never touches a source model, choose another output path")
    if not (final.exists() or final.is_symlink()):
        if final.parent.exists() and not final.parent.is_dir():
            raise OutputError(f"cannot write {path}: {final.parent} is a file, not a folder")
        return final
    if kind not in FILE_KINDS and final.is_dir() and not final.is_symlink() and not any(final.iterdir()):
        return final  # an empty folder holds nothing to lose
    if is_quantkit_output(final, kind) or overwrite:
        if kind in FILE_KINDS and final.is_dir() and not final.is_symlink():
            raise OutputError(f"cannot write the file {path}: a folder is there (quantkit will not replace a "
                              "folder by a file); choose another path")
        if kind not in FILE_KINDS and not final.is_dir():
            raise OutputError(f"cannot write the folder {path}: a file is there (quantkit will not replace a "
                              "file by a folder); choose another path")
        return final
    what = {"gguf": "a .gguf file", "plan": "a quantkit plan", "sensitivity": "a quantkit sensitivity file",
            "json": "a JSON file"}.get(kind, f"a quantkit {kind} folder")
    raise OutputError(f"{path} already exists and is {_describe(final)} (quantkit replaces only {what} it "
                      "wrote); choose another output path, or pass --overwrite to replace it")


# ---------------------------------------------------------------- temporary siblings


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[^.]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(final: Path) -> None:
    """Remove the temporary siblings of `final` left by writers that died (their pid is gone)."""
    with contextlib.suppress(OSError):
        for p in final.parent.iterdir():
            m = _LEFTOVER.match(p.name)
            if m and m.group("name") == final.name and not _alive(int(m.group("pid"))):
                _remove(p)


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


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder` (flock on its descriptor) where the OS has one."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _prefix(final: Path, what: str) -> str:
    return f".{final.name}.{what}-{os.getpid()}-"


def _move_into_place(tmp: Path, final: Path, check: Callable[[], object]) -> None:
    """Rename `tmp` to `final` under the parent's lock, after `check` allows it again; an
    existing `final` is set aside first and removed only once the new one is in place."""
    with _locked(final.parent):
        check()
        if not (final.exists() or final.is_symlink()) or (not final.is_dir() and not tmp.is_dir()):
            os.replace(tmp, final)  # nothing there, or file over file: one atomic step
        else:
            # A folder cannot be replaced in one step: move the old one aside, put the new one in,
            # then drop the old one. If the second rename fails, put the old one back.
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=_prefix(final, "old")))
            old.rmdir()
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            _remove(old)
        _fsync_dir(final.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _disk_error(e: BaseException, final: Path) -> OutputError | None:
    """A write failure the user can act on (full or read-only disk...), as one line."""
    code = getattr(e, "errno", None)
    if isinstance(e, OSError) and code in _DISK_ERRNOS:
        return OutputError(f"cannot write {final}: {_DISK_ERRNOS[code]}")
    text = str(e).lower()  # libraries (safetensors, numpy) wrap the OS error in their own
    for needle, reason in (("no space left", "no space left on device"), ("file too large", "file too large"),
                           ("read-only file system", "read-only file system"), ("storagefull", "no space left on device"),
                           ("quota exceeded", "disk quota exceeded")):
        if needle in text:
            return OutputError(f"cannot write {final}: {reason}")
    return None


@contextlib.contextmanager
def _guarded(tmp: Path, final: Path) -> Iterator[None]:
    try:
        yield
    except OutputError:
        _remove(tmp)
        raise
    except BaseException as e:
        _remove(tmp)
        err = _disk_error(e, final)
        if err is not None:
            raise err from None
        raise


def _start(final_path, kind: str, overwrite: bool, protect) -> tuple[Path, Callable[[], object]]:
    final = Path(final_path).expanduser()

    def check():
        return check_output(final, kind, overwrite=overwrite, protect=protect)

    if final.parent.is_dir():
        with _locked(final.parent):  # not in the middle of another writer's two renames
            check()
    else:
        check()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _disk_error(e, final) or OutputError(f"cannot create the folder {final.parent}: {e.strerror}") from None
    _sweep(final)
    return final, check


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike, kind: str = "folder", overwrite: bool = False,
               protect: Iterable = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to `final_path`; rename it to `final_path` on success.

    The folder gets quantkit's marker of `kind` (so a later run may replace it) and the
    permissions `mkdir` would give. On any exception the temporary folder is removed and an
    existing `final_path` is left untouched.
    """
    if kind not in _FOLDER_KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    protect = tuple(protect)
    final, check = _start(final_path, kind, overwrite, protect)
    try:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=_prefix(final, "tmp")))
    except OSError as e:
        raise _disk_error(e, final) or OutputError(f"cannot write {final}: {e.strerror}") from None
    with _guarded(tmp, final):
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the folder gets what mkdir would give
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kind": kind}) + "\n", encoding="utf-8")
        _move_into_place(tmp, final, check)


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike, kind: str = "file", overwrite: bool = False,
                protect: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary file path next to `final_path` (the file does not exist yet).

    For writers that take a path rather than a file object. On success the file written there
    is renamed to `final_path`; on failure it is removed.
    """
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown file kind {kind!r}")
    protect = tuple(protect)
    final, check = _start(final_path, kind, overwrite, protect)
    fd, name = tempfile.mkstemp(dir=final.parent, prefix=_prefix(final, "tmp"))
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    with _guarded(tmp, final):
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {tmp}")
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o666 & ~_umask())
        _move_into_place(tmp, final, check)


@contextlib.contextmanager
def atomic_file(final_path: str | os.PathLike, mode: str = "wb", encoding: str | None = None, kind: str = "file",
                overwrite: bool = False, protect: Iterable = ()) -> Iterator[IO]:
    """Open a temporary file next to `final_path` for writing; rename it into place on success.

    `mode` must be a write mode ("wb" or "w"); text mode defaults to UTF-8. The data is flushed
    and fsynced before the rename. On failure the temporary file is removed.
    """
    if mode not in ("w", "wb", "wt", "w+", "wb+", "w+b"):
        raise ValueError(f"atomic_file writes a new file: mode must be 'w' or 'wb', got {mode!r}")
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown file kind {kind!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    protect = tuple(protect)
    final, check = _start(final_path, kind, overwrite, protect)
    try:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=_prefix(final, "tmp"))
    except OSError as e:
        raise _disk_error(e, final) or OutputError(f"cannot write {final}: {e.strerror}") from None
    tmp = Path(name)
    with _guarded(tmp, final):
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the permissions open() would give
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _move_into_place(tmp, final, check)
