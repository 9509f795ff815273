"""Perplexity through the kernels each scheme runs against the exact dequantized reference.

For every scheme, one quantized SmolLM2 is evaluated twice on the same windows: through the
kernels quantkit picks (the native weight-only kernels where they are built) and with every
quantized layer on `kernel="dequant"` (F.linear with the weight the codec dequantizes, fp32).
The default path is meant to be exact: the two perplexities should agree to fp32 rounding.
Prints the table and writes it to docs/benchmarks.md.

    python benchmarks/kernel_exactness.py [--model smollm2] [--max-tokens 8192] [--schemes ...]
"""
from __future__ import annotations

import argparse
import logging

import torch

import quantkit as qk
from quantkit.data import eval_windows
from quantkit.evaluate.quality import score
from quantkit.modules import set_module
from quantkit.nn import QuantEmbedding, QuantLinear

from _common import WIKI, write_section

SCHEMES = "int8,int4-g128,int4-g32,int3-g128,int2-g64,nf4-b64-dq,fp4-b64-dq,fp8-e4m3,gguf-q4_0,gguf-q4_k"


def on_dequant_kernel(model):
    """The same stored weights, every quantized layer on the dequantize-then-F.linear kernel."""
    inner = {id(m.linear) for m in model.modules() if isinstance(m, QuantEmbedding)}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and id(mod) not in inner:
            set_module(model, name, QuantLinear(mod.quantized_weight(), mod.bias, kernel="dequant"))
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    model, tok = qk.load(a.model)
    windows = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=a.max_tokens)
    lines = ["| scheme | kernels | perplexity (kernels) | perplexity (exact dequantized) | difference |",
             "|---|---|---:|---:|---:|"]
    for s in a.schemes.split(","):
        qm = qk.quantize(model, s, progress=False)
        kernels = sorted({m.kernel.name for m in qm.modules() if isinstance(m, QuantLinear)})
        with torch.inference_mode():
            fast = score(qm, windows, progress=False)["perplexity"]
            exact = score(on_dequant_kernel(qm), windows, progress=False)["perplexity"]
        diff = (fast - exact) / exact
        lines.append(f"| {s} | {', '.join(kernels)} | {fast:.4f} | {exact:.4f} | {diff * 100:+.5f}% |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        write_section("kernel-exactness", f"Perplexity through the kernels vs the exact dequantized weight "
                                          f"({a.model}, first {a.max_tokens} tokens)", table, per_cpu=True)


if __name__ == "__main__":
    main()
