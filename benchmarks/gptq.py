"""GPTQ vs round-to-nearest on SmolLM2: perplexity, gap closed, time and peak memory.

Each quantization runs as its own `quantkit quantize` process (so its peak RSS is its own),
with and without streaming (--offload-dir); then every output is evaluated in this process
on the same windows against the same fp32 reference. Prints the table and writes it to
docs/benchmarks.md.

    python benchmarks/gptq.py [--text ../shared/data/wikitext-2-raw/wiki.test.raw] [--tokens 8192]
                              [--stream-batch-size 4]
"""
from __future__ import annotations

import argparse
import tempfile

import quantkit as qk
from quantkit.data import eval_windows
from quantkit.evaluate.quality import ReferenceCache, score

from _common import WIKI, run_cli, write_section


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--schemes", default="int4-g128,int3-g128")
    ap.add_argument("--stream-batch-size", type=int, default=4,
                    help="also stream the first scheme with this many samples per forward (0: skip)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    model, tok = qk.load(a.model)
    windows = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=a.tokens)
    ref = ReferenceCache(model, windows)
    rows = [("fp32", "-", ref.perplexity, None, None, None, None)]
    with tempfile.TemporaryDirectory(prefix="qk-gptq-bench-") as d:
        for scheme in a.schemes.split(","):
            base = None
            runs = [("rtn", []), ("gptq", [])]
            if scheme == a.schemes.split(",")[0]:  # streaming once: same bytes, other memory profile
                runs.append(("gptq", ["--offload-dir", f"{d}/offload"]))
                if a.stream_batch_size:  # and with smaller calibration forwards (less memory, other bytes)
                    runs.append(("gptq", ["--offload-dir", f"{d}/offload", "--batch-size", str(a.stream_batch_size)]))
            for method, extra in runs:
                out = f"{d}/{scheme}-{method}{'-stream' if extra else ''}{len(extra)}"
                calib = ["--calib", a.text, "--calib-samples", str(a.samples)] if method == "gptq" else []
                s = run_cli(["quantize", a.model, "--scheme", scheme, "--method", method, "--out", out, *calib, *extra])
                m2, _ = qk.load(out)
                ppl = score(m2, windows, reference=ref, progress=False)["perplexity"]
                if method == "rtn":
                    base = ppl
                closed = None if method == "rtn" else 100 * (base - ppl) / (base - ref.perplexity)
                label = method + (" (streaming)" if len(extra) == 2 else "") + \
                    (f" (streaming, --batch-size {extra[3]})" if len(extra) == 4 else "")
                rows.append((scheme, label, ppl, closed, s["quantize_seconds"], s["peak_rss_bytes"],
                             s["peak_rss_bytes"] - s["baseline_rss_bytes"]))
                print(rows[-1], flush=True)
                del m2
    lines = ["| scheme | method | perplexity | gap to fp32 closed | quantize time s | peak RSS MB | peak RSS above start MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    for scheme, method, ppl, closed, secs, rss, drss in rows:
        lines.append(f"| {scheme} | {method} | {ppl:.3f} | {f(closed, '.1f') + ('%' if closed is not None else '')} | "
                     f"{f(secs, '.0f')} | {f(rss and rss / 1e6, '.0f')} | {f(drss and drss / 1e6, '.0f')} |")
    table = "\n".join(lines)
    print(table)
    if not a.no_write:
        write_section("gptq", f"GPTQ vs RTN ({a.model}, first {a.tokens} tokens of the evaluation text, "
                              f"calibration {a.samples} x 512 tokens from its last quarter)", table)


if __name__ == "__main__":
    main()
