"""Decode speed at batch 1: quantized schemes vs fp32, measured side by side in one run.

Every model decodes the same prompt for the same number of tokens (greedy, KV cache, no
early stop). Rounds go fp32, A, B, ... and repeat, and each model keeps its best round, so
slow phases of the machine hit every model alike. Prints the table and writes it to
docs/benchmarks.md.

    python benchmarks/decode_speed.py [--model smollm2] [--tokens 64] [--rounds 5]
                                      [--compile] [--variants fp32,int8,int4-g128] [--section NAME]

The w8a8 rows quantize activations too; the static one is calibrated on --calib-samples x 512
tokens from the last quarter of --text (decode speed does not depend on how good the ranges
are, so the default is a small sample).

--compile runs every model's decode steps through torch.compile with a StaticCache
(evaluate.speed.decode_speed(compile=True)), fp32 included: transformers' per-layer Python
overhead, paid by every model alike, goes away, and what remains is the matmuls.

--isa avx2 forces the AVX2 path of quantkit's native kernels on an AVX-512 host (QUANTKIT_ISA);
--prefill also times a 1 x 512 prompt to its first token (logits of the last position only),
best of 3, after the decode rounds.

Rows ending in "+ int8 act" run quantkit's int8-activation option (quantkit.set_activations:
each layer's input quantized per block to int8 at decode, integer multiply; prefill-sized calls
stay exact). Its cost is in the same table: perplexity and KLD vs fp32 on the first --quality
windows of 512 tokens, computed after the timing, the int8-activation rows through that path on
every row (each row is quantized on its own: the numerics of decoding the window).
"""
from __future__ import annotations

import argparse
import gc
import logging

import torch

import quantkit as qk
from quantkit.data import calib_samples
from quantkit.evaluate.run import weights_bytes
from quantkit.evaluate.size import memory_bytes
from quantkit.evaluate.speed import decode_speed, prefill_speed
from quantkit.nn import QuantLinear

from _common import WIKI, write_section

VARIANTS = [  # (label, scheme, head, SmoothQuant); a label ending in A8 runs with int8 activations
    ("fp32", None, None, None),
    ("bf16", "bf16", None, None),
    ("int8", "int8", None, None),
    ("int8 (head int8)", "int8", "int8", None),
    ("int4-g128", "int4-g128", None, None),
    ("int4-g128 (head int8)", "int4-g128", "int8", None),
    ("int4-g32", "int4-g32", None, None),
    ("int3-g128", "int3-g128", None, None),
    ("int2-g64", "int2-g64", None, None),
    ("nf4-dq", "nf4-b64-dq", None, None),
    ("nf4-dq (head int8)", "nf4-b64-dq", "int8", None),
    ("fp4-dq", "fp4-b64-dq", None, None),
    ("fp8-e4m3", "fp8-e4m3", None, None),
    ("gguf-q4_0", "gguf-q4_0", None, None),
    ("gguf-q4_k", "gguf-q4_k", None, None),
    ("gguf-iq4_nl", "gguf-iq4_nl", None, None),  # widths of 576 fall back to Q5_0, as llama.cpp's Q4_K_M does
    ("w8a8-dynamic", "w8a8-dynamic", None, None),
    ("w8a8-static-minmax-o32 + SmoothQuant auto", "w8a8-static-minmax-o32", None, "auto"),
]
A8 = " + int8 act"  # the int8-activation option of the native kernels (quantkit.set_activations)
VARIANTS += [(label + A8, scheme, head, None) for label, scheme, head, _ in VARIANTS
             if label in ("int8 (head int8)", "int4-g128 (head int8)", "int4-g32", "nf4-dq (head int8)", "gguf-q4_0")]
PROMPT = "The history of the city begins"


def kernels_of(model) -> str:
    """The kernels a model's quantized layers run, most used first ("native", "int4pack x 180, ...")."""
    from collections import Counter

    c = Counter(m.kernel.name for m in model.modules() if isinstance(m, QuantLinear))
    if not c:
        return "torch"
    return ", ".join(k if len(c) == 1 else f"{k} x {n}" for k, n in c.most_common())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile every model's decode steps (StaticCache)")
    ap.add_argument("--variants", default=None, help="comma-separated labels to run (default: all); fp32 always runs")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    ap.add_argument("--section", default=None, help="docs/benchmarks.md section to write (default: decode-speed, "
                                                     "or decode-speed-compiled with --compile)")
    ap.add_argument("--text", default=str(WIKI), help="calibration text of the static w8a8 row")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--isa", choices=["auto", "avx2", "avx512"], default="auto",
                    help="the ISA quantkit's native kernels run (QUANTKIT_ISA)")
    ap.add_argument("--prefill", action="store_true", help="also time a 1 x 512 prompt to its first token")
    ap.add_argument("--quality", type=int, default=4, metavar="N",
                    help="perplexity and KLD vs fp32 on the first N x 512 tokens of --text, after the timing "
                         "(int8-activation rows through that path on every row; 0: skip)")
    a = ap.parse_args()
    import os

    os.environ["QUANTKIT_ISA"] = a.isa
    keep = None if a.variants is None else {"fp32", *a.variants.split(",")}
    unknown = set() if keep is None else keep - {v[0] for v in VARIANTS}
    if unknown:
        ap.error(f"unknown --variants {sorted(unknown)}; the labels are: {', '.join(repr(v[0]) for v in VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)
    model, tok = qk.load(a.model)
    ids = tok(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    models = {}
    calib = None
    for label, scheme, head, smooth in VARIANTS:
        if keep is None or label in keep:
            if scheme is not None and scheme.startswith("w8a8-static") and calib is None:
                calib = calib_samples(tok, qk.text(a.text, split="calib"), a.calib_samples, 512, 0)
            models[label] = model if scheme is None else qk.quantize(model, scheme, head=head, progress=False,
                                                                       calib=calib, transforms=[qk.SmoothQuant(smooth)] if smooth is not None else ())
            if label.endswith(A8):
                qk.set_activations(models[label], "int8")
    gc.collect()
    best = {k: 0.0 for k in models}
    for r in range(a.rounds):
        for label, m in models.items():
            tps = decode_speed(m, ids, new_tokens=a.tokens, compile=a.compile)["decode_tokens_per_s"]
            best[label] = max(best[label], tps)
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()), flush=True)
    pre = {}
    if a.prefill:
        from quantkit.data import eval_windows

        long_ids = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=512)[0][None]
        for _ in range(2):  # alternating rounds, best of each
            for label, m in models.items():
                pre[label] = max(pre.get(label, 0.0), prefill_speed(m, long_ids, warmup=1, repeats=2, last_logits=True))
        print("prefill 1x512: " + ", ".join(f"{k} {v:.0f}" for k, v in pre.items()), flush=True)
    qual = {}
    if a.quality:
        from quantkit.data import eval_windows
        from quantkit.evaluate.quality import ReferenceCache, score

        wins = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=512 * a.quality)
        ref = ReferenceCache(model, wins, progress=False)
        for label, m in models.items():
            if label.endswith(A8):  # every row on int8 activations: the numerics of decoding the window
                qk.set_activations(m, "int8-all")
            r = score(m, wins, reference=ref, progress=False)
            if label.endswith(A8):
                qk.set_activations(m, "int8")
            qual[label] = (r["perplexity"], r["kl_divergence"])
        print(f"quality on {wins.numel()} tokens: " + ", ".join(f"{k} {p:.3f}/{d:.5f}" for k, (p, d) in qual.items()))
    base = best["fp32"]
    cols = "| variant | embeddings/head | kernel | weights MB | memory MB | decode tok/s | speed-up vs fp32 |"
    lines = [cols + (" prefill 1x512 tok/s | prefill vs fp32 |" if pre else "") + (" perplexity | KLD vs fp32 |" if qual else ""),
             "|---|---|---|---:|---:|---:|---:|" + ("---:|---:|" if pre else "") + ("---:|---:|" if qual else "")]
    for label, m in models.items():
        head = m.quantkit.head.get("scheme") if hasattr(m, "quantkit") else "fp32"
        lines.append(f"| {label} | {head} | {kernels_of(m)} | {weights_bytes(m) / 1e6:.1f} | {memory_bytes(m) / 1e6:.1f} | "
                     f"{best[label]:.1f} | {best[label] / base:.2f}x |"
                     + (f" {pre[label]:.0f} | {pre[label] / pre['fp32']:.2f}x |" if pre else "")
                     + (f" {qual[label][0]:.3f} | {qual[label][1]:.5f} |" if qual else ""))
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        how = ", decode steps through torch.compile with a StaticCache" if a.compile else ""
        how += f", native kernels' ISA forced to {a.isa}" if a.isa != "auto" else ""
        how += f"; quality on the first {a.quality} x 512 tokens of WikiText-2 test" if qual else ""
        write_section(a.section or ("decode-speed-compiled" if a.compile else "decode-speed"),
                      f"Decode speed at batch 1 ({a.model}, {a.tokens} tokens, best of {a.rounds} interleaved rounds{how})",
                      table, per_cpu=True)


if __name__ == "__main__":
    main()
