"""Floating-point codecs: plain casts ("float": fp32/bf16/fp16) and scaled fp8 ("fp8").

* "float": storage "weight" in the scheme's dtype; dequantize casts back to fp32.
* "fp8": per output channel scale s = absmax / finfo(fp8).max, stored as "scale" float32
  [out, 1]; "qweight" = (w / s) cast (round to nearest) to float8_e4m3fn or float8_e5m2
  [out, in]; dequantize = qweight.float() * s. An all-zero row gets s = 1 (codes 0, exact).
"""
from __future__ import annotations

import torch

from ..scheme import Scheme
from .base import QuantizedWeight, register

FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _dtype(table: dict, scheme: Scheme) -> torch.dtype:
    try:
        return table[scheme.fp_format]
    except KeyError:
        raise ValueError(f"{scheme.kind} codec: unknown format {scheme.fp_format!r}; valid: {sorted(table)}") from None


class FloatCodec:
    """A plain cast; nothing is quantized beyond the dtype's own rounding."""

    kind = "float"

    def quantize(self, w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
        t = w.detach().to(_dtype(FLOAT_DTYPES, scheme)).contiguous()
        return QuantizedWeight(scheme=scheme, shape=(int(w.shape[0]), int(w.shape[1])), tensors={"weight": t})

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.tensors["weight"].float()

    def storage_bytes(self, scheme: Scheme, shape: tuple[int, int]) -> int:
        itemsize = torch.empty((), dtype=_dtype(FLOAT_DTYPES, scheme)).element_size()
        return shape[0] * shape[1] * itemsize


def fp8_scale(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-row scale float32 [out, 1]: absmax / finfo.max, 1 for all-zero rows."""
    absmax = w.float().abs().amax(dim=1, keepdim=True)
    s = absmax / torch.finfo(dtype).max
    return torch.where(s > 0, s, torch.ones_like(s))


class Fp8Codec:
    """Scaled fp8 (e4m3 / e5m2) with one float32 scale per output channel."""

    kind = "fp8"

    def quantize(self, w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:  # shape checked by formats.quantize
        dtype = _dtype(FP8_DTYPES, scheme)
        w = w.detach().float()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("cannot quantize a weight that contains NaN or Inf")
        s = fp8_scale(w, dtype)  # [out, 1]
        fmax = torch.finfo(dtype).max
        q = (w / s).clamp(-fmax, fmax).to(dtype)  # clamp: w/s may exceed max by an fp32 ulp
        return QuantizedWeight(
            scheme=scheme, shape=(int(w.shape[0]), int(w.shape[1])), tensors={"qweight": q.contiguous(), "scale": s}
        )

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        return qw.tensors["qweight"].float() * qw.tensors["scale"]

    def storage_bytes(self, scheme: Scheme, shape: tuple[int, int]) -> int:
        out, inn = shape
        return out * inn + 4 * out


FLOAT_CODEC = register(FloatCodec())
FP8_CODEC = register(Fp8Codec())
