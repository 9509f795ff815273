"""rtn vs rtn-mse perplexity on SmolLM2 (first 4096 tokens of the WikiText-2 test file, ctx 512).

    python benchmarks/rtn_mse.py [--text ../shared/data/wikitext-2-raw/wiki.test.raw]

Prints one line per (scheme, method). Quality only: nothing here is timed.
"""
import argparse

import quantkit as qk
from quantkit.data import eval_windows, text
from quantkit.evaluate.quality import score

p = argparse.ArgumentParser()
p.add_argument("--text", default="../shared/data/wikitext-2-raw/wiki.test.raw")
p.add_argument("--max-tokens", type=int, default=4096)
a = p.parse_args()
model, tok = qk.load("smollm2")
w = eval_windows(tok, text(a.text), ctx=512, max_tokens=a.max_tokens)
print("fp32", score(model, w, progress=False)["perplexity"], flush=True)
for s in ("int4-g128", "int3-g128"):
    for m in ("rtn", "rtn-mse"):
        q = qk.quantize(model, s, method=m, progress=False)
        print(s, m, score(q, w, progress=False)["perplexity"], flush=True)
