"""The `quantkit` command line: a thin layer over the Python API.

Bad input (missing or corrupt files, unknown schemes, texts too short...) prints one line
`error: ...` and exits with code 2, leaving no output behind.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
from pathlib import Path

from .errors import QuantkitError
from .config import HEAD_CHOICES
from .scheme import GRAMMAR

MODEL_HELP = "model: alias (smollm2, qwen2.5-0.5b), Hugging Face folder or hub id, .gguf file, or quantkit checkpoint folder"


def _mb(b):
    return f"{b / 1e6:,.2f} MB"


# ----------------------------------------------------------------------------- argument checks
def _number(kind, low=None, strict=False, high=None):
    """An argparse type: `kind` (int/float) >= low (> low with strict), <= high; finite."""
    def parse(text):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (v <= low if strict else v < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text!r}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text!r}")
        return v
    return parse


POS_INT, NONNEG_INT, POS_FLOAT, NONNEG_FLOAT = _number(int, 1), _number(int, 0), _number(float, 0, True), _number(float, 0)


def _percent(text):
    """--max-ppl-increase: "1%" or 0.01 -> 0.01."""
    t = str(text).strip()
    v = _number(float, 0, True)(t[:-1] if t.endswith("%") else t)
    return v / 100 if t.endswith("%") else v


def _source_path(model):
    """The local path of a model source (file or folder), for keeping outputs away from it."""
    from .io.load import resolve

    src = resolve(model)
    return None if src.path is None else src.path


def _out(a, kind, path="--out"):
    """Refuse an output path (default: a.out) before any model is loaded (io.atomic.check_output)."""
    from .io.atomic import check_output

    path = getattr(a, "out", None) if path == "--out" else path
    if path is None:
        return None
    protect = [_source_path(a.model)] if getattr(a, "model", None) else []
    final = check_output(path, kind, overwrite=getattr(a, "overwrite", False), protect=protect)
    if kind == "report" and final.is_dir():  # reports are written into the folder: --overwrite lets them in
        from .io.atomic import MARKER

        (final / MARKER).write_text(json.dumps({"kind": "report"}) + "\n", encoding="utf-8")
    return final


def _guard(model, tok, head):
    """Stop if the float model as quantkit holds it does not reproduce the source (evaluate.guard)."""
    from .evaluate.guard import check_reference

    check_reference(model, head=head or "bf16", tokenizer=tok)


def _finite(obj):
    """NaN/inf as null, recursively, so --json output is strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json(obj, indent=2) -> str:
    return json.dumps(_finite(obj), indent=indent, default=str, allow_nan=False)


def _text(path, split="eval"):
    if path is None:
        return None
    from .data import text

    return text(path, split)


# ----------------------------------------------------------------------------- commands
def cmd_models(a):
    from .io.models import fetch, list_aliases

    if a.action == "fetch":
        print(fetch(a.name))
        return
    for r in list_aliases():
        print(f"{r['name']:13s} {'cached' if r['cached'] else 'not fetched':12s} ~{r['approx_mb']} MB  {r['description']}")
        print(f"{'':13s} from {r['package']}")


def cmd_inspect(a):
    from . import load
    from .evaluate.inspect import inspect_model
    from .evaluate.size import disk_bytes
    from .io.load import resolve

    model, _ = load(a.model, allow_pickle=a.allow_pickle)
    info = inspect_model(model)
    src = resolve(a.model)
    info["disk_bytes"] = disk_bytes(src.path) if src.path is not None and Path(src.path).exists() else None
    info["source"] = str(src.path or a.model)
    if a.json:
        print(_json(info))
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
    t = Table(title="size of model.safetensors as stored (exact)" if info.get("quantized") else
              "size of a quantkit checkpoint under each scheme (exact, model.safetensors)")
    for col in ("scheme", "bytes", "MB", "bits/param", "embeddings+head"):
        t.add_column(col, justify="left" if col in ("scheme", "embeddings+head") else "right")
    for s, d in info["sizes"].items():
        t.add_row(s, f"{d['bytes']:,}", f"{d['bytes'] / 1e6:,.2f}", f"{d['bits_per_param']:.2f}", d["head"])
    c.print(t)


def _rss_bytes(peak: bool) -> int:
    from .memory import rss_bytes

    return rss_bytes(peak)


def cmd_quantize(a):
    import time

    from . import load, save
    from .config import make_config
    from .pipeline import needs_calibration, quantize_model, validate_config

    if a.plan:
        from .plan import Plan

        plan = Plan.load(a.plan)
        method = _method(a, a.method or plan.method)  # --method and its options override the plan's
        plan.method = method
        base = plan.config()
        cfg = make_config(base.scheme, method, a.head or plan.head, plan.rules(), a.strict_groups,
                          a.sequential, _transforms(a))
    elif a.scheme:
        cfg = make_config(a.scheme, _method(a), a.head, strict_groups=a.strict_groups,
                          sequential=a.sequential, transforms=_transforms(a))
    else:
        raise QuantkitError("give --scheme SCHEME or --plan plan.json")
    validate_config(cfg)
    if not a.dry_run:
        _out(a, "checkpoint")  # before the model is loaded: never after minutes of work
    calib_text = _text(a.calib, "calib") if a.calib and needs_calibration(cfg) else None
    if a.dry_run:
        from .estimate import estimate_quantize

        model, tok = load(a.model, allow_pickle=a.allow_pickle)
        ids = None
        if needs_calibration(cfg):
            from .data import calib_samples, calibration

            ids = (calib_samples(tok, calib_text, a.calib_samples, a.calib_len, a.seed) if calib_text is not None
                   else calibration(tok, None, model, a.calib_samples, a.calib_len, a.seed))
        est = estimate_quantize(model, cfg, ids, batch_size=a.batch_size)
        print(_json(est.to_dict(), None) if a.json else
              f"model.safetensors would be {est.size_bytes:,} bytes ({_mb(est.size_bytes)}); estimated on this machine: "
              f"quantization {est.seconds:.1f} s, peak memory {_mb(est.peak_rss_bytes)} (probe took {est.probe_seconds:.1f} s)")
        return
    out = Path(a.out)
    # the baseline is the process with the libraries every model load imports, before any model:
    # transformers.modeling_utils alone pulls in ~90 MB of modules (sympy among them) lazily
    import transformers.modeling_utils  # noqa: F401

    baseline_rss = _rss_bytes(peak=False)
    loader = None
    if a.offload_dir:
        from .errors import DataError
        from .io.offload import open_streaming

        if calib_text is None and needs_calibration(cfg):
            raise DataError("--offload-dir needs --calib PATH: a model streamed from disk cannot write its own calibration text")
        model, tok, loader = open_streaming(a.model, a.offload_dir, allow_pickle=a.allow_pickle)
    else:
        model, tok = load(a.model, allow_pickle=a.allow_pickle)
        if needs_calibration(cfg):  # calibrating on a float model that is not the source's would be garbage
            _guard(model, tok, cfg.head)
    ids = None
    if needs_calibration(cfg):
        from .data import calib_samples, calibration

        ids = (calib_samples(tok, calib_text, a.calib_samples, a.calib_len, a.seed) if calib_text is not None
               else calibration(tok, None, model, a.calib_samples, a.calib_len, a.seed))
    t0 = time.perf_counter()
    qm = quantize_model(model, cfg, inplace=True, calib=ids, batch_size=a.batch_size, loader=loader)
    seconds = time.perf_counter() - t0
    save(qm, out, tok, overwrite=a.overwrite)  # qk.load recorded the source: never written over
    from .evaluate.size import disk_bytes

    summary = {"out": str(out), "scheme": cfg.scheme.name, "method": cfg.method, "head": qm.quantkit.head.get("scheme"),
               "size_bytes": disk_bytes(out), "layers": len(qm.quantkit.layers), "fallbacks": qm.quantkit.fallbacks,
               "quantize_seconds": round(seconds, 2), "peak_rss_bytes": _rss_bytes(peak=True),
               "baseline_rss_bytes": baseline_rss}
    print(_json(summary) if a.json else
          f"wrote {out} ({_mb(summary['size_bytes'])}, {summary['layers']} layers {cfg.scheme.name} via {cfg.method} "
          f"in {seconds:.1f} s, embeddings/head {summary['head']})")


def cmd_export(a):
    import time

    from . import load, quantize_for_gguf
    from .io.gguf import export_gguf

    if (a.gguf is None) == (a.to is None):
        raise QuantkitError("give one of --gguf TYPE (a llama.cpp file) or --to gptq|compressed-tensors (a folder)")
    if a.gguf is not None and a.out is None:
        raise QuantkitError("--gguf needs --out FILE.gguf")
    if a.gguf is not None and Path(a.out).suffix.lower() != ".gguf":
        raise QuantkitError(f"--out must name a .gguf file, got {a.out}")
    _out(a, "gguf" if a.gguf is not None else "export")
    method = _method(a)
    calib = _text(a.calib, "calib") if a.calib and (a.method != "rtn" or a.to is not None) else None
    model, tok = load(a.model, allow_pickle=a.allow_pickle)
    if a.to is not None:
        return _export_hf(a, model, tok, calib, method)
    seconds = None
    if a.method != "rtn":
        t0 = time.perf_counter()
        _guard(model, tok, "keep")
        model = quantize_for_gguf(model, tok, a.gguf, method=method, calib=calib, progress=not a.json,
                                  calib_samples=a.calib_samples, calib_len=a.calib_len, seed=a.seed,
                                  batch_size=a.batch_size, sequential=a.sequential)
        seconds = time.perf_counter() - t0
    summary = export_gguf(model, tok, a.out, a.gguf, tokenizer_pre=a.tokenizer_pre, progress=not a.json,
                          overwrite=a.overwrite, protect=[_source_path(a.model)])
    if a.json:
        print(_json({"out": str(summary.path), "gguf_type": summary.ftype, "method": a.method,
                     "size_bytes": summary.bytes, "tensor_types": summary.types,
                     "repacked": len(summary.repacked), "requantized": len(summary.requantized),
                     "quantize_seconds": None if seconds is None else round(seconds, 2)}))
    else:
        print("\n".join(summary.lines()))


def _export_hf(a, model, tok, calib, method):
    """export --to gptq|compressed-tensors: quantize (unless the source already is a quantkit
    checkpoint), measure what the model card reports, write the folder."""
    import time

    from . import quantize
    from .io.export_hf import check_scheme, default_folder, export_hf, export_scheme, model_card, model_name

    reference = None
    seconds = None
    if hasattr(model, "quantkit"):
        qm = model
        if a.scheme:
            raise QuantkitError(f"{a.model} is already quantized ({', '.join(sorted(set(qm.quantkit.layers.values())))}); "
                                "drop --scheme or export from the float model")
    else:
        scheme = check_scheme(a.to, a.scheme or export_scheme(model))
        t0 = time.perf_counter()
        if a.method != "rtn":
            _guard(model, tok, "bf16")
        qm = quantize(model, scheme, method=method, calib=calib, tokenizer=tok, progress=not a.json,
                      calib_samples=a.calib_samples, calib_len=a.calib_len, seed=a.seed, batch_size=a.batch_size,
                      sequential=a.sequential)
        seconds = time.perf_counter() - t0
        reference = model
    from .io.export_hf import EXPORTERS, uniform_scheme

    sc, g = uniform_scheme(qm, EXPORTERS[a.to])
    out = a.out or default_folder(model_name(a.model), a.to, sc, g)
    measured = None
    if a.eval_text:
        from .evaluate.run import evaluate_model

        measured = evaluate_model(qm, tok, text=_text(a.eval_text), reference=reference, max_tokens=a.eval_tokens, ctx=a.ctx,
                                  speed=a.speed, progress=not a.json)
    methods = sorted(set(qm.quantkit.methods.values())) or [a.method]
    card = model_card(model_name(a.model), a.to, sc, g, method=", ".join(methods),
                      calib=(f"{a.calib} ({a.calib_samples} x {a.calib_len} tokens, seed {a.seed})" if a.calib else None),
                      measured=measured, eval_text=a.eval_text, seconds=seconds, ctx=a.ctx,
                      command=" ".join(["quantkit"] + [shlex.quote(str(x)) for x in a.argv]))
    summary = export_hf(qm, tok, out, a.to, card=card, overwrite=a.overwrite, protect=[_source_path(a.model)])
    res = {"out": str(summary.path), "format": summary.format, "scheme": summary.scheme, "group_size": summary.group_size,
           "layers": summary.layers, "size_bytes": summary.bytes, "quantize_seconds": seconds, "measured": measured}
    if a.json:
        print(_json(res))
    else:
        print(f"wrote {summary.path} ({a.to}, {summary.scheme}, {summary.layers} layers, {_mb(summary.bytes)})"
              + (f"; perplexity {measured['perplexity']:.3f}" if measured else ""))


def cmd_eval(a):
    from . import load
    from .evaluate.run import evaluate_model
    from .evaluate.size import disk_bytes
    from .io.load import resolve

    text = _text(a.text)
    model, tok = load(a.model, allow_pickle=a.allow_pickle)
    if tok is None:
        from .errors import SourceError

        raise SourceError(f"{a.model} has no tokenizer (no tokenizer files beside its weights); eval needs one to "
                          "read the text: copy the tokenizer files (tokenizer.json, tokenizer_config.json) into it")
    if a.int8_activations:
        _int8_activations(model, "int8-all")
    reference = load(a.reference, allow_pickle=a.allow_pickle)[0] if a.reference else None
    src = resolve(a.model)
    size = disk_bytes(src.path) if src.path is not None and Path(src.path).exists() else None
    res = evaluate_model(model, tok, text=text, reference=reference, ctx=a.ctx, max_tokens=a.max_tokens,
                         speed=a.speed, size_bytes=size, compile_speed=not a.no_compile, on_status=_status)
    if a.json:
        print(_json(res))
        return
    for k, v in res.items():
        print(f"{k:22s} {v:,.4f}" if isinstance(v, float) else f"{k:22s} {v}")


def _status(line):
    """A progress line on stderr (compiling, ...), apart from the results on stdout."""
    print(f"[{line}]", file=sys.stderr, flush=True)


def _int8_activations(model, mode):
    """--int8-activations: a quantized model's layers on int8 activations, or a clear refusal."""
    from .errors import QuantkitError
    from .kernels import native
    from .modules import set_activations

    if not native.wonly():
        raise QuantkitError(f"--int8-activations needs quantkit's native kernels, which are not built here: "
                            f"{native.why_not_native() or 'the build failed'}")
    try:
        done, total = set_activations(model, mode)
    except QuantkitError as e:
        raise QuantkitError(f"--int8-activations: {e} (quantize it first, e.g. --scheme int4-g128)") from None
    if done == 0:
        raise QuantkitError("--int8-activations: none of the model's quantized layers has an int8-activation path "
                            "(it needs integer codes or nf4/fp4/IQ4_NL in groups of a multiple of 32)")
    print(f"[int8 activations: {done} of {total} quantized layers]", file=sys.stderr)


def cmd_compare(a, schemes=None, model=None):
    from .evaluate.compare import compare
    from .report import print_table, to_json

    _out(a, "report", a.report)
    text = _text(a.text)
    result = compare(model or a.model, schemes or a.schemes, text=text, ctx=a.ctx, max_tokens=a.max_tokens,
                     head=a.head, speed=not a.no_speed, report_dir=a.report, command=" ".join(["quantkit"] + sys.argv[1:]),
                     calib=_text(a.calib, "calib"), calib_samples=a.calib_samples, calib_len=a.calib_len, seed=a.seed,
                     transforms=_transforms(a), allow_pickle=getattr(a, "allow_pickle", False),
                     compile_speed=not a.no_compile, on_status=_status)
    if a.json:
        print(to_json(result))
        return
    print_table(result["rows"], title=f"{result['meta']['model']} — {result['meta']['tokens']} tokens, ctx {a.ctx}, "
                                      f"text: {result['meta']['text']}")
    print(f"\nmeasure: {result['meta']['measure']}")
    if result["meta"]["prompt"] is not None:
        print(f"prompt: {result['meta']['prompt']!r}")
    for name, g in result["generations"].items():
        print(f"  [{name}] {g!r}")
    if a.report:
        print(f"\nreport: {result['report']}")


def cmd_demo(a):
    a.model = "smollm2"
    cmd_compare(a, schemes=a.schemes)


def cmd_generate(a):
    from . import load, quantize
    from .evaluate.generate import generate

    model, tok = load(a.model, allow_pickle=a.allow_pickle)
    if tok is None:
        from .errors import SourceError

        raise SourceError(f"{a.model} has no tokenizer (no tokenizer files beside its weights); generate needs one")
    if a.scheme:
        model = quantize(model, a.scheme, head=a.head, progress=False)
    if a.int8_activations:
        _int8_activations(model, "int8")
    stream = not a.json

    def text(piece):
        print(piece, end="", flush=True)

    def status(line):
        print(f"[{line}]", file=sys.stderr, flush=True)

    if stream:
        print(a.prompt, end="", flush=True)
    res = generate(model, tok, a.prompt, max_new_tokens=a.max_new_tokens, compile=not a.no_compile,
                   stop_at_eos=not a.ignore_eos, on_text=text if stream else None, on_status=status if stream else None)
    if a.json:
        print(_json(res))
        return
    speed = f"{res['decode_tokens_per_s']:.1f} tokens/s" if res["decode_tokens_per_s"] else "too few tokens to time"
    how = f"compiled; first step {res['compile_seconds']:.1f} s" if res["compiled"] else "eager"
    print(f"\n[{res['new_tokens']} new tokens: {speed} ({how}); prompt {res['prompt_tokens']} tokens in "
          f"{res['prefill_seconds']:.2f} s]", file=sys.stderr)


def _train_config(a):
    from .train import TrainConfig

    return TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, weight_decay=a.weight_decay,
                       warmup=a.warmup, schedule=a.schedule, optimizer=a.optimizer, seed=a.seed,
                       log_every=a.log_every, save_every=a.save_every, grad_checkpointing=a.grad_checkpointing)


def _print_training(res, a, lines):
    if a.json:
        print(_json(res))
        return
    losses = res["losses"]
    print(f"trained {res['steps']} steps in {res['seconds']:.1f} s: loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"{res['trainable_params']:,} trainable parameters; optimizer state {_mb(res['optimizer_state_bytes'])}; "
          f"peak memory {_mb(res['peak_rss_bytes'])}")
    for line in lines:
        print(line)


def cmd_qat(a):
    from . import load
    from .scheme import parse_scheme
    from .train.run import run_qat

    cfg = _train_config(a)  # every argument checked before the model is loaded
    parse_scheme(a.scheme)
    _text(a.text, "calib")
    _out(a, "training")
    model, tok = load(a.model, allow_pickle=a.allow_pickle)
    res = run_qat(model, tok, a.scheme, a.text, a.out, cfg, lsq=a.lsq, head=a.head, resume=a.resume,
                  eval_tokens=a.eval_tokens, ctx=a.ctx, overwrite=a.overwrite, protect=[_source_path(a.model)])
    d = res["convert_max_logit_diff"]
    _print_training(res, a, [
        f"converted model: {res['out']} (logits vs the fake-quantized model: max |diff| {d['reference_kernel']:.2e} "
        f"with the float reference kernel, {d['fast_kernels']:.2e} with the fast kernels)",
        f"held-out perplexity ({res['eval_tokens']} tokens): {res['held_out_perplexity']:.3f}"
        if res["held_out_perplexity"] is not None else "held-out perplexity: skipped (--eval-tokens 0)"])


def cmd_finetune(a):
    from . import load
    from .scheme import parse_scheme
    from .train.run import run_finetune

    cfg = _train_config(a)
    parse_scheme(a.scheme)
    if a.merge_scheme:
        parse_scheme(a.merge_scheme)
    _text(a.text, "calib")
    _out(a, "training")
    model, tok = load(a.model, allow_pickle=a.allow_pickle)
    res = run_finetune(model, tok, a.text, a.out, cfg, scheme=a.scheme, r=a.r, alpha=a.alpha,
                       dropout=a.dropout, targets=[t for t in a.targets.split(",") if t], compute_dtype=a.compute_dtype,
                       merge_adapters=a.merge, merge_scheme=a.merge_scheme, resume=a.resume,
                       eval_tokens=a.eval_tokens, ctx=a.ctx, base_name=a.model,
                       overwrite=a.overwrite, protect=[_source_path(a.model)])
    lines = [f"adapter (PEFT layout): {res['adapter']}"]
    if res["held_out_perplexity_before"] is not None:
        lines.append(f"held-out perplexity of the {res['base_scheme']} model ({res['eval_tokens']} tokens): "
                     f"{res['held_out_perplexity_before']:.3f} -> {res['held_out_perplexity_after']:.3f}")
    if "merged" in res:
        lines.append(f"merged and re-quantized: {res['merged']}"
                     + (f" (held-out perplexity {res['held_out_perplexity_merged']:.3f})"
                        if res.get("held_out_perplexity_merged") is not None else ""))
    _print_training(res, a, lines)


def _plan_calibration(a, model, tok):
    from .data import calib_samples, calibration

    if a.calib:
        return calib_samples(tok, _text(a.calib, "calib"), a.calib_samples, a.calib_len, a.seed)
    return calibration(tok, None, model, a.calib_samples, a.calib_len, a.seed)


def _read_sensitivity(path):
    from .plan import Sensitivity

    try:
        return Sensitivity.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise QuantkitError(f"cannot read the sensitivity file {path}: {msg}") from None


def _sensitivity(a, model, tok, ids):
    from .plan import Sensitivity, measure_sensitivity

    if getattr(a, "sensitivity", None):
        return _read_sensitivity(a.sensitivity)
    if getattr(a, "proxy", False) and a.command == "plan":
        from .plan import proxy_sensitivity

        _guard(model, tok, getattr(a, "head", None) or "bf16")
        return proxy_sensitivity(model, ids, a.schemes, batch_size=a.batch_size)
    _guard(model, tok, getattr(a, "head", None) or "bf16")
    return measure_sensitivity(model, ids, a.schemes, batch_size=a.batch_size)


def cmd_sensitivity(a):
    from . import load
    from .io.atomic import atomic_file

    _out(a, "sensitivity")
    _out(a, "report", a.report)
    model, tok = load(a.model, allow_pickle=a.allow_pickle)
    ids = _plan_calibration(a, model, tok)
    sens = _sensitivity(a, model, tok, ids)
    result = sens.to_dict()
    if a.proxy:
        from .plan import proxy_sensitivity, rank_correlation

        proxy = proxy_sensitivity(model, ids, a.schemes, batch_size=a.batch_size)
        result["proxy"] = proxy.to_dict()["layers"]
        result["rank_correlation"] = rank_correlation(sens, proxy)
    if a.out:
        with atomic_file(a.out, "w", kind="sensitivity", overwrite=a.overwrite,
                         protect=[_source_path(a.model)]) as f:
            f.write(_json(result, 1))
    if a.report:
        from .report import sensitivity_heatmap

        sensitivity_heatmap(sens, a.report)
    if a.json:
        print(_json(result))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"damage of quantizing one layer alone: mean KL (nats/token) on {sens.tokens} calibration tokens")
    t.add_column("layer")
    for sc in sens.schemes:
        t.add_column(sc, justify="right")
    order = sorted(sens.layers, key=lambda n: -sens.kld[n][sens.schemes[-1]])
    for n in order[: a.top] if a.top else order:
        t.add_row(n, *[f"{sens.kld[n][sc]:.2e}" for sc in sens.schemes])
    Console().print(t)
    if sens.head:
        print("embedding/head alone: " + ", ".join(f"{o} {v:.2e} ({sens.head_bytes[o]:,} bytes)" for o, v in sens.head.items()))
    if a.proxy:
        print(f"Hessian-weighted proxy vs measured damage: Spearman rank correlation {result['rank_correlation']:.3f}")
    if a.out:
        print(f"wrote {a.out}")


def cmd_plan(a):
    from . import load
    from .io.atomic import atomic_file
    from .plan import parse_budget, plan_for_budget, plan_for_target, smallest_size

    if (a.budget is None) == (a.max_kld is None and a.max_ppl_increase is None) or (a.max_kld and a.max_ppl_increase):
        raise QuantkitError("give one of --budget SIZE, --max-kld X or --max-ppl-increase P%")
    if a.budget is not None:
        parse_budget(a.budget, 1)  # its spelling, before the model is loaded
    elif a.dry_run:
        raise QuantkitError("--dry-run plans for a --budget; an accuracy target is found by measuring (no dry run)")
    if a.sensitivity:
        _read_sensitivity(a.sensitivity)
    if not a.dry_run:
        _out(a, "plan")
    model, tok = load(a.model, allow_pickle=a.allow_pickle)
    ids = _plan_calibration(a, model, tok)
    sens = _sensitivity(a, model, tok, ids)
    head = a.head  # None: the embedding/head storage is planned too (when measured)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if a.budget is not None:
        budget = parse_budget(a.budget, n_params)
        plan = plan_for_budget(model, sens, budget, head, a.method)
        if a.dry_run:  # what `quantize --plan` would write and take; nothing is written
            from .estimate import estimate_quantize

            est = estimate_quantize(model, plan.config(), ids if a.method != "rtn" else None, batch_size=a.batch_size)
            res = {"size_bytes": plan.size_bytes, "smallest_bytes": smallest_size(model, sens, head), "budget_bytes": budget,
                   "counts": plan.counts(), "head": plan.head, "estimate": est.to_dict()}
            print(_json(res) if a.json else
                  f"the plan would be {plan.size_bytes:,} bytes (budget {budget:,}; smallest reachable "
                  f"{res['smallest_bytes']:,}), layers {plan.counts()}, head {plan.head}; quantizing it: ~{est.seconds:.1f} s, "
                  f"peak memory ~{_mb(est.peak_rss_bytes)} (probe {est.probe_seconds:.1f} s)")
            return
    else:
        plan = plan_for_target(model, sens, ids, max_kld=a.max_kld, max_ppl_increase=a.max_ppl_increase, head=head,
                               method=a.method,
                               calib=ids if a.method != "rtn" else None)
    with atomic_file(a.out, "w", kind="plan", overwrite=a.overwrite, protect=[_source_path(a.model)]) as f:
        f.write(plan.to_json())
    res = {"out": a.out, "size_bytes": plan.size_bytes, "bits_per_param": 8 * plan.size_bytes / n_params,
           "predicted_kld": plan.predicted_kld, "measured": plan.measured, "counts": plan.counts()}
    if a.json:
        print(_json(res))
        return
    print(f"wrote {a.out}: {plan.size_bytes:,} bytes ({res['bits_per_param']:.2f} bits/param), "
          f"predicted KL {plan.predicted_kld:.4f}, layers {plan.counts()}"
          + (f"; measured KL {plan.measured['kld']:.4f}, perplexity +{plan.measured['ppl_increase'] * 100:.2f}%"
             if plan.measured else ""))


# ----------------------------------------------------------------------------- parser
def _option_type(f):
    t = str(f.type)
    if t == "float":
        return _number(float)
    if t == "int":
        return _number(int)
    return str


def _option_args(g, registry: dict, names=None) -> None:
    """One flag per option field of each method / transform class in `registry` (those named
    in `names`, default all) that declares one (`field(metadata={"flag": ..., "help": ...})`):
    a bool True by default gets --no-FLAG, a False one --FLAG; a transform's flag with `const`
    turns the transform on. Values are checked by the class itself (its __post_init__)."""
    from dataclasses import MISSING, fields

    for cls in registry.values():
        if names is not None and cls.name not in names:
            continue
        for f in fields(cls):
            flag, help_ = f.metadata.get("flag"), f.metadata.get("help", "")
            if not flag:
                continue
            dest = f"opt__{cls.name}__{f.name}"
            where = f"{cls.name}: " if not f.metadata.get("enables") else ""
            if f.default is True:
                g.add_argument("--no-" + flag[2:], dest=dest, action="store_const", const=False, default=None,
                               help=f"{where}{help_} (default on)")
            elif f.default is False:
                g.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=f"{where}{help_}")
            elif f.metadata.get("enables"):
                g.add_argument(flag, dest=dest, nargs="?", const=str(f.default), default=None, metavar=f.name.upper(),
                               help=f"{cls.summary}; {help_} ({f.default} if no value)")
            else:
                default = "" if f.default is MISSING else f" (default {f.default})"
                g.add_argument(flag, dest=dest, type=_option_type(f), default=None, metavar=f.name.upper(),
                               help=f"{where}{help_}{default}")


def _given_options(a, name: str) -> dict:
    prefix = f"opt__{name}__"
    return {k[len(prefix):]: v for k, v in vars(a).items() if k.startswith(prefix) and v is not None}


def _flags(cls, opts: dict) -> dict[str, str]:
    """field name -> the flag it was given with (--no-act-order for act_order=False)."""
    from dataclasses import fields

    out = {}
    for f in fields(cls) if cls is not None else ():
        if f.name in opts and f.metadata.get("flag"):
            flag = f.metadata["flag"]
            out[f.name] = "--no-" + flag[2:] if f.default is True else flag
    return out


def _build(cls, opts: dict, make):
    """`make()` (the instance the options describe); a value its class refuses is one error
    naming the flag it came from."""
    try:
        return make()
    except (QuantkitError, ValueError, TypeError) as e:
        flags = _flags(cls, opts)
        named = [fl for n, fl in flags.items() if n.replace("_", " ") in str(e) or n in str(e)] or list(flags.values())
        raise QuantkitError(f"{', '.join(named)}: {e}" if named else str(e)) from None


def _method(a, name=None):
    """The method instance the flags ask for: --method NAME (default rtn, or llm-int8 for
    --scheme llm-int8 when None) with its options; an option of another method is refused."""
    from .algorithms import METHODS, method_of

    name = name if name is not None else getattr(a, "method", None)
    for other, cls in METHODS.items():
        if other != name and _given_options(a, other):
            flags = ", ".join(_flags(cls, _given_options(a, other)).values())
            raise QuantkitError(f"{flags}: option(s) of method {other}, not of {name or 'rtn'} (add --method {other})")
    if name is None:
        return None
    opts = _given_options(a, name)
    return _build(METHODS.get(name), opts, lambda: method_of({"name": name, "options": opts}))


def _transforms(a) -> tuple:
    """The block transforms whose enabling flag was given (--smooth [ALPHA] for SmoothQuant)."""
    from dataclasses import fields

    from .algorithms import TRANSFORMS, transform_of

    out = []
    for name, cls in TRANSFORMS.items():
        opts = _given_options(a, name)
        if any(f.metadata.get("enables") and f.name in opts for f in fields(cls)):
            out.append(_build(cls, opts, lambda: transform_of({"name": name, "options": opts})))
    return tuple(out)


def _calibration_args(p, gptq=True):
    """--calib and its sampling options; with gptq, the GPTQ solver's options too."""
    g = p.add_argument_group("calibration (gptq, w8a8-static-*, transforms)" if gptq else "calibration (w8a8-static-*, transforms)")
    g.add_argument("--calib", help="calibration text file (its last-quarter articles are used) or hf:NAME; "
                                  "without it the model calibrates on text it generates itself")
    g.add_argument("--calib-samples", type=POS_INT, default=128, help="number of samples (default 128)")
    g.add_argument("--calib-len", type=POS_INT, default=512, help="tokens per sample (default 512)")
    g.add_argument("--seed", type=NONNEG_INT, default=0, help="seed for drawing the samples")
    if not gptq:
        return g
    g.add_argument("--batch-size", type=POS_INT, default=8, help="samples per forward pass")
    g.add_argument("--sequential", action="store_true", help="quantize a block's Linears in sequential groups (q/k/v, o, gate/up, down)")
    from .algorithms import METHODS

    _option_args(g, METHODS)
    return g


def _transform_args(g):
    from .algorithms import TRANSFORMS

    _option_args(g, TRANSFORMS)


def _pickle_arg(p):
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pytorch_model.bin weights (pickle files, with torch's weights-only unpickler) when a "
                        "folder has no safetensors; refused by default")


def _overwrite_arg(p):
    p.add_argument("--overwrite", action="store_true",
                   help="replace what is at the output path even if quantkit did not write it (never the source model); "
                        "without it only a previous quantkit output of the same kind is replaced")


def _training_args(p, lr, steps):
    p.add_argument("--text", required=True, help="text file (or hf:NAME): trains on its calibration part (the WikiText "
                                                  "file's last-quarter articles), reports perplexity on its evaluation part")
    p.add_argument("--out", required=True, help="output folder (the checkpoint for --resume lives in OUT/checkpoint)")
    _overwrite_arg(p)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=POS_INT, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=POS_INT, default=4, help="sequences per step (default 4)")
    g.add_argument("--seq-len", type=_number(int, 2), default=256, help="tokens per sequence (default 256)")
    g.add_argument("--lr", type=POS_FLOAT, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--weight-decay", type=NONNEG_FLOAT, default=0.0)
    g.add_argument("--warmup", type=NONNEG_INT, default=0, help="linear warm-up steps")
    g.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    g.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw8bit keeps both moments in 8 bits (block-wise, blocks of 2048)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)")
    g.add_argument("--seed", type=NONNEG_INT, default=0)
    g.add_argument("--log-every", type=POS_INT, default=10, help="log the mean loss every N steps (with -v)")
    g.add_argument("--save-every", type=NONNEG_INT, default=0, help="write a resumable checkpoint every N steps (always at the end)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same batches, same loss curve)")
    g.add_argument("--eval-tokens", type=NONNEG_INT, default=4096, help="held-out tokens for perplexity (0 = skip)")
    g.add_argument("--ctx", type=_number(int, 2), default=512, help="evaluation window length")
    p.add_argument("--json", action="store_true")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one `error:` line and exit 2 (as every other bad input)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .algorithms import METHODS

    p = _Parser(prog="quantkit", description="Quantize models and measure size, quality and speed.",
                                epilog=f"scheme grammar: {GRAMMAR}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    m = sub.add_parser("models", help="list or fetch the built-in models")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("name", nargs="?", default="smollm2")
    m.set_defaults(fn=cmd_models)

    i = sub.add_parser("inspect", help="what a model holds, and its size under each scheme",
                       description="Parameters, dtypes, memory, disk, the role breakdown and the size under each scheme.")
    i.add_argument("model", help=MODEL_HELP)
    _pickle_arg(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_inspect)

    q = sub.add_parser("quantize", help="quantize a model and save a quantkit checkpoint",
                       description="Quantize MODEL with a method (rtn, gptq, ...) and save it in quantkit's safetensors layout.")
    q.add_argument("model", help=MODEL_HELP)
    _pickle_arg(q)
    q.add_argument("--scheme", help=f"one of: {GRAMMAR} (or --plan)")
    q.add_argument("--plan", help="per-layer schemes from quantkit plan (plan.json); --method overrides the plan's")
    q.add_argument("--dry-run", action="store_true", help="print the exact size of the output and estimates of the "
                                                           "quantization time and peak memory (from a short probe); write nothing")
    q.add_argument("--method", default=None, choices=sorted(METHODS),
                   help="how values are chosen: " + "; ".join(f"{n}: {c.summary}" for n, c in sorted(METHODS.items()))
                        + " (default rtn)")
    q.add_argument("--head", default=None, choices=HEAD_CHOICES,
                   help="storage of embeddings and output head (default bf16; tied weights stay tied)")
    q.add_argument("--strict-groups", action="store_true",
                   help="refuse layers whose input width the group size does not divide (default: use the largest smaller group that does)")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    _overwrite_arg(q)
    g = _calibration_args(q)
    _transform_args(g)
    g.add_argument("--offload-dir", help="stream: keep the float weights on disk and load one block at a time "
                                        "(non-safetensors sources are expanded there once)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(fn=cmd_quantize)

    from .io.ggml_mix import FTYPES

    x = sub.add_parser("export", help="write GGUF (llama.cpp), GPTQ or compressed-tensors",
                       description="--gguf TYPE: write MODEL as a GGUF file. Float weights are rounded with llama.cpp's "
                                   "reference rounding (K-quant mixes follow llama.cpp's per-tensor rules), or with --method "
                                   "gptq solved onto the same block types; a quantkit checkpoint whose grid the type holds "
                                   "(groups of 32) is repacked without a second rounding. --to gptq|compressed-tensors: "
                                   "quantize MODEL with one integer scheme (or take a quantkit checkpoint as it is) and "
                                   "write the GPTQ layout (qweight/qzeros/scales/g_idx) or compressed-tensors' "
                                   "pack-quantized layout, with a model card (README.md).")
    x.add_argument("model", help=MODEL_HELP)
    _pickle_arg(x)
    x.add_argument("--gguf", type=str.upper, choices=list(FTYPES), metavar="TYPE",
                   help=f"GGUF file type: {', '.join(FTYPES)}")
    x.add_argument("--to", choices=["gptq", "compressed-tensors"], help="write this checkpoint layout instead of GGUF")
    x.add_argument("--scheme", help="--to: integer weight scheme (default: int4 symmetric with the largest group of "
                                    "128/64/32 that divides every layer's width)")
    x.add_argument("--eval-text", help="--to: measure perplexity/KLD on this text (its evaluation part) for the model card")
    x.add_argument("--eval-tokens", type=POS_INT, default=8192, help="--to: tokens evaluated for the card (default 8192)")
    x.add_argument("--ctx", type=_number(int, 2), default=512, help="--to: evaluation window length (default 512)")
    x.add_argument("--speed", action="store_true", help="--to: also measure decode tokens/s for the card")
    x.add_argument("--out", help="output .gguf file, or folder for --to (default: NAME-GPTQ-4bit-128g style); "
                                 "written atomically")
    _overwrite_arg(x)
    x.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name, when it cannot be told from the source")
    x.add_argument("--method", default="rtn", choices=[n for n, c in METHODS.items() if not c.kinds or "ggml" in c.kinds],
                   help="rtn: llama.cpp's rounding; gptq: solve each Linear onto its GGUF block grid (needs calibration)")
    _calibration_args(x)
    x.add_argument("--json", action="store_true")
    x.set_defaults(fn=cmd_export)

    e = sub.add_parser("eval", help="perplexity, KLD, top-1 vs a reference, size, speed",
                       description="Perplexity, KL divergence and top-1 agreement against a reference, sizes, decode speed.")
    e.add_argument("model", help=MODEL_HELP)
    _pickle_arg(e)
    e.add_argument("--text", help="text file (its evaluation part is used) or hf:NAME[:CONFIG][:SPLIT]")
    e.add_argument("--reference", help="reference model for KL divergence and top-1 agreement")
    e.add_argument("--max-tokens", type=POS_INT, default=None, help="evaluate on the first N tokens")
    e.add_argument("--ctx", type=_number(int, 2), default=512, help="window length (non-overlapping windows)")
    e.add_argument("--speed", action="store_true", help="also measure greedy decode tokens/s at batch 1")
    e.add_argument("--no-compile", action="store_true",
                   help="with --speed: time the eager decode loop (default: compiled decode steps where a C++ "
                        "compiler exists; the compile, ~30 s on 2 cores, is untimed and reported apart)")
    e.add_argument("--int8-activations", action="store_true",
                   help="run the quantized layers with int8 activations (quantkit's native kernels, every call: "
                        "perplexity and KLD measure the approximation, --speed its decode)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=cmd_eval)

    for name, helptext, desc in (
            ("compare", "quantize, reload, evaluate several schemes side by side",
             "Quantize, save, reload, evaluate and time several schemes side by side."),
            ("demo", "compare on the built-in smollm2 model, offline",
             "compare on the built-in smollm2 model (fetched on first use), fully offline.")):
        c = sub.add_parser(name, help=helptext, description=desc)
        if name == "compare":
            c.add_argument("model", help=MODEL_HELP)
            _pickle_arg(c)
        from .evaluate.compare import DEFAULT_SCHEMES

        c.add_argument("--schemes", default=DEFAULT_SCHEMES, help=f"comma-separated schemes (default {DEFAULT_SCHEMES})")
        c.add_argument("--text", help="text file for perplexity; without it, KLD/top-1 on text the fp32 model generates")
        c.add_argument("--max-tokens", type=POS_INT, default=8192)
        c.add_argument("--ctx", type=_number(int, 2), default=512)
        c.add_argument("--head", default=None, choices=HEAD_CHOICES, help="storage of embeddings and output head")
        c.add_argument("--no-speed", action="store_true", help="skip decode timing")
        c.add_argument("--no-compile", action="store_true",
                       help="time the eager decode loop (default: compiled decode steps where a C++ compiler exists; "
                            "one compile per layer kind, ~30 s on 2 cores, untimed)")
        _transform_args(_calibration_args(c, gptq=False))
        c.add_argument("--report", default=None if name == "compare" else "reports/demo",
                       help="folder for report.md, report.html (self-contained), results.json and PNG plots")
        _overwrite_arg(c)
        c.add_argument("--json", action="store_true")
        c.set_defaults(fn=cmd_demo if name == "demo" else cmd_compare)
    g = sub.add_parser("generate", help="greedy text from a model, streamed, with its speed",
                       description="Continue --prompt greedily with MODEL (optionally quantized on the fly with "
                                   "--scheme), printing the text as it comes and tokens/s at the end. Decode steps "
                                   "run through torch.compile where a C++ compiler exists (--no-compile: eager).")
    g.add_argument("model", help=MODEL_HELP)
    _pickle_arg(g)
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=POS_INT, default=64)
    g.add_argument("--scheme", default=None, help="quantize the loaded model with this scheme first (RTN)")
    g.add_argument("--head", default=None, choices=HEAD_CHOICES, help="with --scheme: storage of embeddings and head")
    g.add_argument("--no-compile", action="store_true", help="decode eagerly (no torch.compile)")
    g.add_argument("--int8-activations", action="store_true",
                   help="decode with int8 activations (per block of 32-128 values, integer multiply: faster, "
                        "approximate; quantkit's native kernels)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    g.add_argument("--json", action="store_true", help="print the result as JSON instead of streaming")
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("qat", help="quantization-aware training, then convert and save",
                       description="Train MODEL with its Linears fake-quantized to SCHEME (straight-through gradients), "
                                   "then convert to real quantized layers; writes OUT/model (a quantkit checkpoint).")
    t.add_argument("model", help=MODEL_HELP)
    _pickle_arg(t)
    t.add_argument("--scheme", default="int4-g128", help="weight scheme to train for (default int4-g128)")
    t.add_argument("--lsq", action="store_true", help="learn the quantization scales too (LSQ; integer schemes)")
    t.add_argument("--head", default=None, choices=HEAD_CHOICES, help="storage of embeddings and output head (default bf16)")
    _training_args(t, lr=2e-5, steps=60)
    t.set_defaults(fn=cmd_qat)

    f = sub.add_parser("finetune", help="QLoRA: LoRA adapters over a frozen NF4 base (PEFT)",
                       description="Quantize MODEL to SCHEME (NF4 blocks of 64 with double quantization by default), train "
                                   "LoRA adapters on text, write OUT/adapter (peft loads it) and, with --merge, OUT/merged.")
    f.add_argument("model", help=MODEL_HELP)
    _pickle_arg(f)
    f.add_argument("--scheme", default="nf4-b64-dq", help="frozen base's scheme (default nf4-b64-dq)")
    f.add_argument("--r", type=POS_INT, default=8, help="LoRA rank (default 8)")
    f.add_argument("--alpha", type=POS_FLOAT, default=32, help="LoRA alpha (default 32)")
    f.add_argument("--dropout", type=_number(float, 0, high=0.999999), default=0.05, help="LoRA dropout (default 0.05)")
    f.add_argument("--targets", default="q_proj,v_proj", help="comma-separated Linear names (default q_proj,v_proj)")
    f.add_argument("--compute-dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the forward pass")
    f.add_argument("--merge", action="store_true", help="also fold the adapters into the weights and re-quantize")
    f.add_argument("--merge-scheme", help="scheme of the merged weights (default: the base's; e.g. int8 keeps more of the update)")
    _training_args(f, lr=2e-4, steps=60)
    f.set_defaults(fn=cmd_finetune)
    def _plan_common(p):
        p.add_argument("model", help=MODEL_HELP)
        _pickle_arg(p)
        from .plan import DEFAULT_SCHEMES as PS

        p.add_argument("--schemes", default=PS, help=f"candidate schemes per layer (default {PS})")
        g = p.add_argument_group("calibration text (sensitivity is measured on it)")
        g.add_argument("--calib", help="text file (its last-quarter articles) or hf:NAME; without it, model-generated text")
        g.add_argument("--calib-samples", type=POS_INT, default=4, help="number of samples (default 4)")
        g.add_argument("--calib-len", type=POS_INT, default=256, help="tokens per sample (default 256)")
        g.add_argument("--seed", type=NONNEG_INT, default=0)
        g.add_argument("--batch-size", type=POS_INT, default=4, help="samples per forward pass")
        p.add_argument("--json", action="store_true")

    sn = sub.add_parser("sensitivity", help="damage of quantizing each layer alone, per scheme",
                        description="The damage (KL divergence vs the float model) of quantizing each layer alone, per scheme.")
    _plan_common(sn)
    sn.add_argument("--out", help="write the measurements as JSON (reusable by plan --sensitivity)")
    sn.add_argument("--report", help="folder for sensitivity.png (heat map)")
    _overwrite_arg(sn)
    sn.add_argument("--top", type=NONNEG_INT, default=20, help="rows shown (0 = all)")
    sn.add_argument("--proxy", action="store_true",
                    help="also compute the cheap Hessian-weighted proxy and its rank correlation with the measured damage")
    sn.set_defaults(fn=cmd_sensitivity)

    pl = sub.add_parser("plan", help="a scheme per layer under a size budget or quality target",
                        description="Choose a scheme per layer from --schemes: the least predicted damage within --budget "
                                    "(exact knapsack), or the smallest plan whose measured KL / perplexity increase meets "
                                    "--max-kld / --max-ppl-increase. Apply it with quantkit quantize MODEL --plan FILE.")
    _plan_common(pl)
    pl.add_argument("--budget", help="size of model.safetensors: e.g. 70MB, 66MiB, or 4.5bpw (bits per parameter)")
    pl.add_argument("--max-kld", type=POS_FLOAT, help="mean KL (nats/token) the planned model may reach, measured")
    pl.add_argument("--max-ppl-increase", type=_percent, help="perplexity increase allowed, measured, e.g. 1%% or 0.01")
    pl.add_argument("--sensitivity", help="reuse measurements written by quantkit sensitivity --out")
    pl.add_argument("--proxy", action="store_true", help="plan on the cheap Hessian-weighted proxy instead of measured KL")
    pl.add_argument("--method", default="rtn", choices=[n for n, c in METHODS.items() if not c.kinds or "int" in c.kinds],
                    help="method the plan is applied with")
    pl.add_argument("--head", default=None, choices=HEAD_CHOICES,
                    help="pin the storage of embeddings and output head (default: planned, bf16 or int8, with the layers)")
    pl.add_argument("--dry-run", action="store_true", help="with --budget: print the plan's exact size and the estimated time "
                                                            "and peak memory of quantizing with it; write nothing")
    pl.add_argument("--out", default="plan.json", help="plan file (default plan.json)")
    _overwrite_arg(pl)
    pl.set_defaults(fn=cmd_plan)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (already printed as one error: line)
        return e.code if isinstance(e.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for "the command that made it" in reports
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if not args.verbose:  # transformers' own bars (GGUF de-quantizing, weight loading) are noise here
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = {s: signal.signal(s, _interrupt) for s in _SIGNALS} if main_thread else {}
    try:
        args.fn(args)
    except QuantkitError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except _Signalled as e:
        print(f"interrupted by {signal.Signals(e.signum).name}; no partial output was left", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("interrupted; no partial output was left", file=sys.stderr)
        return 130
    except OSError as e:  # the disk or the OS refused (full, read-only, permissions): say what, no traceback
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: cannot access{where}: {(e.strerror or str(e)).lower()}", file=sys.stderr)
        return 2
    except MemoryError:
        print("error: out of memory; try a smaller model, fewer --calib-samples or --batch-size, or streaming "
              "(quantize --offload-dir)", file=sys.stderr)
        return 2
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


class _Signalled(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised where the process is so that the same cleanup as Ctrl-C runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _interrupt(signum, frame):
    raise _Signalled(signum)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
