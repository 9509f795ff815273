from pathlib import Path

import pytest

import os
import subprocess
import sys

from quantkit.errors import OutputError
from quantkit.io.atomic import MARKER, atomic_dir, atomic_file, atomic_path, check_output


def _leftovers(folder: Path, name: str) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def test_atomic_dir_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        (tmp / "a.txt").write_text("hello")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "hello"
    assert _leftovers(tmp_path, "out") == []


def test_atomic_dir_replaces_its_own_output_after_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final, "checkpoint") as tmp:
        (tmp / "old.txt").write_text("old")
    assert (final / MARKER).is_file()
    with atomic_dir(final, "checkpoint") as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # still there while writing
    assert sorted(p.name for p in final.iterdir()) == [MARKER, "new.txt"]
    assert _leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_failure_leaves_nothing(tmp_path, exc):
    final = tmp_path / "out"
    with pytest.raises(exc):
        with atomic_dir(final) as tmp:
            (tmp / "partial.bin").write_bytes(b"x" * 10)
            raise exc()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_failure_preserves_existing(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "keep.txt").write_text("keep")
    with pytest.raises(ValueError):
        with atomic_dir(final) as tmp:
            (tmp / "keep.txt").write_text("broken")
            raise ValueError("boom")
    assert (final / "keep.txt").read_text() == "keep"
    assert _leftovers(tmp_path, "out") == []


def test_atomic_file_success_text_and_binary(tmp_path):
    with atomic_file(tmp_path / "sub" / "a.bin") as f:
        f.write(b"\x00\x01")
    with atomic_file(tmp_path / "b.txt", "w") as f:
        f.write("héllo")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    assert _leftovers(tmp_path, "b.txt") == [] and _leftovers(tmp_path / "sub", "a.bin") == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_file_failure_preserves_existing(tmp_path, exc):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(exc):
        with atomic_file(final) as f:
            f.write(b"new but incomplete")
            raise exc()
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_file_rejects_read_modes(tmp_path):
    with pytest.raises(ValueError):
        with atomic_file(tmp_path / "x", "rb"):
            pass


def test_atomic_path(tmp_path):
    final = tmp_path / "m.gguf"
    with atomic_path(final) as tmp:
        assert not tmp.exists() and tmp.parent == tmp_path
        tmp.write_bytes(b"GGUF")
    assert final.read_bytes() == b"GGUF"
    with pytest.raises(OSError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError("disk full")
    assert final.read_bytes() == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# ---------------------------------------------------------------- what may be replaced


def _user_files(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    note = tmp_path / "notes.txt"
    note.write_text("mine")
    return folder, note


@pytest.mark.parametrize("kind", ["checkpoint", "export", "adapter", "training", "report", "folder"])
def test_foreign_folder_or_file_is_refused_for_folder_outputs(tmp_path, kind):
    folder, note = _user_files(tmp_path)
    for target in (folder, note):
        with pytest.raises(OutputError, match="quantkit did not write.*--overwrite"):
            with atomic_dir(target, kind) as tmp:
                (tmp / "x").write_text("x")
    assert (folder / "cat.jpg").read_bytes() == b"\xff\xd8 cat" and note.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos"]


@pytest.mark.parametrize("kind", ["gguf", "plan", "sensitivity", "json"])
def test_foreign_file_or_folder_is_refused_for_file_outputs(tmp_path, kind):
    folder, note = _user_files(tmp_path)
    for target in (folder, note):
        with pytest.raises(OutputError):
            with atomic_file(target, "w", kind=kind) as f:
                f.write("x")
    with pytest.raises(OutputError, match="a folder is there"):  # never a folder by a file, even with overwrite
        check_output(folder, kind, overwrite=True)
    assert (folder / "cat.jpg").exists() and note.read_text() == "mine"


def test_overwrite_replaces_a_foreign_output_but_never_a_folder_by_a_file(tmp_path):
    folder, note = _user_files(tmp_path)
    with atomic_dir(folder, "checkpoint", overwrite=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, "model.safetensors"]
    with pytest.raises(OutputError, match="a file is there"):
        check_output(note, "checkpoint", overwrite=True)


def test_a_kind_replaces_only_its_own_kind(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, "report") as tmp:
        (tmp / "report.md").write_text("r")
    with pytest.raises(OutputError, match="quantkit checkpoint folder"):
        check_output(out, "checkpoint")
    gguf, plan = tmp_path / "m.gguf", tmp_path / "plan.json"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    plan.write_text('{"format": "quantkit-plan/1", "rules": []}')
    assert check_output(gguf, "gguf") == gguf and check_output(plan, "plan") == plan
    with pytest.raises(OutputError):
        check_output(gguf, "plan")
    with pytest.raises(OutputError):
        check_output(plan, "gguf")


def test_legacy_checkpoint_without_marker_is_ours(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "config.json").write_text('{"quantization_config": {"quant_method": "quantkit"}}')
    assert check_output(out, "checkpoint") == out
    (out / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    with pytest.raises(OutputError):
        check_output(out, "checkpoint")


def test_empty_folder_is_free(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", "checkpoint") == tmp_path / "empty"


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_source_is_never_replaced_even_with_overwrite(tmp_path, where):
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text('{"quantization_config": {"quant_method": "quantkit"}}')  # even our own
    out = {"same": src, "inside": src / "sub", "parent": tmp_path}[where]
    with pytest.raises(OutputError, match="source model"):
        with atomic_dir(out, "checkpoint", overwrite=True, protect=[src]) as tmp:
            (tmp / "x").write_text("x")
    assert (src / "config.json").exists() and sorted(p.name for p in src.iterdir()) == ["config.json"]


def test_source_file_is_never_replaced(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF source")
    with pytest.raises(OutputError, match="source model"):
        check_output(src, "gguf", overwrite=True, protect=[src])
    link = tmp_path / "alias.gguf"
    link.symlink_to(src)  # the same file under another name
    with pytest.raises(OutputError, match="source model"):
        check_output(link, "gguf", overwrite=True, protect=[src])


def test_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for target in (".", "..", str(work), str(tmp_path)):
        with pytest.raises(OutputError):
            check_output(target, "checkpoint", overwrite=True)


# ---------------------------------------------------------------- leftovers, permissions, races


def test_leftovers_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.tmp-{pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".out.old-{pid}-zz9"
    stale_file.write_bytes(b"y")
    live = tmp_path / f".out.tmp-{os.getppid()}-keep"  # our parent is alive
    live.mkdir()
    other = tmp_path / f".other.tmp-{pid}-abc"  # another output's leftover: not ours to judge now
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", live.name, other.name])


def test_folders_get_mkdir_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
        with atomic_file(tmp_path / "f.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


_WRITER = """
import sys
from pathlib import Path
from quantkit.io.atomic import atomic_dir
out, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(n):
    with atomic_dir(out, "checkpoint") as tmp:
        for j in range(3):
            (tmp / f"part{j}").write_text(f"{tag}-{i}")
"""


def test_concurrent_writers_of_one_output_all_succeed(tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(out), str(k), "40"], stderr=subprocess.PIPE, text=True)
             for k in range(4)]
    errs = [(p.wait(), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in errs), errs
    parts = {(out / f"part{j}").read_text() for j in range(3)}
    assert len(parts) == 1  # one writer's complete output, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
from quantkit.errors import OutputError
from quantkit.io.atomic import atomic_file
try:
    with atomic_file(sys.argv[1], "wb") as f:
        f.write(b"x" * (1 << 20))
except OutputError as e:
    print(e)
"""


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "big.bin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"cannot write {tmp_path / 'big.bin'}: file too large"
    assert list(tmp_path.iterdir()) == []
