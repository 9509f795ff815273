"""Mixed precision on SmolLM2: per-layer sensitivity, planned mixes against uniform schemes at
the same sizes, and an accuracy target met by measurement.

Sensitivity and the accuracy-target check use calibration samples from the calibration part of
the text (the WikiText file's last-quarter articles); every perplexity and KL divergence in the
tables is measured on the first --tokens tokens of its evaluation part. Writes the tables to
docs/benchmarks.md and the plots (sensitivity heat map, size-vs-perplexity fronts) to --report.

    python benchmarks/mixed_precision.py [--text ../shared/data/wikitext-2-raw/wiki.test.raw] [--gptq]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import quantkit as qk
from quantkit.data import calib_samples, eval_windows
from quantkit.evaluate.quality import ReferenceCache, score
from quantkit.plan import (Sensitivity, measure_sensitivity, plan_for_budget, plan_for_target, predicted_kld, proxy_sensitivity,
                           rank_correlation)
from quantkit.report import plot_fronts, sensitivity_heatmap

from _common import WIKI, write_section


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default=str(WIKI))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--schemes", default="int8,int4-g128,int3-g128")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--max-kld", type=float, default=0.05, help="accuracy target for the target-driven plan")
    ap.add_argument("--proxy", action="store_true", help="plan on the Hessian-weighted proxy (seconds) instead of the "
                                                          "measured sensitivity (~20 min on 2 cores)")
    ap.add_argument("--sensitivity", help="JSON file: read the measured sensitivity from it if it exists, else measure "
                                          "and write it there (quantkit sensitivity --out writes the same format)")
    ap.add_argument("--gptq", action="store_true", help="also compare planned vs uniform int4-g128 with GPTQ")
    ap.add_argument("--gptq-samples", type=int, default=32)
    ap.add_argument("--report", default="reports/mixed-precision")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    model, tok = qk.load(a.model)
    windows = eval_windows(tok, qk.text(a.text), ctx=512, max_tokens=a.tokens)
    ref = ReferenceCache(model, windows)
    ids = calib_samples(tok, qk.text(a.text, "calib"), a.calib_samples, a.calib_len, seed=0)
    t0 = time.perf_counter()
    proxy = proxy_sensitivity(model, ids, a.schemes)
    proxy_s = time.perf_counter() - t0
    sens_s, rho = None, None
    if a.proxy:
        sens = proxy
    elif a.sensitivity and Path(a.sensitivity).exists():
        d = json.loads(Path(a.sensitivity).read_text())
        sens, sens_s = Sensitivity.from_dict(d), d.get("seconds")
        rho = rank_correlation(sens, proxy)
    else:
        t0 = time.perf_counter()
        sens = measure_sensitivity(model, ids, a.schemes)
        sens_s = time.perf_counter() - t0
        rho = rank_correlation(sens, proxy)
        if a.sensitivity:
            Path(a.sensitivity).write_text(json.dumps({**sens.to_dict(), "seconds": sens_s}, indent=1))
    Path(a.report).mkdir(parents=True, exist_ok=True)
    sensitivity_heatmap(sens, a.report)
    schemes = sens.schemes

    def run(cfg_or_scheme, calib=None):
        qm = qk.quantize(model, cfg_or_scheme, calib=calib, tokenizer=tok if calib is not None else None,
                         progress=False, calib_samples=a.gptq_samples)
        r = score(qm, windows, reference=ref, progress=False)
        from quantkit.evaluate.run import weights_bytes

        return {"size": weights_bytes(qm), "ppl": r["perplexity"], "kld": r["kl_divergence"]}

    uniform = {}
    for sc in schemes:
        uniform[sc] = run(sc)
        uniform[sc]["predicted"] = predicted_kld(sens, {n: sc for n in sens.layers})
    rows = [f"| fp32 | {ref.perplexity:.3f} | - | - | - |"]
    planned = {}
    s4, s3 = uniform["int4-g128"]["size"], uniform["int3-g128"]["size"]
    budgets = {"int4-g128 size": s4, "midway int3/int4": (s3 + s4) // 2, "int3-g128 size": s3}
    if "int8" in uniform:
        budgets["midway int4/int8"] = (s4 + uniform["int8"]["size"]) // 2
    runs = [(label, b, None) for label, b in budgets.items()]
    if sens.head:  # how much of the gain at int4-g128 size is the head's storage
        runs.insert(1, ("int4-g128 size, head pinned bf16", s4, "bf16"))
    for label, b, head in runs:
        plan = plan_for_budget(model, sens, b, head=head)
        r = run(plan.config())
        r.update(predicted=plan.predicted_kld, counts=plan.counts(), budget=b, head=plan.head)
        planned[label] = r
    for sc, r in uniform.items():
        rows.append(f"| uniform {sc} (head bf16) | {r['ppl']:.3f} | {r['kld']:.4f} | {r['size'] / 1e6:.2f} | {r['predicted']:.4f} |")
    for label, r in planned.items():
        mix = ", ".join(f"{k} x{v}" for k, v in sorted(r["counts"].items())) + f"; head {r['head']}"
        rows.append(f"| planned at {label} ({mix}) | {r['ppl']:.3f} | {r['kld']:.4f} | {r['size'] / 1e6:.2f} | "
                    f"{r['predicted']:.4f} |")
    plot_fronts({"uniform": [(r["size"], r["ppl"], sc) for sc, r in uniform.items()],
                 "planned": [(r["size"], r["ppl"], "") for r in planned.values()]},
                Path(a.report) / "front.png", title="SmolLM2: uniform schemes vs planned mixes (RTN)")
    # accuracy target (measured sensitivity only: the proxy is not in KL units)
    target_par = []
    if not a.proxy:
        tp = plan_for_target(model, sens, ids, max_kld=a.max_kld)
        tr = run(tp.config())
        cal_ref = ReferenceCache(model, ids, progress=False)
        uni_cal = {sc: score(qk.quantize(model, sc, progress=False), ids, reference=cal_ref,
                             progress=False)["kl_divergence"] for sc in schemes}
        meeting = [sc for sc in schemes if uni_cal[sc] <= a.max_kld]
        smallest_ok = min(meeting, key=lambda sc: uniform[sc]["size"]) if meeting else None
        target_par = ["", f"Accuracy target `--max-kld {a.max_kld}` (measured on the calibration samples): plan of "
                      f"{tp.size_bytes / 1e6:.2f} MB, measured KL {tp.measured['kld']:.4f} there; on the evaluation text "
                      f"perplexity {tr['ppl']:.3f}, KL {tr['kld']:.4f}. Uniform schemes' KL on the same calibration "
                      "samples: " + ", ".join(f"{sc} {v:.4f} ({uniform[sc]['size'] / 1e6:.2f} MB)" for sc, v in uni_cal.items())
                      + f"; smallest uniform scheme meeting the target: {smallest_ok or 'none'}."]
    gptq_rows = []
    if a.gptq:
        calib_text = qk.text(a.text, "calib")
        ug = run(qk.make_config("int4-g128", "gptq"), calib=calib_text)
        gptq_rows = [f"| uniform int4-g128 (head bf16), GPTQ | {ug['ppl']:.3f} | {ug['kld']:.4f} | {ug['size'] / 1e6:.2f} |"]
        for head in ([None, "bf16"] if sens.head else [None]):
            plan = plan_for_budget(model, sens, s4, head=head, method="gptq")
            pg = run(plan.config(), calib=calib_text)
            mix = ", ".join(f"{k} x{v}" for k, v in sorted(plan.counts().items())) + f"; head {plan.head}"
            gptq_rows.append(f"| planned at int4-g128 size ({mix}), GPTQ | {pg['ppl']:.3f} | {pg['kld']:.4f} | "
                             f"{pg['size'] / 1e6:.2f} |")
    if a.proxy:
        how = (f"Sensitivity: the Hessian-weighted proxy (each layer's own output error tr(dW H dW^T)/2, from one forward "
               f"pass over {sens.tokens} calibration tokens, {proxy_s:.0f} s) for each of {len(sens.layers)} Linears and "
               f"{', '.join(schemes)}; the 'predicted' column is in its units, not KL.")
    else:
        how = (f"Sensitivity: each of {len(sens.layers)} Linears quantized alone (RTN) with each of {', '.join(schemes)}"
               + (f", and the tied embedding/head stored as {' or '.join(sens.head)}" if sens.head else "") + "; "
               f"damage = mean KL vs fp32 on {sens.tokens} calibration tokens ({a.calib_samples} x {a.calib_len}), "
               f"measured in {sens_s / 60:.1f} min. Hessian-weighted proxy (one forward pass, {proxy_s:.0f} s): Spearman "
               f"rank correlation with the measured damage over every (layer, scheme) pair {rho:.3f}.")
    body = "\n".join([
        how + f" Plans: exact knapsack on the summed damage. Perplexity and KL on the first {windows.numel()} tokens of "
        f"the evaluation part; sizes are model.safetensors bytes.",
        "",
        "| model | perplexity | KLD | size MB | predicted damage (sum of per-layer) |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        *target_par,
        *([""] + ["GPTQ (" + str(a.gptq_samples) + " x 512 calibration tokens):", "",
                  "| model | perplexity | KLD | size MB |", "|---|---:|---:|---:|", *gptq_rows] if gptq_rows else []),
        "",
        f"Plots: `{a.report}/sensitivity.png`, `{a.report}/front.png`.",
    ])
    print(body)
    if not a.no_write:
        write_section("mixed-precision", "Mixed precision: sensitivity and planned mixes", body)


if __name__ == "__main__":
    main()
