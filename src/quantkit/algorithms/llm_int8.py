"""LLM.int8() (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers
at Scale", arXiv:2208.07339).

Weights: vector-wise (per output row) absmax int8. The method's other half runs at inference
time: input columns with an outlier (|x| > threshold: 6.0 by default, llm-int8-tX) go through a float
matmul, the rest through an int8 x int8 matmul (see kernels.cpu.LLMInt8Kernel).
"""
from dataclasses import dataclass

from ..formats import quantize
from ..scheme import parse_scheme
from .base import Method, register_method

SCHEME = parse_scheme("llm-int8")


@register_method
@dataclass(frozen=True)
class LLMInt8(Method):
    """LLM.int8(): per-row absmax int8 weights; outlier input columns run in float (the llm-int8 scheme)."""

    name = "llm-int8"
    kinds = frozenset({"llm-int8"})
    summary = "int8 vector-wise weights + fp outlier columns at run time"

    def quantize(self, w, scheme, stats=None):
        return quantize(w, scheme if scheme.kind == "llm-int8" else SCHEME)  # its threshold runs with it
