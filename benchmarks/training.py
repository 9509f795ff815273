"""Training with quantization on SmolLM2: QAT vs PTQ round-to-nearest, QLoRA with fp32 AdamW
vs the 8-bit AdamW, and peft loading our adapter.

Each training run is its own `quantkit qat` / `quantkit finetune` process (so its peak RSS is
its own); training uses the calibration part of the text (the WikiText file's last-quarter
articles), perplexities are measured on the first --tokens tokens of its evaluation part,
all on the same windows. Prints the tables and writes them to docs/benchmarks.md.

    python benchmarks/training.py [--text ../shared/data/wikitext-2-raw/wiki.test.raw] [--qat-steps 60] [--lora-steps 60]
    python benchmarks/training.py --merge-from OUT/adapter     # only the merge measurement, for a saved adapter
"""
from __future__ import annotations

import argparse
import tempfile

import torch

import quantkit as qk
from quantkit.data import eval_windows
from quantkit.evaluate.quality import score

from _common import WIKI, run_cli, write_section


def mean_tail(xs, n=10):
    tail = xs[-n:]
    return sum(tail) / len(tail)


def peft_check(model, adapter_dir: str, windows) -> float:
    """max |logit difference| between our QLoRA model with the saved adapter and peft's
    PeftModel over the dequantized base, on one evaluation window."""
    from peft import PeftModel

    from quantkit.train import dequantized_model, load_adapter, prepare_qlora

    ours = load_adapter(prepare_qlora(model), adapter_dir).eval()
    theirs = PeftModel.from_pretrained(dequantized_model(ours), adapter_dir).eval()
    x = windows[:1]
    with torch.no_grad():
        return float((ours(x).logits - theirs(x).logits).abs().max())


def fp32_finetune(a, model, tok, windows) -> dict:
    """The same training run as `quantkit qat` (its defaults), on the float model itself (in
    place): how much of QAT's gain is adaptation to the text rather than recovered error."""
    from quantkit.data import tokenize
    from quantkit.train import TrainConfig, train

    ids = tokenize(tok, qk.text(a.text, "calib"))
    torch.manual_seed(0)
    s = train(model, ids, TrainConfig(steps=a.qat_steps, lr=2e-5), progress=False)
    return {"ppl": score(model, windows, progress=False)["perplexity"],
            "rtn": score(qk.quantize(model, a.qat_scheme, progress=False), windows, progress=False)["perplexity"],
            "minutes": s["seconds"] / 60}


def merge_check(model, adapter_dir: str, windows, schemes=("nf4-b64-dq", "int8")) -> dict:
    """Held-out perplexity of the QLoRA model with its adapter, and after merging the adapter
    into the weights re-quantized with each scheme."""
    import copy

    from quantkit.train import load_adapter, merge, prepare_qlora

    ours = load_adapter(prepare_qlora(model), adapter_dir).eval()
    out = {"adapter": score(ours, windows, progress=False)["perplexity"]}
    for sc in schemes:
        out[sc] = score(merge(copy.deepcopy(ours), sc), windows, progress=False)["perplexity"]
    return out


def merge_table(m: dict) -> str:
    return ("Merging the adapter into the weights (`--merge`, `--merge-scheme`), held-out perplexity: "
            + ", ".join([f"with the adapter {m['adapter']:.3f}"] + [f"merged into {k} {v:.3f}" for k, v in m.items()
                                                                    if k != "adapter"])
            + ".")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--tokens", type=int, default=8192, help="held-out evaluation tokens")
    ap.add_argument("--qat-scheme", default="int4-g128")
    ap.add_argument("--qat-steps", type=int, default=60)
    ap.add_argument("--lora-steps", type=int, default=60)
    ap.add_argument("--merge-from", help="instead: measure merging this saved adapter (finetune's OUT/adapter)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    model, tok = qk.load(a.model)
    windows = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=a.tokens)
    if a.merge_from:
        body = merge_table(merge_check(model, a.merge_from, windows))
        print(body)
        if not a.no_write:
            write_section("training-merge", "QLoRA: merging the adapter", body)
        return
    ppl = {"fp32": score(model, windows, progress=False)["perplexity"]}
    ppl["rtn"] = score(qk.quantize(model, a.qat_scheme, progress=False), windows, progress=False)["perplexity"]
    common = ["--text", a.text, "--eval-tokens", str(a.tokens)]
    with tempfile.TemporaryDirectory(prefix="qk-train-bench-") as d:
        qat = run_cli(["qat", a.model, "--scheme", a.qat_scheme, "--steps", str(a.qat_steps), "--out", f"{d}/qat", *common])
        lora = {opt: run_cli(["finetune", a.model, "--optimizer", opt, "--steps", str(a.lora_steps),
                              "--out", f"{d}/lora-{opt}", *common] + (["--merge"] if opt == "adamw" else []))
                for opt in ("adamw", "adamw8bit")}
        peft_diff = peft_check(model, lora["adamw8bit"]["adapter"], windows)
        merged = merge_table(merge_check(model, lora["adamw"]["adapter"], windows))
    ft = fp32_finetune(a, model, tok, windows)  # last: trains `model` in place

    gap = ppl["rtn"] - ppl["fp32"]
    qat_rows = [
        f"| fp32 | - | {ppl['fp32']:.3f} | - | - | - |",
        f"| {a.qat_scheme} | PTQ round-to-nearest | {ppl['rtn']:.3f} | - | - | - |",
        f"| {a.qat_scheme} | QAT, {a.qat_steps} steps x 4 x 256 tokens | {qat['held_out_perplexity']:.3f} | "
        f"{(ppl['rtn'] - qat['held_out_perplexity']) / gap * 100:.0f}% | {qat['seconds'] / 60:.1f} | "
        f"{qat['peak_rss_bytes'] / 1e9:.2f} |",
        f"| fp32 | the same training, no quantization | {ft['ppl']:.3f} | - | {ft['minutes']:.1f} | - |",
        f"| {a.qat_scheme} | that fine-tuned fp32 model, then RTN | {ft['rtn']:.3f} | - | - | - |",
    ]
    d = qat["convert_max_logit_diff"]
    base = lora["adamw"]
    lora_rows = []
    for opt, r in lora.items():
        lora_rows.append(
            f"| {opt} | {r['held_out_perplexity_before']:.3f} | {r['held_out_perplexity_after']:.3f} | "
            f"{r['losses'][-1]:.4f} | {mean_tail(r['losses']):.4f} | {r['trainable_params']:,} | "
            f"{r['optimizer_state_bytes'] / 1e6:.2f} ({r['optimizer_state_bytes'] / base['optimizer_state_bytes'] * 100:.1f}%) | "
            f"{r['seconds'] / 60:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} |")
    loss_gap = (mean_tail(lora["adamw8bit"]["losses"]) - mean_tail(base["losses"])) / mean_tail(base["losses"]) * 100
    body = "\n".join([
        f"Held-out perplexity on the first {windows.numel()} tokens of the evaluation part (ctx 512); training on "
        f"the calibration part (last-quarter articles). Training on WikiText also adapts the model to the domain, so "
        f"part of any gain is domain adaptation, not only recovered quantization error: the fp32 rows below train the "
        f"float model the same way.",
        "",
        "QAT (`quantkit qat`, lr 2e-5 cosine, AdamW, all weights trained, head bf16 after convert):",
        "",
        "| scheme | method | perplexity | RTN gap closed | minutes | peak RSS GB |",
        "|---|---|---:|---:|---:|---:|",
        *qat_rows,
        "",
        f"Converted model vs fake-quantized model, max |logit diff| on one window: {d['reference_kernel']:.2e} "
        f"(float reference kernel), {d['fast_kernels']:.2e} (fast kernels: bf16 activations, bf16 head).",
        "",
        f"QLoRA (`quantkit finetune`: nf4-b64-dq base, r 8, alpha 32, dropout 0.05, q_proj+v_proj, lr 2e-4 cosine, "
        f"{a.lora_steps} steps x 4 x 256 tokens, same seed and batches for both optimizers):",
        "",
        "| optimizer | held-out ppl before | after | final loss | mean loss, last 10 steps | trainable params | "
        "optimizer state MB (vs fp32 AdamW) | minutes | peak RSS GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *lora_rows,
        "",
        f"8-bit AdamW vs fp32 AdamW, mean loss of the last 10 steps: {loss_gap:+.2f}%. "
        f"peft `PeftModel.from_pretrained` on the dequantized base vs our model with the same adapter, "
        f"max |logit diff|: {peft_diff:.2e}.",
        "",
        merged,
    ])
    print(body)
    if not a.no_write:
        write_section("training", "Training with quantization: QAT, QLoRA, 8-bit AdamW",
                      body)


if __name__ == "__main__":
    main()
