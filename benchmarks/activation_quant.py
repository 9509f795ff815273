"""Activation quantization on SmolLM2: every calibration method, with and without SmoothQuant.

One row per variant: fp32, int8 weight-only (for reference), w8a8-dynamic (per-token scales at
run time, also with SmoothQuant alpha 0.5), and w8a8-static with each observer (minmax, ema,
entropy, mse, percentile), each also with SmoothQuant (alpha chosen per layer group, "auto"),
the affine (-asym) variants of minmax and ema with SmoothQuant, and minmax and ema with 32
float input channels per layer (-o32) and SmoothQuant. An observer name may carry the
scheme's suffixes (`minmax-o32`, `ema-asym`).
Quality: perplexity, KL divergence and top-1 agreement against fp32 on the first --tokens tokens of the evaluation text (windows of 512).
Calibration: --calib-samples x 512 tokens drawn from the text's last-quarter articles, the
same samples for every variant. Speed: prefill tokens/s of one forward at batch 1 x 512 and
batch 8 x 512 (logits at every position, as evaluation computes them), batch 8 x 512 to the
first token (only the last position's logits, as generate's prefill), and greedy decode
tokens/s at batch 1 (--decode-tokens steps), rounds interleaved over the variants (each
keeps its best round), so a slow phase of the machine hits all of them alike. The notes
name the int8 GEMM backend the w8a8 rows ran on. Prints the table, names the winner, and writes
it to docs/benchmarks.md.

    python benchmarks/activation_quant.py [--tokens 8192] [--calib-samples 32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import gc
import logging
import time

import torch

import quantkit as qk
from quantkit.data import calib_samples, eval_windows
from quantkit.evaluate.quality import ReferenceCache, score
from quantkit.evaluate.speed import decode_speed, prefill_speed
from quantkit.kernels.cpu import int8_backend
from quantkit.scheme import ACT_OBSERVERS

from _common import WIKI, write_section


def variants(observers, smoothed):
    out = [("fp32", None, None), ("int8 (weights only)", "int8", None), ("w8a8-dynamic", "w8a8-dynamic", None),
           ("w8a8-dynamic + SmoothQuant 0.5", "w8a8-dynamic", 0.5)]
    for smooth, names in ((None, observers), ("auto", smoothed)):
        for o in names:
            label = f"w8a8-static-{o}" + (" + SmoothQuant auto" if smooth else "")
            out.append((label, f"w8a8-static-{o}", smooth))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--observers", default=",".join(ACT_OBSERVERS), help="static rows without SmoothQuant")
    ap.add_argument("--smoothed", default=",".join(ACT_OBSERVERS) + ",minmax-asym,ema-asym,minmax-o32,ema-o32",
                    help="static rows with SmoothQuant auto (an -asym suffix: affine activations)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved prefill/decode timing rounds")
    ap.add_argument("--decode-tokens", type=int, default=32, help="greedy decode steps timed per round")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model, tok = qk.load(a.model)
    windows = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=a.tokens)
    calib = calib_samples(tok, qk.text(a.text, split="calib"), a.calib_samples, 512, 0)
    ref = ReferenceCache(model, windows, progress=False)
    g = torch.Generator().manual_seed(0)
    batch1 = torch.randint(0, len(tok), (1, 512), generator=g)
    batch8 = torch.randint(0, len(tok), (8, 512), generator=g)
    prompt = batch1[:, :16]
    rows, models = {}, {}
    for label, scheme, smooth in variants(a.observers.split(","), a.smoothed.split(",")):
        t0 = time.perf_counter()
        m = model if scheme is None else qk.quantize(model, scheme, calib=calib, transforms=[qk.SmoothQuant(smooth)] if smooth else (), progress=False)
        secs = time.perf_counter() - t0
        res = score(m, windows, reference=ref, progress=False)
        rows[label] = {"ppl": res["perplexity"], "kld": res.get("kl_divergence", 0.0),
                       "top1": res.get("top1_agreement", 1.0), "secs": None if scheme is None else secs,
                       "p1": 0.0, "p8": 0.0, "pf": 0.0, "dec": 0.0}
        models[label] = m
        print(f"{label}: ppl {res['perplexity']:.3f} kld {rows[label]['kld']:.4f} ({secs:.0f} s)", flush=True)
        gc.collect()
    for r in range(a.rounds):
        for label, m in models.items():
            rows[label]["p1"] = max(rows[label]["p1"], prefill_speed(m, batch1, warmup=1, repeats=1))
            rows[label]["p8"] = max(rows[label]["p8"], prefill_speed(m, batch8, warmup=0, repeats=1))
            rows[label]["pf"] = max(rows[label]["pf"], prefill_speed(m, batch8, warmup=0, repeats=1, last_logits=True))
            rows[label]["dec"] = max(rows[label]["dec"], decode_speed(m, prompt, new_tokens=a.decode_tokens,
                                                                      warmup=4)["decode_tokens_per_s"])
        print(f"timing round {r + 1}/{a.rounds} done", flush=True)
    base, w_only = rows["fp32"], rows.get("int8 (weights only)")
    lines = ["| variant | perplexity | Δ vs fp32 | KLD | top-1 | prefill tok/s, 1 x 512 | ×fp32 "
             "| prefill tok/s, 8 x 512 | ×fp32 | 8 x 512 to first token, tok/s | ×fp32 | decode tok/s | ×int8 weight-only "
             "| quantize s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        secs = "–" if r["secs"] is None else f"{r['secs']:.0f}"
        vs_w = "–" if w_only is None else f"{r['dec'] / w_only['dec']:.2f}"
        lines.append(f"| {label} | {r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f}% | {r['kld']:.4f} | "
                     f"{100 * r['top1']:.2f}% | {r['p1']:.0f} | {r['p1'] / base['p1']:.2f} | {r['p8']:.0f} | "
                     f"{r['p8'] / base['p8']:.2f} | {r['pf']:.0f} | {r['pf'] / base['pf']:.2f} | {r['dec']:.1f} | "
                     f"{vs_w} | {secs} |")
    static = {k: v for k, v in rows.items() if k.startswith("w8a8-static") and "Smooth" not in k}
    smooth = {k: v for k, v in rows.items() if k.startswith("w8a8-static") and "Smooth" in k}
    best = min({**static, **smooth}.items(), key=lambda kv: kv[1]["ppl"])
    worst = max(static.items(), key=lambda kv: kv[1]["ppl"])
    worst_s = smooth.get(worst[0] + " + SmoothQuant auto")
    notes = [f"Best static method: **{best[0]}**, perplexity {best[1]['ppl']:.3f} "
             f"({100 * (best[1]['ppl'] / base['ppl'] - 1):+.2f}% vs fp32); it beats the runner-up static row by "
             f"{sorted(r['ppl'] for r in {**static, **smooth}.values())[1] - best[1]['ppl']:.3f} perplexity."]
    notes.append(f"{best[0]} vs fp32: prefill 8 x 512 {best[1]['p8'] / base['p8']:.2f}× (all logits), "
                 f"{best[1]['pf'] / base['pf']:.2f}× (to first token)"
                 + ("" if w_only is None else f"; decode {best[1]['dec'] / w_only['dec']:.2f}× int8 weight-only")
                 + f". int8 GEMM backend of the w8a8 rows: **{int8_backend()}**.")
    if worst_s is not None:
        notes.append(f"Worst method without SmoothQuant: {worst[0]} ({worst[1]['ppl']:.3f}); with SmoothQuant "
                     f"{worst_s['ppl']:.3f} ({100 * (worst_s['ppl'] / worst[1]['ppl'] - 1):+.1f}%).")
    body = "\n".join(lines) + "\n\n" + "\n".join(notes)
    print(body)
    if not a.no_write:
        write_section("activation-quant", f"w8a8 activation quantization ({a.model}, first {a.tokens} tokens of the "
                                          f"evaluation text, calibration {a.calib_samples} x 512 tokens from its last "
                                          f"quarter)", body, per_cpu=True)


if __name__ == "__main__":
    main()
