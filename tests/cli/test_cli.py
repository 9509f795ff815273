"""The command line, in process: one-line errors with exit code 2 and no output left, and the
quantize -> eval / inspect / compare paths on a tiny model saved in tmp (no network)."""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.utils import logging as hf_logging

from quantkit.cli import main

hf_logging.set_verbosity_error()

from cli_support import TEXT, VOCAB, listing as _listing, run_error  # noqa: E402
from measure_support import MIN_FORWARD_S, high_water_bytes, resident_bytes  # noqa: E402


# ----------------------------------------------------------------------------- bad input
def _quantize_error(capsys, tmp_path, model, scheme, *fragments, extra=()):
    out = tmp_path / "out"
    before = _listing(tmp_path)
    line = run_error(capsys, ["quantize", model, "--scheme", scheme, "--out", out, *extra], *fragments)
    assert not out.exists()
    assert _listing(tmp_path) == before  # no temporary folder left either
    return line


def test_missing_model_path(capsys, tmp_path):
    _quantize_error(capsys, tmp_path, tmp_path / "no-such-model", "int8", "no such file or folder")


def test_truncated_safetensors_in_hf_folder(capsys, tmp_path, tiny):
    bad = Path(shutil.copytree(tiny, tmp_path / "bad"))
    w = bad / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    _quantize_error(capsys, tmp_path, bad, "int8", "truncated", "model.safetensors")


def test_truncated_gguf(capsys, tmp_path):
    import gguf

    full = tmp_path / "full.gguf"
    w = gguf.GGUFWriter(str(full), "llama")
    w.add_block_count(1)
    w.add_context_length(32)
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32))
    w.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert full.stat().st_size > 60_000
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(full.read_bytes()[:1000])
    full.unlink()
    _quantize_error(capsys, tmp_path, bad, "int8", "trunc.gguf", "truncated or not a valid GGUF")


def test_unknown_scheme(capsys, tmp_path, tiny):
    _quantize_error(capsys, tmp_path, tiny, "int9", "unknown bit width 9")


def test_invalid_group(capsys, tmp_path, tiny):
    _quantize_error(capsys, tmp_path, tiny, "int4-g100", "invalid group size 100")


def test_strict_groups_with_a_non_dividing_group(capsys, tmp_path, tiny):
    # width 96: 64 does not divide it; without --strict-groups the layer would get g32
    _quantize_error(capsys, tmp_path, tiny, "int4-g64", "group size 64 does not divide the input width 96",
                    extra=["--strict-groups"])


def test_unknown_method(capsys, tmp_path, tiny):
    _quantize_error(capsys, tmp_path, tiny, "int4-g32", "--method: invalid choice: 'magic' (choose from 'gptq', 'llm-int8', 'rtn', 'rtn-mse')", "rtn",
                    extra=["--method", "magic"])


def test_empty_text(capsys, tmp_path, tiny):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    before = _listing(tmp_path)
    run_error(capsys, ["eval", tiny, "--text", empty, "--ctx", "16"], "empty")
    assert _listing(tmp_path) == before


def test_too_short_text(capsys, tmp_path, tiny):
    short = tmp_path / "short.txt"
    short.write_text("The boats came in.\nThe market opened.\n")
    before = _listing(tmp_path)
    run_error(capsys, ["eval", tiny, "--text", short, "--ctx", "64"], "too short")
    assert _listing(tmp_path) == before


def test_missing_text_file(capsys, tmp_path, tiny):
    run_error(capsys, ["eval", tiny, "--text", tmp_path / "nope.txt"], "no such text file")


def test_compare_refuses_a_bad_scheme_list_before_work(capsys, tmp_path, tiny, text_file):
    report = tmp_path / "report"
    run_error(capsys, ["compare", tiny, "--schemes", "int8,int9", "--text", text_file, "--report", report,
                       "--no-speed"], "int9")
    assert not report.exists()


# ----------------------------------------------------------------------------- success paths
def _json_out(capsys, argv):
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 0
    out, _ = capsys.readouterr()
    return json.loads(out)


def _timed_json_out(capsys, argv):
    """(_json_out's result, the wall time around the command): no time it measured can exceed it."""
    start = time.perf_counter()
    res = _json_out(capsys, argv)
    return res, time.perf_counter() - start


def _tensor_bytes(model) -> int:
    """Independent count of what a model holds: every distinct parameter and buffer, numel x element size."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _reference_perplexity(model_dir: Path, text_file: Path, ctx: int) -> tuple[float, int]:
    """Perplexity computed here, from the reloaded model's logits and the tokenizer directly."""
    import quantkit as qk

    model, tok = qk.load(model_dir)
    text = qk.text(text_file)  # the evaluation part, as the CLI uses
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    n = ids.numel() // ctx
    windows = ids[: n * ctx].reshape(n, ctx)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1),
                                            reduction="sum")
    tokens = n * (ctx - 1)
    return math.exp(float(nll) / tokens), tokens


def test_quantize_writes_a_checkpoint(quantized):
    cfg = json.loads((quantized / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "quantkit"
    assert cfg["quantization_config"]["config"]["scheme"] == "int4-g32"
    assert (quantized / "model.safetensors").is_file() and (quantized / "tokenizer.json").is_file()


def test_eval_json(capsys, quantized, text_file):
    res = _json_out(capsys, ["eval", quantized, "--text", text_file, "--ctx", "16", "--json"])
    assert {"perplexity", "tokens", "size_bytes", "memory_bytes"} <= set(res)
    ppl, tokens = _reference_perplexity(quantized, text_file, 16)
    assert res["tokens"] == tokens > 100
    assert res["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert res["size_bytes"] == (quantized / "model.safetensors").stat().st_size  # weight files only
    # what the evaluated model held: the checkpoint reloaded here, after one forward (the kernels
    # pack their buffers on first use, as they did during the evaluation)
    model, _ = __import__("quantkit").load(quantized)
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 16, dtype=torch.long))
    assert res["memory_bytes"] == _tensor_bytes(model) > 0
    assert "kl_divergence" not in res and "decode_tokens_per_s" not in res


def test_eval_against_a_reference(capsys, quantized, tiny, text_file):
    res = _json_out(capsys, ["eval", quantized, "--text", text_file, "--ctx", "16", "--max-tokens", "96",
                             "--reference", tiny, "--json"])
    assert {"perplexity", "tokens", "kl_divergence", "top1_agreement"} <= set(res)
    assert res["tokens"] == 6 * 15
    assert 0 < res["kl_divergence"] < 0.5 and 0 <= res["top1_agreement"] <= 1
    # a model against itself: no divergence, full agreement
    same = _json_out(capsys, ["eval", tiny, "--text", text_file, "--ctx", "16", "--max-tokens", "96",
                              "--reference", tiny, "--json"])
    assert same["kl_divergence"] == pytest.approx(0, abs=1e-6) and same["top1_agreement"] == 1.0


def test_eval_speed(capsys, quantized, text_file):
    res, wall = _timed_json_out(capsys, ["eval", quantized, "--text", text_file, "--ctx", "16", "--max-tokens", "32",
                                         "--speed", "--json"])
    # 64 timed decode steps (evaluate/run.py) inside the command; at most one token per forward
    assert 64 / wall <= res["decode_tokens_per_s"] <= 1 / MIN_FORWARD_S


def test_inspect_json(capsys, tiny, quantized):
    from quantkit.evaluate.inspect import INSPECT_SCHEMES

    info = _json_out(capsys, ["inspect", tiny, "--json"])
    assert set(info["sizes"]) == set(INSPECT_SCHEMES)
    # the estimate for int4-g32 is the file `quantize --scheme int4-g32` wrote
    assert info["sizes"]["int4-g32"]["bytes"] == (quantized / "model.safetensors").stat().st_size
    # hand count: embeddings 320x96 (tied) + 2 blocks of 4 attention + 3 MLP Linears + 5 norms
    h, i, kv = 96, 192, 48
    per_block = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    assert info["parameters"] == VOCAB * h + 2 * per_block + h
    assert info["sizes"]["fp32"]["bits_per_param"] > info["sizes"]["int8"]["bits_per_param"] \
        > info["sizes"]["int4-g32"]["bits_per_param"] > info["sizes"]["int2-g64"]["bits_per_param"]


def test_compare_writes_a_report(capsys, tmp_path, tiny, text_file):
    report = tmp_path / "report"
    capsys.readouterr()
    rc = main(["compare", str(tiny), "--schemes", "fp32,int8,int4-g32", "--text", str(text_file), "--ctx", "16",
               "--max-tokens", "64", "--report", str(report), "--no-speed"])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert (report / "report.md").is_file()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs and all((report / p).stat().st_size > 1000 for p in pngs)
    assert (report / "results.json").is_file()
    md = (report / "report.md").read_text()
    for s in ("fp32", "int8", "int4-g32"):
        assert s in md
    for p in pngs:
        assert p in md
    assert "int4-g32" in out


# ----------------------------------------------------------------------------- GGUF export, w8a8
def test_export_gguf_from_a_folder_and_from_a_checkpoint(capsys, tmp_path, tiny):
    import gguf

    out = tmp_path / "m.gguf"
    res = _json_out(capsys, ["export", tiny, "--gguf", "q8_0", "--out", out, "--tokenizer-pre", "gpt-2", "--json"])
    assert res["gguf_type"] == "Q8_0" and res["size_bytes"] == out.stat().st_size
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"Q8_0", "F32"}
    # a quantkit checkpoint on the Q4_1 grid (int4, groups of 32, affine) is repacked, not rounded again
    ck = tmp_path / "ck"
    assert main(["quantize", str(tiny), "--scheme", "int4-g32", "--out", str(ck)]) == 0
    res = _json_out(capsys, ["export", ck, "--gguf", "Q4_1", "--out", tmp_path / "r.gguf", "--tokenizer-pre",
                             "gpt-2", "--json"])
    assert res["repacked"] == 14 and res["requantized"] == 0


def test_export_errors_leave_nothing(capsys, tmp_path, tiny):
    run_error(capsys, ["export", tmp_path / "nope", "--gguf", "Q4_0", "--out", tmp_path / "x.gguf"], "nope")
    assert not list(tmp_path.iterdir())
    run_error(capsys, ["export", tiny, "--gguf", "Q4_0", "--out", tmp_path / "x.bin", "--tokenizer-pre", "gpt-2"],
              ".gguf")
    assert not list(tmp_path.iterdir())
    capsys.readouterr()
    assert main(["export", str(tiny), "--gguf", "Q7_0", "--out", str(tmp_path / "x.gguf")]) == 2  # argparse
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Q4_K_M" in err[0]  # lists the valid types


def test_export_to_gptq_and_compressed_tensors_with_a_model_card(capsys, tmp_path, tiny, text_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = _json_out(capsys, ["export", tiny, "--to", "gptq", "--eval-text", text_file, "--eval-tokens", "64", "--ctx", "32",
                             "--json"])
    out = tmp_path / "model-GPTQ-4bit-32g"  # width 96: the largest group dividing every layer is 32
    assert res["out"] == "model-GPTQ-4bit-32g" and res["scheme"] == "int4-g32-sym" and out.is_dir()
    card = (out / "README.md").read_text()
    assert "perplexity" in card and "quantkit export" in card and "groups of 32" in card
    assert {"config.json", "model.safetensors", "quantize_config.json", "tokenizer.json"} <= set(_listing(out))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    ck = tmp_path / "ck"
    assert main(["quantize", str(tiny), "--scheme", "int8", "--out", str(ck)]) == 0
    res = _json_out(capsys, ["export", ck, "--to", "compressed-tensors", "--out", tmp_path / "ct", "--json"])
    assert res["scheme"] == "int8" and res["group_size"] == -1
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    run_error(capsys, ["export", ck, "--to", "gptq", "--scheme", "int4", "--out", tmp_path / "x"], "already quantized")
    run_error(capsys, ["export", tiny, "--to", "gptq", "--scheme", "nf4", "--out", tmp_path / "y"], "integer")
    run_error(capsys, ["export", tiny, "--out", tmp_path / "z"], "--gguf", "--to")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_quantize_w8a8_static_with_smoothquant(capsys, tmp_path, tiny, text_file):
    out = tmp_path / "w8a8"
    res = _json_out(capsys, ["quantize", tiny, "--scheme", "w8a8-static-percentile", "--smooth", "--calib", text_file,
                             "--calib-samples", "4", "--calib-len", "32", "--out", out, "--json"])
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["config"]["transforms"] == [{"name": "smoothquant", "options": {"alpha": 0.5}}] and set(cfg["layers"].values()) == {"w8a8-static-percentile"}
    assert res["size_bytes"] == (out / "model.safetensors").stat().st_size
    run_error(capsys, ["quantize", tiny, "--scheme", "w8a8-static-bogus", "--out", tmp_path / "x"], "observer")
    run_error(capsys, ["quantize", tiny, "--scheme", "int8", "--smooth", "2", "--calib", text_file,
                       "--out", tmp_path / "x"], "alpha")
    assert not (tmp_path / "x").exists()


def test_compare_activation_schemes_calibrate_once(capsys, tmp_path, tiny, text_file):
    res = _json_out(capsys, ["compare", tiny, "--schemes", "fp32,w8a8-dynamic,w8a8-static-mse", "--text", text_file,
                             "--ctx", "16", "--max-tokens", "64", "--calib", text_file, "--calib-samples", "4",
                             "--calib-len", "32", "--no-speed", "--json"])
    assert [r["scheme"] for r in res["rows"]] == ["fp32", "w8a8-dynamic", "w8a8-static-mse"]
    assert all(r["kl_divergence"] < 0.05 for r in res["rows"])


# ----------------------------------------------------------------------------- training
TRAIN = ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--ctx", "16", "--eval-tokens", "48"]


def test_qat_trains_converts_and_resumes(capsys, tmp_path, tiny, text_file):
    out = tmp_path / "qat"
    res = _json_out(capsys, ["qat", tiny, "--scheme", "int4-g32", "--lsq", "--text", text_file, "--out", out, *TRAIN,
                             "--save-every", "2", "--json"])
    assert len(res["losses"]) == 3 and res["held_out_perplexity"] > 1
    assert res["convert_max_logit_diff"]["reference_kernel"] < 1e-4
    model, _ = __import__("quantkit").load(out / "model")
    assert set(model.quantkit.methods.values()) == {"qat"}
    assert json.loads((out / "results.json").read_text())["losses"] == res["losses"]
    again = _json_out(capsys, ["qat", tiny, "--scheme", "int4-g32", "--lsq", "--text", text_file, "--out", out,
                               *TRAIN[:-2], "--steps", "5", "--eval-tokens", "48", "--resume", "--json"])
    assert again["resumed_at"] == 3 and again["losses"][:3] == res["losses"] and len(again["losses"]) == 5


def test_finetune_writes_a_peft_adapter_and_a_merged_model(capsys, tmp_path, tiny, text_file):
    out = tmp_path / "ft"
    res = _json_out(capsys, ["finetune", tiny, "--text", text_file, "--out", out, *TRAIN, "--optimizer", "adamw8bit",
                             "--merge", "--json"])
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    assert res["trainable_params"] == 2 * 8 * ((96 + 96) + (96 + 48)) and res["optimizer"] == "adamw8bit"
    assert res["held_out_perplexity_before"] > 1 and res["held_out_perplexity_after"] > 1
    merged, _ = __import__("quantkit").load(out / "merged")
    assert "qlora-merge" in merged.quantkit.methods.values()


def test_training_errors_are_one_line(capsys, tmp_path, tiny, text_file):
    run_error(capsys, ["qat", tiny, "--scheme", "fp32", "--text", text_file, "--out", tmp_path / "a", *TRAIN], "nothing to train")
    run_error(capsys, ["qat", tiny, "--text", text_file, "--out", tmp_path / "b", *TRAIN, "--resume"], "nothing to resume")
    run_error(capsys, ["finetune", tiny, "--text", text_file, "--out", tmp_path / "c", *TRAIN, "--targets", "qq_proj"],
              "no Linear named qq_proj")
    run_error(capsys, ["finetune", tiny, "--text", text_file, "--out", tmp_path / "d", "--seq-len", "100000"], "too short")
    run_error(capsys, ["finetune", tiny, "--text", text_file, "--out", tmp_path / "e", "--lr", "0"], "--lr: must be > 0")


# ----------------------------------------------------------------------------- mixed precision
def test_sensitivity_plan_and_quantize_with_the_plan(capsys, tmp_path, tiny, text_file):
    calib = ["--calib", text_file, "--calib-samples", "2", "--calib-len", "16", "--schemes", "int8,int4-g32"]
    sens = tmp_path / "sens.json"
    res = _json_out(capsys, ["sensitivity", tiny, *calib, "--out", sens, "--report", tmp_path / "rep", "--proxy", "--json"])
    assert len(res["layers"]) == 14 and (tmp_path / "rep" / "sensitivity.png").exists()
    assert -1 <= res["rank_correlation"] <= 1 and len(res["proxy"]) == 14
    rss_before = resident_bytes()
    dry, wall = _timed_json_out(capsys, ["quantize", tiny, "--scheme", "int4-g32", "--out", tmp_path / "u", "--dry-run",
                                         "--json"])
    assert not (tmp_path / "u").exists()
    # the estimate scales what its probe measured inside the command (every layer of this 2-block model
    # is sampled: at most twice the time measured, see tests/estimate); its peak starts from the
    # process's high-water mark and adds at most one transient below it and the output's few hundred KB
    assert 0 < dry["seconds"] <= 2 * wall and 0 < dry["probe_seconds"] <= wall
    assert rss_before <= dry["peak_rss_bytes"] <= 2 * high_water_bytes() + 64 * 2**20
    g, g_wall = _timed_json_out(capsys, ["quantize", tiny, "--scheme", "int4-g32", "--method", "gptq", "--calib",
                                         text_file, "--calib-samples", "2", "--calib-len", "16", "--out", tmp_path / "v",
                                         "--dry-run", "--json"])
    assert g["size_bytes"] == dry["size_bytes"] and 0 < g["seconds"] <= 2 * g_wall and not (tmp_path / "v").exists()
    plan = tmp_path / "plan.json"
    p = _json_out(capsys, ["plan", tiny, *calib, "--sensitivity", sens, "--budget", f"{dry['size_bytes']}B",
                           "--out", plan, "--json"])
    assert p["size_bytes"] <= dry["size_bytes"]
    pd = _json_out(capsys, ["plan", tiny, *calib, "--sensitivity", sens, "--budget", f"{dry['size_bytes']}B",
                            "--out", tmp_path / "dry.json", "--dry-run", "--json"])
    assert pd["size_bytes"] == p["size_bytes"] and pd["estimate"]["size_bytes"] == p["size_bytes"]
    assert not (tmp_path / "dry.json").exists()
    q = _json_out(capsys, ["quantize", tiny, "--plan", plan, "--out", tmp_path / "planned", "--json"])
    assert (tmp_path / "planned" / "model.safetensors").stat().st_size == p["size_bytes"] == q["size_bytes"]
    run_error(capsys, ["plan", tiny, *calib, "--sensitivity", sens, "--budget", "1kB", "--out", tmp_path / "x.json"],
              "below the smallest size")
    assert not (tmp_path / "x.json").exists()
    run_error(capsys, ["quantize", tiny, "--out", tmp_path / "y"], "--scheme")
