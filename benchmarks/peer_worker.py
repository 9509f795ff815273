"""One row of benchmarks/peers.py, in its own process: build the row's quantized model, measure it, print JSON.

    python benchmarks/peer_worker.py ROW --spec SPEC.json [--save-ref]

SPEC.json (written by peers.py) names the float sources, the evaluation windows (a .pt file of
token ids [n, ctx]), the reference log-probs (a float16 .npy [n, ctx-1, vocab] memory-mapped, the
fp32 row's own, written by that row with --save-ref), the decode prompt and the timing settings.
Every row is measured by this same code, whatever library made it:

- memory: resident set after the model is built and the heap trimmed, minus the resident set just
  before building (libraries already imported);
- perplexity, KL divergence and top-1 agreement against the reference, on the same token ids;
- prefill tokens/s: one forward of the first window's tokens [1, ctx] into a fresh KV cache, best of `repeats`;
- decode tokens/s: greedy decoding with a KV cache at batch 1, ``decode_tokens`` steps timed after an
  untimed prefill, best of `repeats` after a warm-up run;
- a greedy continuation of the prompt, for the generations side by side.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_models import PeerUnavailable, Source, builder  # noqa: E402

from quantkit.memory import rss_bytes, trim_heap  # noqa: E402


def measure(row: str, spec: dict, save_ref: bool) -> dict:
    torch.set_num_threads(spec["threads"])
    src = Source(hf_dir=Path(spec["hf_dir"]), f16_gguf=Path(spec["f16_gguf"]), calib_text=Path(spec["calib"]).read_text(),
                 work=Path(spec["work"]) / row, threads=spec["threads"], budget=spec.get("budgets", {}).get(row))
    src.work.mkdir(parents=True, exist_ok=True)
    windows = torch.load(spec["windows"])
    prompt = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
    import transformers  # noqa: F401  (imported before the baseline so its size is not the model's)

    gc.collect()
    trim_heap()
    before = rss_bytes(peak=False)
    t0 = time.perf_counter()
    runner = builder(row)(src)
    build_s = time.perf_counter() - t0
    gc.collect()
    trim_heap()
    memory = rss_bytes(peak=False) - before

    n, ctx = windows.shape
    ref = None if save_ref else np.load(spec["ref"], mmap_mode="r")
    out_ref = np.lib.format.open_memmap(spec["ref"], mode="w+", dtype=np.float16, shape=(n, ctx - 1, spec["vocab"])) \
        if save_ref else None
    nll, kl, agree = 0.0, 0.0, 0
    t0 = time.perf_counter()
    for i in range(n):
        w = windows[i]
        lp = runner.log_probs(w)
        if lp.shape != (ctx - 1, spec["vocab"]):
            raise RuntimeError(f"log_probs gave shape {tuple(lp.shape)}, expected {(ctx - 1, spec['vocab'])}")
        nll -= float(lp.gather(-1, w[1:, None]).double().sum())
        if out_ref is not None:
            out_ref[i] = lp.half().numpy()
        else:
            r = torch.log_softmax(torch.from_numpy(np.asarray(ref[i])).float(), dim=-1)
            kl += float((r.exp() * (r - lp)).sum(-1).double().sum())
            agree += int((r.argmax(-1) == lp.argmax(-1)).sum())
        print(f"  window {i + 1}/{n}", file=sys.stderr, flush=True)
    if out_ref is not None:
        out_ref.flush()
    eval_s = time.perf_counter() - t0
    tokens = n * (ctx - 1)

    prefill_ids = windows[:1]
    runner.prefill(prefill_ids)  # warm-up
    prefill = min(runner.prefill(prefill_ids) for _ in range(spec.get("repeats", 3)))
    steps = spec["decode_tokens"]
    runner.decode(prompt, 8)  # warm-up
    decode = min(runner.decode(prompt, steps) for _ in range(spec.get("repeats", 3)))
    gen = runner.greedy(prompt, spec["gen_tokens"])
    return {
        "row": row, "label": runner.label, "library": runner.library, "notes": runner.notes,
        "size_bytes": int(runner.size_bytes), "memory_bytes": int(memory), "peak_rss_bytes": rss_bytes(peak=True),
        "quantize_s": runner.quantize_s, "build_s": build_s, "eval_s": eval_s, "tokens": tokens,
        "perplexity": float(np.exp(nll / tokens)),
        "kl_divergence": None if save_ref else kl / tokens,
        "top1_agreement": None if save_ref else agree / tokens,
        "prefill_tokens_per_s": prefill_ids.numel() / prefill,
        "decode_tokens_per_s": steps / decode,
        "generation_ids": [int(t) for t in gen],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("row", help="row key: a BUILDERS key of peer_models.py, or quantkit-mixed-gptq@PEER_ROW")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--save-ref", action="store_true", help="write this row's log-probs as the reference")
    ap.add_argument("--out", required=True, help="JSON result file")
    a = ap.parse_args()
    spec = json.loads(Path(a.spec).read_text())
    try:
        result = measure(a.row, spec, a.save_ref)
    except PeerUnavailable as e:
        result = {"row": a.row, "unavailable": str(e)}
    except Exception as e:  # reported as a failed row with its reason; the run goes on
        traceback.print_exc()
        result = {"row": a.row, "error": f"{type(e).__name__}: {e}"[:500]}
    Path(a.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
