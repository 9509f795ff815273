"""`inspect_model`: what a model holds, and what it would weigh under each scheme.

A float model gets the exact size of the quantkit checkpoint under each scheme of
INSPECT_SCHEMES. A model that is already quantized (a loaded quantkit checkpoint, or the
result of `qk.quantize`) cannot be quantized again; its one row is what it stores: the exact
size of the checkpoint `qk.save` writes for it, keyed by its schemes ("int8 (as stored)").
"""
from __future__ import annotations

from ..io.checkpoint import checkpoint_bytes, expected_weights_bytes
from ..modules import quantized_summary
from ..config import make_config
from .size import memory_bytes, module_breakdown, param_dtypes, weight_count

INSPECT_SCHEMES = ("fp32", "bf16", "fp16", "fp8-e4m3", "int8", "llm-int8", "int8-g128", "int4-g128", "int4-g32",
                   "int4", "int3-g128", "int2-g64", "nf4", "nf4-dq", "fp4-dq", "w8a8-dynamic", "w8a8-static-mse",
                   "gguf-q8_0", "gguf-q4_0")


def inspect_model(model, schemes=INSPECT_SCHEMES) -> dict:
    """parameters (weights the model represents: a quantized layer counts its [out, in] weight),
    dtypes and memory as held, the role breakdown, and `sizes` (scheme -> bytes, bits per
    parameter, embeddings/head storage); `quantized` is the stored schemes, or None for a float model."""
    params = weight_count(model)
    stored = quantized_summary(model)
    sizes = {}
    if stored is None:
        for s in schemes:
            cfg = make_config(s)
            b = expected_weights_bytes(model, cfg)
            sizes[s] = {"bytes": b, "bits_per_param": 8 * b / params, "head": cfg.head}
    else:
        info = getattr(model, "quantkit", None)
        head = ((getattr(info, "head", None) or {}).get("scheme") if info is not None else None) or "-"
        b = checkpoint_bytes(model)
        sizes[f"{stored} (as stored)"] = {"bytes": b, "bits_per_param": 8 * b / params, "head": head}
    return {
        "parameters": params,
        "quantized": stored,
        "dtypes": param_dtypes(model),
        "memory_bytes": memory_bytes(model),
        "breakdown": module_breakdown(model),
        "sizes": sizes,
    }
