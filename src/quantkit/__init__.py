"""quantkit: make neural networks smaller and faster by quantization, and measure it.

    import quantkit as qk
    model, tok = qk.load("smollm2")                     # alias, HF folder, hub id or .gguf
    qmodel = qk.quantize(model, "int4-g128")            # method="rtn" | "llm-int8"
    qk.save(qmodel, "out/", tok)                        # reload with qk.load("out/")
    print(qk.evaluate(qmodel, tok, text=qk.text("wiki.test.raw"), reference=model))
"""
from __future__ import annotations

import logging

from .errors import DataError, QuantkitError, SchemeError, SourceError
from .formats import QuantizedWeight, dequantize, storage_bytes
from .formats import quantize as quantize_tensor
from .scheme import GRAMMAR, QuantConfig, Rule, Scheme, make_config, parse_scheme

__version__ = "0.1.0"
logging.getLogger(__name__).addHandler(logging.NullHandler())


def load(source, dtype=None):
    """Load a model and its tokenizer from an alias (`smollm2`), a Hugging Face folder or hub
    id, a `.gguf` file, a `.safetensors` file next to its config, or a quantkit checkpoint."""
    import torch

    from .io.load import load as _load

    return _load(source, dtype=dtype or torch.float32)


def quantize(model, scheme="int8", method="rtn", head=None, rules=(), strict_groups=False,
             inplace=False, progress=True):
    """Quantize every Linear layer of `model` (a copy unless `inplace`) and return it.

    scheme: a scheme string (see `quantkit.GRAMMAR`) or Scheme; method: "rtn" or "llm-int8";
    head: storage of embeddings and output head ("bf16", "fp16", "fp32", "int8", "keep");
    None = 16-bit (bf16), or the scheme itself when the scheme is a plain cast;
    rules: `Rule(pattern, scheme, method)` list for mixed precision (first match wins).
    """
    from .pipeline import quantize_model

    cfg = scheme if isinstance(scheme, QuantConfig) else make_config(scheme, method, head, rules, strict_groups)
    return quantize_model(model, cfg, inplace=inplace, progress=progress)


def save(model, out_dir, tokenizer=None):
    """Save a quantized model in quantkit's safetensors layout (atomic); reload with `load`."""
    from .io.checkpoint import save as _save

    return _save(model, out_dir, tokenizer)


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


__all__ = [
    "load", "quantize", "save", "text", "evaluate", "inspect", "parse_scheme", "make_config",
    "Scheme", "QuantConfig", "Rule", "QuantizedWeight", "quantize_tensor", "dequantize", "storage_bytes",
    "GRAMMAR", "QuantkitError", "SchemeError", "SourceError", "DataError",
]
