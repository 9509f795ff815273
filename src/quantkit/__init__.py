"""quantkit: make neural networks smaller and faster by quantization, and measure it.

    import quantkit as qk
    model, tok = qk.load("smollm2")                     # alias, HF folder, hub id or .gguf
    qmodel = qk.quantize(model, "int4-g128")            # method="rtn" | "gptq" | qk.GPTQ(damp=0.05) ...
    qk.save(qmodel, "out/", tok)                        # reload with qk.load("out/")
    qk.export_gguf(model, tok, "out.gguf", "Q4_K_M")    # a GGUF file llama.cpp runs
    print(qk.evaluate(qmodel, tok, text=qk.text("wiki.test.raw"), reference=model))
"""
from __future__ import annotations

import logging

from .errors import DataError, QuantkitError, SchemeError, SourceError
from .formats import QuantizedWeight, dequantize, storage_bytes
from .formats import quantize as quantize_tensor
from .algorithms import METHODS, TRANSFORMS, Method, Transform
from .config import QuantConfig, Rule, make_config
from .scheme import GRAMMAR, Scheme, parse_scheme

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(source, dtype=None, allow_pickle=False, dequantize=True):
    """Load a model and its tokenizer from an alias (`smollm2`), a Hugging Face folder or hub
    id, a `.gguf` file, a `.safetensors` file next to its config, or a quantkit checkpoint.

    Every weight the model needs must be in the source (a missing, unexpected or misshapen
    tensor, NaN/Inf weights, or a model too large for this machine's memory is refused with
    SourceError). Pickle weights (pytorch_model.bin alone) are refused unless `allow_pickle`.
    A GGUF with `dequantize=False` keeps its quantized tensors as llama.cpp's bytes (run by
    quantkit's kernels) instead of fp32 weights; `model.quantkit_gguf_kept` says what was kept."""
    import torch

    from .io.load import load as _load
    from .io.load import resolve

    model, tok = _load(source, dtype=dtype or torch.float32, allow_pickle=allow_pickle, dequantize=dequantize)
    src = resolve(source)
    if src.path is not None:  # qk.save / qk.export_gguf never write over it
        object.__setattr__(model, "quantkit_source", str(src.path))
    return model, tok


def quantize(model, scheme="int8", method=None, head=None, rules=(), strict_groups=False,
             inplace=False, progress=True, calib=None, tokenizer=None, calib_samples=128, calib_len=512,
             seed=0, batch_size=8, sequential=False, transforms=()):
    """Quantize every Linear layer of `model` (a copy unless `inplace`) and return it.

    scheme: a scheme string (see `quantkit.GRAMMAR`), a Scheme, or a whole QuantConfig;
    method: a name in `qk.METHODS` ("rtn", "gptq", ...) or an instance
    with options (`qk.GPTQ(damp=0.05, act_order=False)`); None is rtn (llm-int8 for the
    llm-int8 scheme). head: storage of embeddings and output head ("bf16", "fp16", "fp32",
    "int8", "keep"; None = bf16, or the scheme itself when the scheme is a plain cast);
    rules: `Rule(pattern, scheme, method)` list for mixed precision (first match wins).
    transforms: block transforms run before each block is quantized (names or instances,
    e.g. `qk.SmoothQuant(alpha=0.5)`, the paper's default; "auto" chooses it per group).
    Calibrated methods (gptq), static activation schemes (`w8a8-static-mse`, ...) and
    transforms take `calib`: a text (e.g. `qk.text(path, "calib")`, needs `tokenizer`) or
    token ids [N, L]; with calib=None they calibrate on text the model generates itself (a
    warning says so). `calib_samples` x `calib_len` tokens, drawn with `seed`; `sequential`
    quantizes a block's Linears group by group (q/k/v, o, gate/up, down).
    """
    from .modules import check_float
    from .pipeline import needs_calibration, quantize_model, validate_config

    check_float(model)  # before calibration text is generated from it
    if isinstance(scheme, QuantConfig):
        cfg = scheme
    else:
        cfg = make_config(scheme, method, head, rules, strict_groups, sequential, transforms)
    validate_config(cfg)
    ids = None
    if needs_calibration(cfg):
        import torch

        from .data import calib_samples as sample_text, calibration

        if isinstance(calib, torch.Tensor):
            ids = calib
        elif tokenizer is None:
            raise DataError("calibrated methods need a tokenizer to tokenize the calibration text: pass tokenizer=")
        elif calib is None:
            ids = calibration(tokenizer, None, model, calib_samples, calib_len, seed)
        else:
            ids = sample_text(tokenizer, calib, calib_samples, calib_len, seed)
    return quantize_model(model, cfg, inplace=inplace, progress=progress, calib=ids, batch_size=batch_size)


def save(model, out_dir, tokenizer=None, overwrite=False):
    """Save a quantized model in quantkit's safetensors layout (atomic); reload with `load`.

    A previous quantkit checkpoint at `out_dir` is replaced; any other file or folder there is
    refused (OutputError) unless `overwrite=True`. The model's source is never replaced."""
    from .io.checkpoint import save as _save

    return _save(model, out_dir, tokenizer, overwrite=overwrite, protect=_sources(model))


def _sources(model) -> list:
    """Where `model` was loaded from (io.load records it), for keeping outputs off it."""
    src = getattr(model, "quantkit_source", None)
    return [src] if src else []


def export_gguf(model, tokenizer, path, ftype="Q8_0", method="rtn", calib=None, tokenizer_pre=None,
                progress=True, overwrite=False, **calib_options):
    """Write `model` as a GGUF file of type `ftype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
    Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K) that llama.cpp runs.

    method="rtn": float weights get llama.cpp's reference rounding; an already quantized model
    is repacked where its grid fits (see io/gguf.py). method="gptq" (or `GPTQ(...)` with
    options): every Linear is first solved by GPTQ onto the GGUF block type llama.cpp's rules
    give it in a file of `ftype` (calibration as in `quantize`: `calib`, `tokenizer`, and
    `calib_samples`, `calib_len`, `seed`, `batch_size`, `sequential`), so the file is an
    ordinary GGUF with lower error.
    Returns an ExportSummary (path, bytes, tensor types, repacked tensors).
    """
    from .io.gguf import export_gguf as _export

    if str(method) != "rtn":
        model = quantize_for_gguf(model, tokenizer, ftype, method=method, calib=calib, progress=progress,
                                  **calib_options)
    elif calib is not None or calib_options:
        raise SchemeError("calibration options apply to calibrated methods such as method='gptq' only")
    return _export(model, tokenizer, path, ftype, tokenizer_pre=tokenizer_pre, progress=progress, overwrite=overwrite,
                   protect=_sources(model))


def quantize_for_gguf(model, tokenizer, ftype, method="gptq", calib=None, progress=True, **calib_options):
    """Quantize every Linear of `model` onto the GGUF block type a file of `ftype` gives it
    (llama.cpp's per-tensor rules), with `method` (a name or an instance such as
    `GPTQ(damp=0.05)`); embeddings and head stay as they are. `calib_options`: those of
    `quantize` (calib_samples, calib_len, seed, batch_size, sequential)."""
    from .algorithms import method_of
    from .io.gguf import plan_types
    from .scheme import gguf_scheme

    method = method_of(method)
    types = plan_types(model, ftype)
    if not types or any(t in ("F32", "F16", "BF16") for t in types.values()):
        raise SchemeError(f"{ftype} is a float file type: there is nothing for {method.name} to solve; use method='rtn'")
    rules = tuple(Rule(name, gguf_scheme(t), method) for name, t in types.items())
    cfg = make_config(gguf_scheme(next(iter(types.values()))), method, "keep", rules, True,
                      bool(calib_options.pop("sequential", False)))
    return quantize(model, cfg, calib=calib, tokenizer=tokenizer, progress=progress, **calib_options)


def text(source, split="eval"):
    """Read a text file (or `hf:NAME[:CONFIG][:SPLIT]`) and take its evaluation part ("eval",
    everything before the articles of the last quarter), calibration part ("calib") or "all"."""
    from .data import text as _text

    return _text(source, split)


def evaluate(model, tokenizer, text=None, reference=None, ctx=512, max_tokens=None, speed=False):
    """Perplexity (and KLD / top-1 agreement against `reference`) on `text`, sizes, and with
    speed=True greedy decode tokens/s at batch 1. Returns a dict (see README for keys)."""
    from .evaluate.run import evaluate_model

    return evaluate_model(model, tokenizer, text=text, reference=reference, ctx=ctx,
                          max_tokens=max_tokens, speed=speed)


def inspect(model):
    """Parameter count, dtypes, memory, per-module-type breakdown and size under each scheme."""
    from .evaluate.inspect import inspect_model

    return inspect_model(model)


def prepare_qat(model, scheme="int4-g128", lsq=False, inplace=False):
    """Quantization-aware training, step 1: a copy of `model` whose Linears see their quantized
    weights in the forward pass (straight-through gradients; `lsq=True` learns the scales).
    Train it (e.g. `qk.train.train(model, ids, qk.train.TrainConfig(...))`), then `convert`."""
    from .train.qat import prepare_qat as _prepare

    return _prepare(model, scheme, lsq=lsq, inplace=inplace)


def convert(model, head=None):
    """Quantization-aware training, step 3: QuantLinear layers holding exactly the weights the
    trained model's forward pass used; `save` and `evaluate` take the result."""
    from .train.qat import convert as _convert

    return _convert(model, head=head)


def prepare_qlora(model, scheme="nf4-b64-dq", r=8, alpha=32, dropout=0.05, targets=("q_proj", "v_proj"),
                  compute_dtype="fp32"):
    """QLoRA: a 4-bit (NF4, double-quantized) copy of `model` with trainable LoRA adapters on
    `targets`; save them with `qk.train.save_adapter` (PEFT layout), fold them in with
    `qk.train.merge`."""
    from .train.qlora import prepare_qlora as _prepare

    return _prepare(model, scheme, r, alpha, dropout, targets, compute_dtype)


def set_activations(model, mode="int8"):
    """Run a quantized model's weight-only layers with int8 activations ("int8": at decode, each
    layer's input quantized per block of 32-128 values to int8, integer multiply; faster,
    approximate, its cost measured by benchmarks/decode_speed.py; "int8-all": every call, prefill
    too) or back on the exact path ("exact", the default). Returns (layers switched, quantized
    layers); see modules.set_activations."""
    from .modules import set_activations as _set

    return _set(model, mode)


# every registered method and transform class under its class name (qk.GPTQ, qk.RTN,
# qk.SmoothQuant, ...): a new one in algorithms/ needs no line here
_REGISTERED = {cls.__name__: cls for cls in (*METHODS.values(), *TRANSFORMS.values())}
globals().update(_REGISTERED)

__all__ = [
    "load", "quantize", "save", "set_activations", "export_gguf", "prepare_qat", "convert", "prepare_qlora", "quantize_for_gguf", "text", "evaluate", "inspect", "parse_scheme", "make_config",
    "Scheme", "QuantConfig", "Rule", "Method", "Transform", "METHODS", "TRANSFORMS", *_REGISTERED, "QuantizedWeight", "quantize_tensor", "dequantize", "storage_bytes",
    "GRAMMAR", "QuantkitError", "SchemeError", "SourceError", "DataError",
]


def __getattr__(name):
    # transformers integration, imported on first use (importing it registers "quantkit" with transformers)
    if name in ("QuantkitConfig", "QuantkitHfQuantizer"):
        from .io import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
