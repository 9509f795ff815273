"""Measurements of a (quantized) model: output quality, speed and size."""

from quantkit.evaluate.quality import ReferenceCache, score
from quantkit.evaluate.size import disk_bytes, memory_bytes, module_breakdown, param_dtypes
from quantkit.evaluate.speed import decode_speed, greedy_generate, greedy_tokens, prefill_speed

__all__ = [
    "ReferenceCache",
    "decode_speed",
    "disk_bytes",
    "greedy_generate",
    "greedy_tokens",
    "memory_bytes",
    "module_breakdown",
    "param_dtypes",
    "prefill_speed",
    "score",
]
