"""Numbers: pure tensor functions from a float weight to a `QuantizedWeight` and back.

No nn.Module and no I/O here. `quantize(w, scheme)` rounds to nearest on the scheme's grid;
algorithms that choose values differently (GPTQ, ...) build on the same codecs.
"""
from __future__ import annotations

import torch

from ..scheme import Scheme, parse_scheme
from .base import FORMATS, Codec, QuantizedWeight, register
from . import integer, floats, codebook, ggml, ggml_k  # noqa: F401  (each module registers its codecs)


def quantize(w: torch.Tensor, scheme: "Scheme | str") -> QuantizedWeight:
    """Round-to-nearest quantization of a 2-D weight [out, in] under `scheme`."""
    scheme = parse_scheme(scheme)
    scheme.validate_for(tuple(w.shape))
    return FORMATS[scheme.kind].quantize(w.detach().float(), scheme)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [out, in] a `QuantizedWeight` stands for, exactly what the kernels compute."""
    return qw.dequantize(dtype)


def storage_bytes(scheme: "Scheme | str", shape: tuple[int, int]) -> int:
    """Exact bytes a weight of `shape` takes in the quantkit layout under `scheme`."""
    scheme = parse_scheme(scheme)
    return FORMATS[scheme.kind].storage_bytes(scheme, tuple(shape))


__all__ = ["FORMATS", "Codec", "QuantizedWeight", "register", "quantize", "dequantize", "storage_bytes"]
