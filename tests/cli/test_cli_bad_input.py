"""The bad-input table: every hostile or careless input of the data-safety review, run through
the CLI. Each must exit 2 with exactly one `error:` line and no traceback, leave nothing behind,
and touch nothing outside its output path; the cheap checks must come before the model is
loaded. Then: outputs that are someone else's are kept (or replaced only with --overwrite,
which never touches the source), SIGTERM/SIGKILL leave nothing for long, and outputs stay
deterministic."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantkit
from cli_support import run_error
from quantkit.cli import main

EXE = [sys.executable, "-m", "quantkit.cli"]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size, mtime and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir", oct(p.stat().st_mode & 0o777))
        else:
            st = p.stat()
            out[rel] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def world(tmp_path, tiny, quantized, text_file, monkeypatch):
    """A working folder as a user has it: a model, a checkpoint, a text, and their own files."""
    w = tmp_path / "work"
    w.mkdir()
    shutil.copytree(tiny, w / "model")
    shutil.copytree(quantized, w / "ckpt")
    shutil.copy(text_file, w / "text.txt")
    (w / "user").mkdir()
    (w / "user" / "thesis.tex").write_text("years of work")
    (w / "notes.txt").write_text("my notes")
    (w / "photos.gguf").mkdir()
    (w / "photos.gguf" / "cat.jpg").write_bytes(b"\xff\xd8cat")
    monkeypatch.chdir(w)
    return w


@dataclass
class Case:
    id: str
    argv: list[str]
    fragment: str
    before_load: bool = False  # refused before any model is loaded
    env: dict = field(default_factory=dict)
    prepare: object = None  # prepare(world) -> None, run before the snapshot


def _malicious_resume(w: Path) -> None:
    ck = w / "train" / "checkpoint"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text(json.dumps({"step": 1, "losses": [1.0], "config": {}}))
    save_file({}, str(ck / "trainable.safetensors"))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {w / 'pwned'}",))

    import pickle

    (ck / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Evil()}))


def _no_tokenizer(w: Path) -> None:
    for p in (w / "ckpt").iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            p.unlink()


def _foreign_plan(w: Path) -> None:
    layers = {f"model.layers.{i}.mlp.down_proj": "int4-g32" for i in range(9)}  # a 9-block model's plan
    (w / "plan.json").write_text(json.dumps({"format": "quantkit-plan/1", "method": "rtn", "head": "bf16",
                                             "layers": layers}))


CASES = [
    # 1. --out never deletes what quantkit did not write, nor the source
    Case("out-user-folder", ["quantize", "model", "--scheme", "int8", "--out", "user"], "quantkit did not write", True),
    Case("out-user-file", ["quantize", "model", "--scheme", "int8", "--out", "notes.txt"], "quantkit did not write", True),
    Case("gguf-out-is-a-folder", ["export", "model", "--gguf", "Q8_0", "--out", "photos.gguf"], "quantkit did not write", True),
    Case("out-is-source", ["quantize", "model", "--scheme", "int8", "--out", "model"], "source model", True),
    Case("out-is-source-overwrite", ["quantize", "model", "--scheme", "int8", "--out", "model", "--overwrite"],
         "source model", True),
    Case("out-is-source-checkpoint", ["quantize", "ckpt", "--scheme", "int8", "--out", "ckpt", "--overwrite"],
         "source model", True),
    Case("out-inside-source", ["quantize", "model", "--scheme", "int8", "--out", "model/q"], "source model", True),
    Case("out-dot", ["quantize", "model", "--scheme", "int8", "--out", "."], "not the current", True),
    Case("out-cwd-overwrite", ["quantize", "model", "--scheme", "int8", "--out", "../work", "--overwrite"],
         "current folder", True),
    Case("export-out-not-gguf", ["export", "model", "--gguf", "Q8_0", "--out", "x.bin"], ".gguf", True),
    Case("report-is-a-file", ["compare", "model", "--schemes", "int8", "--text", "text.txt", "--report", "notes.txt"],
         "quantkit did not write", True),
    Case("plan-out-user-file", ["plan", "model", "--budget", "4.5bpw", "--out", "notes.txt"], "quantkit did not write", True),
    Case("qat-out-user-folder", ["qat", "model", "--text", "text.txt", "--out", "user", "--steps", "1"],
         "quantkit did not write", True),
    # 7. numbers and spellings checked at the boundary
    Case("batch-size-0", ["quantize", "model", "--scheme", "int8", "--out", "o", "--batch-size", "0"], "--batch-size", True),
    Case("calib-samples-neg", ["quantize", "model", "--scheme", "int8", "--out", "o", "--calib-samples", "-3"],
         "--calib-samples", True),
    Case("damp-2", ["quantize", "model", "--scheme", "int8", "--method", "gptq", "--out", "o", "--damp", "2"], "--damp", True),
    Case("damp-nan", ["quantize", "model", "--scheme", "int8", "--method", "gptq", "--out", "o", "--damp", "nan"],
         "finite", True),
    Case("ctx-1", ["eval", "model", "--text", "text.txt", "--ctx", "1"], "--ctx", True),
    Case("max-tokens-0", ["eval", "model", "--text", "text.txt", "--max-tokens", "0"], "--max-tokens", True),
    Case("max-ppl-abc", ["plan", "model", "--max-ppl-increase", "abc%"], "--max-ppl-increase", True),
    Case("budget-abc", ["plan", "model", "--budget", "abc"], "budget", True),
    Case("steps-0", ["qat", "model", "--text", "text.txt", "--out", "t", "--steps", "0"], "--steps", True),
    Case("lr-inf", ["finetune", "model", "--text", "text.txt", "--out", "t", "--lr", "inf"], "--lr", True),
    Case("unknown-flag", ["quantize", "model", "--scheme", "int8", "--out", "o", "--bogus"], "unrecognized", True),
    Case("bad-scheme-suggestion", ["quantize", "model", "--scheme", "int4-g100", "--out", "o"], "group size", True),
    Case("sensitivity-unreadable", ["plan", "model", "--budget", "4.5bpw", "--sensitivity", "notes.txt"],
         "sensitivity file", True),
    Case("cache-is-a-file", ["quantize", "smollm2", "--scheme", "int8", "--out", "o"], "is a file",
         True, env={"QUANTKIT_CACHE": "notes.txt"}),
    Case("training-text-missing", ["qat", "model", "--text", "nope.txt", "--out", "t", "--steps", "1"], "no such text", True),
    # 4., 6. what the model cannot take
    Case("quantize-a-checkpoint", ["quantize", "ckpt", "--scheme", "int8", "--out", "o"], "already quantized"),
    Case("export-gptq-of-a-checkpoint-rescheme", ["export", "ckpt", "--to", "gptq", "--scheme", "int4-g32", "--out", "o"],
         "already quantized"),
    Case("plan-names-other-layers", ["quantize", "model", "--plan", "plan.json", "--out", "o"], "matches no layer",
         prepare=_foreign_plan),
    Case("group-size-fallback-strict", ["quantize", "model", "--scheme", "int4-g1024", "--strict-groups", "--out", "o"],
         "group size"),
    # 7. broken inputs found after loading: still one line, nothing written
    Case("eval-without-tokenizer", ["eval", "ckpt", "--text", "text.txt", "--max-tokens", "64", "--ctx", "32"],
         "no tokenizer", prepare=_no_tokenizer),
    Case("qat-resume-malicious-pickle", ["qat", "model", "--text", "text.txt", "--out", "train", "--resume",
                                         "--steps", "2", "--batch-size", "1", "--seq-len", "16", "--eval-tokens", "0"],
         "cannot resume", prepare=_malicious_resume),
    Case("int8-mm-avx2-cannot-run", ["eval", "w8a8", "--text", "text.txt", "--max-tokens", "64", "--ctx", "32"],
         "QUANTKIT_INT8_MM=avx2", env={"QUANTKIT_INT8_MM": "avx2", "QUANTKIT_NATIVE": "0"},
         prepare=lambda w: main(["quantize", "model", "--scheme", "w8a8-dynamic", "--out", "w8a8"])),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_table(case, world, capsys, monkeypatch):
    if case.prepare is not None:
        case.prepare(world)
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    import quantkit.kernels.cpu as kcpu
    import quantkit.kernels.native as knative

    monkeypatch.setattr(kcpu, "_INT8_MM_BACKEND", None)  # chosen once per process: choose again here
    monkeypatch.setattr(knative, "_cache", {})
    if case.before_load:
        def loaded(*a, **k):
            raise AssertionError(f"{case.id}: the model was loaded before the input was checked")

        monkeypatch.setattr(quantkit, "load", loaded)
        monkeypatch.setattr("quantkit.io.load.load", loaded)
    before = snapshot(world)
    line = run_error(capsys, case.argv, case.fragment)
    assert "Traceback" not in line
    assert snapshot(world) == before, f"{case.id} changed the working folder"
    assert not (world / "pwned").exists()


# ---------------------------------------------------------------- --overwrite and the source


def test_planted_outputs_are_kept_or_replaced_only_with_overwrite(world, capsys):
    user, note = world / "user", world / "notes.txt"
    for target in (user, note, world / "model"):
        before = snapshot(world)
        run_error(capsys, ["quantize", "model", "--scheme", "int8", "--out", target])
        assert snapshot(world) == before
    # --overwrite replaces the user's folder (that is what it asks for), never the source
    assert main(["quantize", "model", "--scheme", "int8", "--out", str(user), "--overwrite"]) == 0
    assert not (user / "thesis.tex").exists() and (user / "model.safetensors").is_file()
    src_before = snapshot(world / "model")
    run_error(capsys, ["quantize", "model", "--scheme", "int8", "--out", "model", "--overwrite"], "source model")
    assert snapshot(world / "model") == src_before
    # a previous quantkit output of the same kind is replaced without --overwrite
    assert main(["quantize", "model", "--scheme", "int4-g32", "--out", str(user)]) == 0
    cfg = json.loads((user / "config.json").read_text())
    assert cfg["quantization_config"]["config"]["scheme"] == "int4-g32"
    # but not by another kind of output
    run_error(capsys, ["export", "model", "--to", "gptq", "--out", "user"], "quantkit export folder")


def test_gguf_export_replaces_a_gguf_not_a_folder(world, capsys):
    assert main(["export", "model", "--gguf", "Q8_0", "--out", "m.gguf"]) == 0
    first = (world / "m.gguf").read_bytes()
    assert main(["export", "model", "--gguf", "Q4_0", "--out", "m.gguf"]) == 0
    assert (world / "m.gguf").read_bytes() != first and (world / "m.gguf").read_bytes()[:4] == b"GGUF"
    run_error(capsys, ["export", "model", "--gguf", "Q8_0", "--out", "photos.gguf", "--overwrite"], "a folder is there")
    assert (world / "photos.gguf" / "cat.jpg").exists()


# ---------------------------------------------------------------- signals


def _run_killed(world: Path, sig: int, out: str) -> subprocess.CompletedProcess:
    """Run `quantkit quantize model --out OUT` and send `sig` to itself while the weights are written."""
    code = (
        "import os, signal, sys\n"
        "import quantkit.io.checkpoint as c\n"
        "orig = c._write_weights\n"
        "def write(m, p):\n"
        "    orig(m, p)\n"
        f"    os.kill(os.getpid(), {int(sig)})\n"
        "c._write_weights = write\n"
        "from quantkit.cli import main\n"
        f"sys.exit(main(['quantize', 'model', '--scheme', 'int8', '--out', {out!r}]))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=world, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_take_the_same_cleanup_as_ctrl_c(world, sig):
    before = snapshot(world)
    r = _run_killed(world, sig, "out")
    assert r.returncode == (130 if sig == signal.SIGINT else 128 + sig), r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert lines[-1].startswith("interrupted") and "Traceback" not in r.stderr, r.stderr
    assert snapshot(world) == before


def test_a_killed_writer_leaves_a_sibling_that_the_next_run_removes(world):
    r = _run_killed(world, signal.SIGKILL, "out")
    assert r.returncode == -signal.SIGKILL
    left = [p.name for p in world.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and not (world / "out").exists()
    assert main(["quantize", "model", "--scheme", "int8", "--out", "out"]) == 0
    assert [p.name for p in world.iterdir() if p.name.startswith(".out.")] == []


# ---------------------------------------------------------------- disk full


def test_a_full_disk_is_one_error_line_and_leaves_nothing(world):
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
            "from quantkit.cli import main\n"
            "sys.exit(main(['quantize', 'model', '--scheme', 'int8', '--out', 'out']))\n")
    before = snapshot(world)
    r = subprocess.run([sys.executable, "-c", code], cwd=world, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "%|" not in ln]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert lines == [f"error: cannot write out: file too large"] or (
        len(lines) == 1 and lines[0].startswith("error: cannot write") and "file too large" in lines[0]), r.stderr
    assert snapshot(world) == before


# ---------------------------------------------------------------- determinism


def _bytes_of(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("argv", [
    ["quantize", "model", "--scheme", "int4-g32"],
    ["quantize", "model", "--scheme", "int4-g32", "--method", "gptq", "--calib", "text.txt", "--calib-samples", "4",
     "--calib-len", "32"],
    ["export", "model", "--gguf", "Q4_K_M"],
], ids=["quantize", "gptq", "export-gguf"])
def test_two_runs_write_the_same_bytes(world, argv):
    ext = ".gguf" if argv[0] == "export" else ""
    assert main([*argv, "--out", f"a{ext}"]) == 0
    assert main([*argv, "--out", f"b{ext}"]) == 0
    a, b = _bytes_of(world / f"a{ext}"), _bytes_of(world / f"b{ext}")
    assert len(a) >= 1 and a == b


def test_loaded_model_weights_match_the_source_files(world):
    """A sanity check of the fixture itself: the model folder holds every tensor it loads."""
    sd = load_file(str(world / "model" / "model.safetensors"))
    model, _ = quantkit.load(world / "model")
    for k, t in sd.items():
        assert torch.equal(model.state_dict()[k], t), k
