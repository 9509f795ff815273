"""`inspect_model`: what a model holds, and what it would weigh under each scheme."""
from __future__ import annotations

import torch

from ..io.checkpoint import expected_weights_bytes
from ..scheme import make_config
from .size import memory_bytes, module_breakdown, param_dtypes

INSPECT_SCHEMES = ("fp32", "bf16", "fp16", "fp8-e4m3", "int8", "llm-int8", "int8-g128", "int4-g128", "int4-g32",
                   "int4", "int3-g128", "int2-g64", "nf4", "nf4-dq", "fp4-dq", "w8a8-dynamic", "w8a8-static-mse",
                   "gguf-q8_0", "gguf-q4_0")


def inspect_model(model, schemes=INSPECT_SCHEMES) -> dict:
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_weights = params
    sizes = {}
    for s in schemes:
        cfg = make_config(s)
        b = expected_weights_bytes(model, cfg)
        sizes[s] = {"bytes": b, "bits_per_param": 8 * b / n_weights, "head": cfg.head}
    return {
        "parameters": params,
        "dtypes": param_dtypes(model),
        "memory_bytes": memory_bytes(model),
        "breakdown": module_breakdown(model),
        "sizes": sizes,
    }
