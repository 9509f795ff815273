"""quantkit beside its peers on one model, one text and one machine, in one run.

    bash benchmarks/setup_peers.sh            # once: the peers in their own environment, .venv-peers
    python benchmarks/peers.py [--rows ...] [--tokens 4096] [--report reports/peers]

Every row (quantkit's schemes and each peer's) runs in its own fresh process
(benchmarks/peer_worker.py): the peers in .venv-peers, quantkit and plain torch in this
environment, both on torch 2.13.0. Each starts from the same float32 weights (SmolLM2 written as a
Hugging Face folder, or as an F16 GGUF for llama.cpp), and is measured by the same code on the same
token ids: size as the library stores it, resident memory, perplexity, KL divergence and top-1
agreement against the fp32 row's next-token distributions, prefill and decode tokens/s, and the
library's quantization time. A peer that cannot run here is listed with the reason.

Writes the table into docs/benchmarks.md (section "peers"; date, machine and command with it) and a
report (report.md + self-contained report.html + plots) into --report.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WIKI, machine, write_section  # noqa: E402

PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
PROMPT = "The history of the city of Paris"
# rows that run in this environment (quantkit itself, the float baselines, torch's own quantizer)
HERE = ("fp32", "bf16", "torch-dynamic-int8")
QUANTKIT_ROWS = ["quantkit-int8", "quantkit-int8-head-int8", "quantkit-int4-g128",
                 "quantkit-mixed-gptq@llamacpp-Q4_K_M", "quantkit-mixed-gptq@llamacpp-Q4_0"]
# more rows (--rows): bf16, torchao-int4-wo-g128 (torchao skips every Linear whose width 128 does not divide:
# only down_proj is quantized), torchao-int8-dyn, hqq-8bit-g128, bitsandbytes-int8
PEER_ROWS = ["torch-dynamic-int8", "torchao-int8-wo", "torchao-int4-wo-g64", "hqq-4bit-g64", "quanto-int8",
             "quanto-int4", "ort-int8-dynamic", "ort-int8-static", "bitsandbytes-nf4", "llamacpp-Q8_0",
             "llamacpp-Q4_K_M", "llamacpp-Q4_0"]
PY_LEVEL = ("torch", "torchao", "quanto", "optimum-quanto", "hqq")  # "Python-level" peers of the acceptance
HF_FOLDER = Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit")) / "smollm2-fp32-hf"


def sources(work: Path, tokens: int, ctx: int) -> dict:
    """The float model as a HF folder and an F16 GGUF, the evaluation windows, calibration text."""
    import torch

    import quantkit as qk
    from quantkit.data import eval_windows
    from quantkit.io.gguf import export_gguf

    from hf_load import float_folder

    hf = float_folder(HF_FOLDER)
    model, tok = qk.load("smollm2")
    f16 = work / "f16.gguf"
    export_gguf(model, tok, f16, "F16", progress=False)
    windows = eval_windows(tok, qk.text(str(WIKI)), ctx=ctx, max_tokens=tokens)
    torch.save(windows, work / "windows.pt")
    (work / "calib.txt").write_text(qk.text(str(WIKI), split="calib"))
    prompt_ids = tok(PROMPT, return_tensors="pt").input_ids[0].tolist()
    return {"hf_dir": str(hf), "f16_gguf": str(f16), "windows": str(work / "windows.pt"),
            "calib": str(work / "calib.txt"), "ref": str(work / "ref.npy"), "vocab": int(model.config.vocab_size),
            "prompt_ids": prompt_ids, "n_params": sum(p.numel() for p in model.parameters()), "tok_dir": str(hf)}


def run_row(row: str, spec_path: Path, work: Path, save_ref: bool = False) -> dict:
    py = sys.executable if (row in HERE or row.startswith("quantkit")) else str(PEER_PYTHON)
    if not Path(py).exists():
        return {"row": row, "unavailable": f"peer environment missing: run `bash benchmarks/setup_peers.sh`"}
    out = work / f"{row}.json"
    cmd = [py, str(Path(__file__).resolve().parent / "peer_worker.py"), row, "--spec", str(spec_path),
           "--out", str(out)] + (["--save-ref"] if save_ref else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not out.exists():
        tail = (r.stderr or "").strip().splitlines()[-3:]
        return {"row": row, "error": f"worker exited {r.returncode}: {' / '.join(tail)}"[:500]}
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    shutil.rmtree(work / row, ignore_errors=True)  # this row's files (its size is already measured)
    return res


def fmt(x, spec, dash="–"):
    return dash if x is None else format(x, spec)


def family(res: dict) -> str:
    return res.get("library", "").split(" ")[0] if "library" in res else res["row"].split("-")[0]


def table(results: list[dict], n_params: int) -> str:
    base = next(r for r in results if r["row"] == "fp32")
    fp_decode, fp_prefill = base["decode_tokens_per_s"], base["prefill_tokens_per_s"]
    lines = ["| library | configuration | bits/weight | size MB | memory MB | perplexity | Δ vs fp32 | KLD | top-1 "
             "| prefill tok/s (1×512) | decode tok/s | decode ×fp32 | quantize s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "perplexity" not in r:
            continue
        lines.append(
            f"| {r['library']} | {r['label']} | {8 * r['size_bytes'] / n_params:.2f} | {r['size_bytes'] / 1e6:.1f} "
            f"| {r['memory_bytes'] / 1e6:.0f} | {r['perplexity']:.3f} "
            f"| {100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% | {fmt(r['kl_divergence'], '.4f')} "
            f"| {fmt(None if r['top1_agreement'] is None else 100 * r['top1_agreement'], '.2f')}"
            f"{'' if r['top1_agreement'] is None else '%'} | {r['prefill_tokens_per_s']:.0f} "
            f"| {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / fp_decode:.2f} "
            f"| {fmt(r['quantize_s'], '.1f')} |")
    return "\n".join(lines)


def verdicts(results: list[dict]) -> list[str]:
    """The acceptance comparisons, spelled out: for every peer row, quantkit's best row at equal or
    smaller size; quantkit's decode speed against the fastest Python-level peer; llama.cpp's ratio."""
    ok = [r for r in results if "perplexity" in r]
    ours = [r for r in ok if r["row"].startswith("quantkit")]
    peers = [r for r in ok if not r["row"].startswith("quantkit") and r["row"] not in ("fp32", "bf16")]
    out = []
    for p in peers:
        fit = [q for q in ours if q["size_bytes"] <= p["size_bytes"]]
        if not fit:
            out.append(f"- {p['label']} ({p['size_bytes'] / 1e6:.1f} MB, ppl {p['perplexity']:.3f}): no quantkit row "
                       f"this small in this run.")
            continue
        best = min(fit, key=lambda q: q["perplexity"])
        mark = "✓" if best["perplexity"] <= p["perplexity"] else "✗"
        out.append(f"- {mark} {p['label']} ({p['size_bytes'] / 1e6:.1f} MB, ppl {p['perplexity']:.3f}) vs "
                   f"{best['label']} ({best['size_bytes'] / 1e6:.1f} MB, ppl {best['perplexity']:.3f}, "
                   f"decode {best['decode_tokens_per_s'] / p['decode_tokens_per_s']:.2f}× the peer's)")
    py = [p for p in peers if family(p) in PY_LEVEL]
    if py and ours:
        fastest = max(py, key=lambda p: p["decode_tokens_per_s"])
        for q in ours:
            ratio = q["decode_tokens_per_s"] / fastest["decode_tokens_per_s"]
            out.append(f"- decode: {q['label']} {q['decode_tokens_per_s']:.1f} tok/s = {ratio:.2f}× the fastest "
                       f"Python-level peer ({fastest['label']}, {fastest['decode_tokens_per_s']:.1f} tok/s)"
                       f"{'' if ratio >= 0.8 else ' — more than 20% slower'}")
    cpp = [p for p in peers if family(p) == "llama.cpp" or p["row"].startswith("llamacpp")]
    if cpp and ours:
        fastest = max(ours, key=lambda q: q["decode_tokens_per_s"])
        for p in cpp:
            out.append(f"- llama.cpp {p['label']}: decode {p['decode_tokens_per_s']:.1f} tok/s; quantkit's fastest "
                       f"({fastest['label']}) is {fastest['decode_tokens_per_s'] / p['decode_tokens_per_s']:.2f}× that")
    return out


def short(r: dict) -> tuple[str, str]:
    """(library, configuration) for the report's narrow table: 'torchao 0.18.0', 'int8 weight-only'."""
    library = r["library"].split(" (")[0]
    fam = family(r)
    label = r["label"]
    for prefix in (fam + " ", "torch ", "ONNX Runtime ", "optimum-quanto ", "quanto ", "bitsandbytes "):
        if label.startswith(prefix):
            label = label[len(prefix):]
            break
    return library, label


def report(results: list[dict], spec: dict, folder: Path, findings: str, gens: dict[str, str]) -> Path:
    """report.md + self-contained report.html (quantkit.report): the table, the size-vs-perplexity
    chart per library, the findings and the generations side by side."""
    from quantkit import report as rep

    plots = Path(tempfile.mkdtemp(prefix="peers-plots-"))  # the report folder is written whole, at the end
    series: dict[str, list] = {}
    for r in results:
        if "perplexity" in r and r["row"] not in ("fp32", "bf16"):
            series.setdefault(family(r), []).append((r["size_bytes"], r["perplexity"], short(r)[1]))
    fp32 = next(r["perplexity"] for r in results if r["row"] == "fp32")
    front = rep.plot_fronts(series, plots / "front.png", title="size vs perplexity, SmolLM2-135M",
                            xlabel="size MB (as the library stores the model)", lines=False, logy=True,
                            reference=fp32)
    rows = []
    for r in results:
        if "perplexity" in r:
            library, label = short(r)
            rows.append({"scheme": label, "library": library, "bpw": 8 * r["size_bytes"] / spec["n_params"],
                         "perplexity": r["perplexity"], "kl_divergence": r["kl_divergence"],
                         "top1_agreement": r["top1_agreement"], "size_bytes": r["size_bytes"],
                         "memory_bytes": r["memory_bytes"], "decode_tokens_per_s": r["decode_tokens_per_s"]})
    meta = {"title": "quantkit and its peers — SmolLM2-135M", "model": "smollm2 (SmolLM2-135M-Instruct)",
            "text": f"WikiText-2 test split, its start: {results[0].get('tokens', 0)} scored tokens, windows of "
                    f"{spec['ctx']}",
            "machine": spec.get("machine") or machine(), "command": spec.get("command", ""), "prompt": PROMPT}
    if spec.get("date"):
        meta["date"] = spec["date"]
    return rep.write_report(folder, rows, gens, {"Size vs perplexity": front}, meta, html=True,
                            sections=[("Findings", findings)])


def generations(results: list[dict], tok_dir: str) -> dict[str, str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    return {r["label"]: tok.decode(r["generation_ids"]).strip() for r in results if "generation_ids" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(["fp32"] + QUANTKIT_ROWS + PEER_ROWS),
                    help="comma-separated row keys (benchmarks/peer_models.py BUILDERS); fp32 always runs first")
    ap.add_argument("--tokens", type=int, default=4096,
                    help="evaluation tokens from the start of the text (4096 keeps the default run under 30 minutes "
                         "on 2 cores: the bf16 peers prefill slowly on CPUs without native bf16)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed prefill and decode runs per row (the best counts)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("QUANTKIT_THREADS", os.cpu_count() or 2)))
    ap.add_argument("--report", default=str(ROOT / "reports" / "peers"))
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    ap.add_argument("--section", default="peers", help="docs/benchmarks.md section to write (a subset of --rows: "
                                                       "give it its own, e.g. peers-decode)")
    ap.add_argument("--rerender", metavar="RESULTS_JSON",
                    help="rebuild the report (--report) from an earlier run's results.raw.json; measures nothing")
    a = ap.parse_args()
    if a.rerender:
        try:
            saved = json.loads(Path(a.rerender).read_text())
            saved["spec"], saved["results"], saved["findings"]  # noqa: B018 (the keys a run writes)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--rerender needs the results.raw.json a run of this script wrote: {e}") from None
        md = report(saved["results"], saved["spec"], Path(a.report), saved["findings"],
                    generations(saved["results"], saved["spec"]["tok_dir"]))
        (Path(a.report) / "results.raw.json").write_text(json.dumps(saved, indent=1))
        print(f"report: {md}")
        return
    rows = [r for r in a.rows.split(",") if r and r != "fp32"]
    rows = ["fp32"] + [r for r in rows if "@" not in r] + [r for r in rows if "@" in r]  # matched rows after their peer
    from peer_models import builder

    for row in rows:  # refuse unknown keys before any work
        try:
            builder(row)
        except KeyError as e:
            raise SystemExit(e.args[0]) from None
        if "@" in row and row.split("@", 1)[1] not in rows:
            raise SystemExit(f"{row} plans for the size of row {row.split('@', 1)[1]!r}: add that row to --rows")
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qk-peers-") as work:
        work = Path(work)
        spec = sources(work, a.tokens, a.ctx)
        spec.update(work=str(work), ctx=a.ctx, threads=a.threads, decode_tokens=a.decode_tokens, gen_tokens=24,
                    repeats=a.repeats)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        results = []
        spec["budgets"] = {}
        for k, row in enumerate(rows, 1):
            print(f"[{k}/{len(rows)}] {row} ...", file=sys.stderr, flush=True)
            if "@" in row:  # quantkit planned for the size the named peer row measured
                peer = next((r for r in results if r["row"] == row.split("@", 1)[1]), {})
                spec["budgets"][row] = peer.get("size_bytes")
                spec_path.write_text(json.dumps(spec))
            res = run_row(row, spec_path, work, save_ref=row == "fp32")
            results.append(res)
            brief = {k: res.get(k) for k in ("label", "size_bytes", "perplexity", "kl_divergence",
                                               "decode_tokens_per_s", "prefill_tokens_per_s", "quantize_s",
                                               "wall_s", "unavailable", "error")}
            print(row, json.dumps(brief), flush=True)
            if row == "fp32" and "perplexity" not in res:
                raise SystemExit(f"the fp32 reference row failed: {res}")
    gens = generations(results, spec["tok_dir"])
    missing = [r for r in results if "perplexity" not in r]
    body = [f"Perplexity, KLD and top-1 on the first {a.tokens} tokens of the WikiText-2 test text, windows of "
            f"{a.ctx}, the same token ids for every row (llama.cpp is fed them directly); KLD and top-1 against the "
            f"fp32 row. Decode: greedy, batch 1, KV cache, {a.decode_tokens} tokens after a {len(spec['prompt_ids'])}-token "
            f"prompt, best of {spec['repeats']}. Size: the model as its library stores it (bits/weight = size × 8 / "
            f"{spec['n_params'] / 1e6:.1f} M parameters). Memory: resident set added by building the model. Each row ran "
            f"in its own process; total wall time {(time.perf_counter() - t_start) / 60:.1f} min."]
    if missing:
        body += ["", "Could not run here:", ""]
        body += [f"- `{r['row']}`: {r.get('unavailable') or r.get('error')}" for r in missing]
    body += ["", "quantkit's best row at equal or smaller size, for every peer row:", ""] + verdicts(results)
    notes = [f"- {r['label']}: {r['notes']}" for r in results if r.get("notes")]
    if notes:
        body += ["", "Configurations:", ""] + notes
    findings = "\n".join(body)
    text = table(results, spec["n_params"]) + "\n\n" + findings
    print(text)
    folder = Path(a.report)
    spec.update(machine=machine(), command="python " + " ".join([sys.argv[0]] + sys.argv[1:]),
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    if not a.no_write:  # first: the table is kept even if the report folder is refused
        write_section(a.section, f"quantkit and its peers on SmolLM2-135M (first {a.tokens} tokens of the evaluation text)",
                      text)
    raw = json.dumps({"spec": spec, "results": results, "findings": findings}, indent=1)
    md = report(results, spec, folder, findings, gens)
    (folder / "results.raw.json").write_text(raw)  # into the report folder quantkit just wrote
    print(f"report: {md}")


if __name__ == "__main__":
    main()
