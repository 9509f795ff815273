from pathlib import Path

import pytest

from quantkit.io.atomic import atomic_dir, atomic_file, atomic_path


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


def test_atomic_dir_replaces_existing_after_success(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (final / "old.txt").exists()  # still there while writing
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
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
    final.mkdir()
    (final / "keep.txt").write_text("keep")
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
