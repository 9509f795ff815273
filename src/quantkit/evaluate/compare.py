"""`compare`: quantize, save, reload, evaluate and time several schemes in one run.

Every row goes through the whole main job (quantize -> save -> load -> evaluate), so the
sizes are the files written and the memory is what the reloaded model holds. Before any
measuring, the guard (evaluate/guard.py) checks that quantkit holds this float model right with
each embeddings/head storage the rows use, and the fp32 row again after its save -> load.
"""
from __future__ import annotations

import logging
import platform
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..modules import layer_module, linear_weight
from ..config import make_config
from ..scheme import parse_schemes
from ..errors import DataError
from .guard import check_float_model, check_reference, probe_ids
from .hidden import MEASURE, HiddenReference, encoder_windows, measure_of
from .quality import ReferenceCache
from .run import evaluate_model, make_windows
from .size import disk_bytes
from .speed import greedy_generate

log = logging.getLogger(__name__)

DEFAULT_SCHEMES = "fp32,bf16,int8,llm-int8,int4-g128,nf4-dq,fp8-e4m3,int3-g128"
DEFAULT_PROMPT = "The three most important things to know about the ocean are"


def _hist_layer(model) -> str | None:
    for name, mod in model.named_modules():
        if linear_weight(mod) is not None and ("mlp" in name or "ffn" in name or "fc" in name):
            return name
    return next((n for n, m in model.named_modules() if linear_weight(m) is not None), None)


def _guard(model, tok, schemes, head=None) -> "torch.Tensor":
    """Stop before the long work if the float model as quantkit holds it (fp32 layers, each head
    storage the rows use) does not give the source's logits; returns the probe token ids. Without
    an fp32 row (which is checked after its own reload) the first check goes through save -> load."""
    ids = probe_ids(model, tok)
    heads = dict.fromkeys(make_config(s, head=head).head for s in schemes)
    roundtrip = not any(s.name == "fp32" for s in schemes)
    for i, h in enumerate(heads):
        check_reference(model, head=h, roundtrip=roundtrip and i == 0, ids=ids)
    return ids


def compare(source, schemes=DEFAULT_SCHEMES, text=None, ctx=512, max_tokens=8192, head=None, speed=True,
            prompt=DEFAULT_PROMPT, gen_tokens=32, report_dir=None, progress=True, command=None, calib=None,
            calib_samples=128, calib_len=512, seed=0, transforms=(), allow_pickle=False, compile_speed=False,
            on_status=None) -> dict:
    """Run the main job for each scheme on `source`; returns {"rows", "generations", "meta"}.

    text: the evaluation text (a string) or None to score on text the fp32 model generates
    (KLD and top-1 only; perplexity of a model on its own greedy text is not meaningful).
    calib: calibration text for schemes that need it (w8a8-static-*, or any with `transforms`,
    e.g. SmoothQuant; float schemes get none);
    None = text the model generates (a warning says so). Drawn once, shared by every scheme.
    """
    from ..io.load import load
    from ..io.checkpoint import save
    from ..pipeline import needs_calibration, quantize_model

    schemes = parse_schemes(schemes) if isinstance(schemes, str) else list(schemes)
    for s in schemes:  # validate everything before the long work
        make_config(s, head=head, transforms=() if s.is_float else transforms)
    model, tok = load(source, allow_pickle=allow_pickle)
    probe = _guard(model, tok, schemes, head)
    calib_ids = None
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    encoder = measure_of(model) == "hidden"
    if encoder:  # hidden-state similarity on the text, no generation or decode speed (evaluate/hidden.py)
        if text is None:
            raise DataError("an encoder is compared on a text (hidden-state similarity): pass --text PATH")
        windows = encoder_windows(tok, text, model, ctx, max_tokens)
        ref, speed, gen = HiddenReference(model, windows), False, (lambda m: None)
    else:
        windows = make_windows(tok, text, ctx, max_tokens, generator_model=model if text is None else None)
        ref, gen = ReferenceCache(model, windows), (lambda m: greedy_generate(m, tok, prompt, gen_tokens))
    layer = _hist_layer(model)
    hist = {"fp32": linear_weight(layer_module(model, layer)).detach().float().clone()} if layer else {}
    errors: dict[str, dict[str, float]] = {}
    rows, gens = [], {} if encoder else {"fp32 (reference)": gen(model)}
    for scheme in schemes:
        cfg = make_config(scheme, head=head, transforms=() if scheme.is_float else transforms)
        log.info("compare: %s", scheme.name)
        if needs_calibration(cfg) and calib_ids is None:
            from ..data import calib_samples as sample_text, calibration

            calib_ids = (sample_text(tok, calib, calib_samples, calib_len, seed) if calib is not None
                         else calibration(tok, None, model, calib_samples, calib_len, seed))
        t0 = time.perf_counter()
        qm = quantize_model(model, cfg, progress=progress, calib=calib_ids if needs_calibration(cfg) else None)
        qtime = time.perf_counter() - t0
        with tempfile.TemporaryDirectory(prefix="quantkit-compare-") as d:
            out = Path(d) / "model"
            save(qm, out, tok)
            del qm
            size = disk_bytes(out)
            m2, _ = load(out)
        if scheme.name == "fp32":  # the reference row: the float model after quantkit's save -> load
            check_float_model(model, m2, ids=probe, what="the fp32 row (quantized, saved and reloaded)")
        res = evaluate_model(m2, tok, text=text, reference=ref, windows=windows, speed=speed, compile_speed=compile_speed,
                             size_bytes=size, progress=progress,
                             on_status=None if on_status is None else (lambda line, s=scheme.name: on_status(f"{s}: {line}")))
        if m2.quantkit.errors:
            errors[scheme.name] = dict(m2.quantkit.errors)
        if layer and layer in m2.quantkit.layers:
            hist[scheme.name] = m2.get_submodule(layer).dequantized_weight().float()
        outl = [m.run_stats for m in m2.modules() if "outlier_cols" in (getattr(m, "run_stats", None) or {})]
        row = {"scheme": scheme.name, "method": cfg.method, "head": m2.quantkit.head.get("scheme"),
               "bpw": 8 * size / params, "quantize_seconds": qtime, **res}
        if outl:
            row["outlier_fraction"] = sum(o["outlier_cols"] for o in outl) / max(1, sum(o["cols"] for o in outl))
        rows.append(row)
        if not encoder:
            gens[scheme.name] = gen(m2)
        del m2
    base = next((r for r in rows if r["scheme"] == "fp32"), None)
    for r in rows:
        if base and r.get("perplexity") and base.get("perplexity") and "text" not in r:
            r["ppl_delta_pct"] = 100 * (r["perplexity"] / base["perplexity"] - 1)
        if base and r.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
            r["speedup"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    if text is None:
        for r in rows:  # perplexity on the reference's own greedy text is not a quality measure
            r.pop("perplexity", None)
    meta = {
        "model": str(source), "parameters": params, "tokens": int(rows[0]["tokens"]) if rows else 0, "ctx": ctx,
        "text": "generated by the fp32 model (offline)" if text is None else f"{len(text)} characters",
        "measure": MEASURE if encoder else "perplexity, KL divergence and top-1 agreement to the fp32 model",
        "prompt": None if encoder else prompt, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": command or "",
        "decode": ("compiled decode steps (torch.compile, StaticCache)" if any(r.get("decode_compiled") for r in rows)
                   else "eager decode") if speed else "not timed",
    }
    result = {"rows": rows, "generations": gens, "meta": meta}
    if report_dir is not None:
        result["report"] = str(_write(report_dir, result, hist, layer, errors))
    return result


def _write(report_dir, result, hist, layer, errors) -> Path:
    from ..report import plot_layer_error, plot_size_vs_perplexity, plot_weight_histogram, report_folder, write_report

    report_dir = report_folder(report_dir)
    plots = {}
    if hist:
        p = report_dir / "weight_histogram.png"
        plot_weight_histogram(hist["fp32"], {k: v for k, v in hist.items() if k != "fp32"}, p,
                              title=f"{layer}: weights before/after")
        plots["Weight histogram"] = p
    lossy = {k: v for k, v in errors.items() if max(v.values(), default=0) > 0}
    if lossy:  # per-layer weight error of the scheme with the largest total error
        worst = max(lossy, key=lambda k: sum(lossy[k].values()))
        p = report_dir / "layer_error.png"
        natural = sorted(lossy[worst], key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
        plot_layer_error({n: lossy[worst][n] for n in natural}, p, title=f"relative weight error per layer, {worst}")
        plots[f"Per-layer error ({worst})"] = p
    p = report_dir / "size_vs_quality.png"
    plot_size_vs_perplexity(result["rows"], p)
    plots["Size vs quality"] = p
    return write_report(report_dir, result["rows"], result["generations"], plots, result["meta"], html=True)
