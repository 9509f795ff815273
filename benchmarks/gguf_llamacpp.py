"""quantkit's GGUF files vs llama.cpp's own quantizer, measured by llama.cpp on the same tokens.

Needs the peer: `bash benchmarks/setup_llamacpp.sh` (llama-cpp-python, built from source).

1. The model is written as an F16 GGUF by quantkit. That file is the common source: llama.cpp's
   quantizer (`llama_model_quantize`) makes its files from it, and quantkit re-loads it and
   exports its own files from the same F16 values.
2. Every file is loaded by llama.cpp, which computes the perplexity over the same token ids
   (non-overlapping windows of 512, the tokens quantkit's tokenizer makes of the text), the KL
   divergence and top-1 agreement against the F16 file's next-token distributions (all from
   llama.cpp's logits), and greedily continues one prompt.
3. For the types in --gptq-types, quantkit also solves GPTQ onto the file's block grids
   (calibration: --calib-samples x 512 tokens from the last quarter of the text, never the
   evaluated part) and writes an ordinary GGUF of the same types and size.
4. For Q8_0, quantkit's own evaluator scores the same file (dequantized by transformers), to
   check that both runtimes agree on what the file holds.

    python benchmarks/gguf_llamacpp.py [--types Q8_0,Q4_0,Q4_K_M] [--gptq-types Q4_0,Q4_K_M] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import ctypes
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import quantkit as qk
from quantkit.data import eval_windows
from quantkit.evaluate.quality import score
from quantkit.io.ggml_mix import FTYPES
from quantkit.io.gguf import export_gguf

from _common import WIKI, write_section

PROMPT = "The history of the city of Paris"
DEFAULT_TYPES = "Q8_0,Q6_K,Q5_K_M,Q5_1,Q5_0,Q4_K_M,Q4_K_S,Q4_1,Q4_0,Q3_K_M,Q2_K"


def llama_quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = torch.get_num_threads()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype} (code {rc})")


def llama_eval(path: Path, windows: torch.Tensor, ref: list | None = None):
    """(perplexity, KLD vs `ref`, top-1 agreement vs `ref`, greedy continuation of PROMPT, log-probs),
    all computed from llama.cpp's logits. `ref` is the log-probs list an earlier call returned
    (the F16 file's); the log-probs are float16 [ctx-1, vocab] per window, kept for that use."""
    from llama_cpp import Llama

    ctx = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False,
                n_threads=torch.get_num_threads())
    nll, n, kld, agree = 0.0, 0, 0.0, 0
    logps = []
    for k, w in enumerate(windows.tolist()):
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(np.asarray(llm.scores[: len(w) - 1]), dtype=torch.float32)  # [ctx-1, vocab]
        logp = torch.log_softmax(logits, dim=-1)
        nll -= float(logp[torch.arange(len(w) - 1), torch.tensor(w[1:])].double().sum())
        n += len(w) - 1
        if ref is not None:
            r = ref[k].float()
            kld += float((r.exp() * (r - logp)).sum(-1).double().sum())
            agree += int((r.argmax(-1) == logp.argmax(-1)).sum())
        logps.append(logp.half())
    llm.reset()
    text = llm.create_completion(PROMPT, max_tokens=24, temperature=0.0)["choices"][0]["text"]
    del llm
    kl = None if ref is None else kld / n
    top1 = None if ref is None else agree / n
    return float(np.exp(nll / n)), kl, top1, text.replace("\n", " ").strip(), logps


def types_of(path: Path) -> str:
    import gguf

    c = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)
    return " ".join(f"{k}:{v}" for k, v in sorted(c.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--gptq-types", default="Q4_0,Q4_K_M", help="types also written with GPTQ ('' for none)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    model, tok = qk.load(a.model)
    windows = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=a.tokens)
    calib = qk.text(a.text, split="calib")
    gptq_types = [t for t in a.gptq_types.split(",") if t]
    rows, gens, agree = [], [], ""
    with tempfile.TemporaryDirectory(prefix="qk-gguf-bench-") as d:
        d = Path(d)
        f16 = d / "f16.gguf"
        export_gguf(model, tok, f16, "F16", progress=False)
        del model
        src, tok = qk.load(f16)  # the F16 values both quantizers start from
        ppl16, _, _, gen16, ref = llama_eval(f16, windows)
        rows.append(("F16", "source", "-", f16.stat().st_size, None, ppl16, None, None, None, types_of(f16)))
        gens.append(("F16", "source", gen16))
        print(rows[-1], flush=True)
        for t in a.types.split(","):
            files = []
            theirs = d / f"llamacpp-{t}.gguf"
            t0 = time.perf_counter()
            llama_quantize(f16, theirs, t)
            files.append(("llama.cpp", "llama-quantize", theirs, time.perf_counter() - t0))
            ours = d / f"quantkit-{t}.gguf"
            t0 = time.perf_counter()
            export_gguf(src, tok, ours, t, progress=False)
            files.append(("quantkit", "rtn", ours, time.perf_counter() - t0))
            if t in gptq_types:
                solved = d / f"quantkit-gptq-{t}.gguf"
                t0 = time.perf_counter()
                qk.export_gguf(src, tok, solved, t, method="gptq", calib=calib, calib_samples=a.calib_samples,
                               progress=False)
                files.append(("quantkit", "gptq", solved, time.perf_counter() - t0))
            size_ref = theirs.stat().st_size
            for who, method, p, secs in files:
                ppl, kl, top1, gen, _ = llama_eval(p, windows, ref)
                rows.append((t, who, method, p.stat().st_size, p.stat().st_size / size_ref, ppl, kl, top1, secs,
                             types_of(p)))
                print(rows[-1], flush=True)
                if who == "quantkit":
                    gens.append((t, method, gen))
            if t == "Q8_0":
                m8, _ = qk.load(ours)
                own = score(m8, windows, progress=False)["perplexity"]
                llama_q8 = next(r[5] for r in rows if r[0] == t and r[2] == "rtn")  # our file, llama.cpp's figure
                agree = f"Q8_0: quantkit's evaluator {own:.3f}, llama.cpp {llama_q8:.3f} " \
                        f"({100 * (llama_q8 - own) / own:+.2f}%)"
                print(agree, flush=True)
                del m8
    lines = ["| type | made by | method | size MB | size vs llama.cpp | perplexity | Δ vs F16 | KLD vs F16 "
             "| top-1 vs F16 | quantize s | tensor types |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    dash = "–"
    for t, who, method, size, rel, ppl, kl, top1, secs, types in rows:
        lines.append(f"| {t} | {who} | {method} | {size / 1e6:.1f} | {dash if rel is None else f'{rel:.3f}'} | "
                     f"{ppl:.3f} | {100 * (ppl - ppl16) / ppl16:+.2f}% | {dash if kl is None else f'{kl:.5f}'} | "
                     f"{dash if top1 is None else f'{100 * top1:.2f}%'} | {dash if secs is None else f'{secs:.0f}'} "
                     f"| {types} |")
    table = "\n".join(lines)
    gen_lines = ["| file (quantkit) | method | llama.cpp's greedy continuation of \"" + PROMPT + "\" |",
                 "|---|---|---|"]
    gen_lines += [f"| {t} | {m} | {g.replace('|', '/')} |" for t, m, g in gens]
    body = table + "\n\n" + agree + "\n\n" + "\n".join(gen_lines)
    print(body)
    if not a.no_write:
        write_section("gguf-llamacpp", f"GGUF files by quantkit and by llama.cpp's quantizer ({a.model}, first "
                                       f"{a.tokens} tokens of the evaluation text, perplexity computed by llama.cpp)",
                      body)


if __name__ == "__main__":
    main()
