"""Measurements of a (quantized) model: output quality, speed and size."""

import sys
import types

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


class _CallablePackage(types.ModuleType):
    """``quantkit.evaluate`` names both this package and the function ``qk.evaluate(...)``. Importing
    the package binds it over the function on ``quantkit``, so the package answers calls the same way."""

    def __call__(self, model, tokenizer, text=None, reference=None, ctx=512, max_tokens=None, speed=False):
        from quantkit.evaluate.run import evaluate_model

        return evaluate_model(model, tokenizer, text=text, reference=reference, ctx=ctx, max_tokens=max_tokens,
                              speed=speed)


sys.modules[__name__].__class__ = _CallablePackage
