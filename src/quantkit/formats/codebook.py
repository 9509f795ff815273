"""4-bit codebook codecs "nf4" and "fp4" (bitsandbytes / QLoRA style), blockwise absmax.

A block is `scheme.group_size` consecutive input columns within one row (default 64), so
block k of the flattened row-major weight is w.reshape(-1, block)[k]. For each block the
absmax a is taken, x/a is mapped to the nearest of 16 levels in [-1, 1], and the 4-bit
codes are packed (packing.pack, two per byte) into "qweight". Dequantize: level[code] * a.

Levels (indexed by code):
* NF4: the 16 QLoRA normal-float levels (Dettmers et al. 2023), sorted ascending, so
  code 7 is 0.0, code 0 is -1 and code 15 is +1.
* FP4 (e2m1): code = sign << 3 | m, where m in 0..7 indexes the magnitudes
  {0, 0.5, 1, 1.5, 2, 3, 4, 6} / 6 and sign = 1 means negative (code 8 is -0, never
  produced: zero always maps to code 0).

Scales: without double quant "scale" = absmax float32 [n_blocks]. With double quant the
absmax values are quantized again: their mean is subtracted ("scale_offset" float32 [1]),
then symmetric int8 absmax quantization in chunks of 256 consecutive values ("scale_q"
int8 [n_blocks], "scale_scale" float32 [ceil(n_blocks/256)]); the dequantized absmax is
scale_q * scale_scale + scale_offset. Codes are always chosen against the dequantized
absmax, so dequantize() reproduces exactly what was chosen. A block whose dequantized
absmax is 0 decodes to zeros; a (tiny) negative one just flips the level signs consistently.
"""
from __future__ import annotations

import torch

from ..scheme import Scheme
from . import packing
from .base import QuantizedWeight, register

NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
_FP4_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP4_LEVELS = torch.tensor([m / 6 for m in _FP4_MAGNITUDES] + [-m / 6 for m in _FP4_MAGNITUDES], dtype=torch.float32)
LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}
DQ_CHUNK = 256  # absmax values sharing one double-quant scale


def _search_table(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted distinct levels, code of each sorted distinct level)."""
    seen: list[float] = []
    codes: list[int] = []
    for code, v in enumerate(levels.tolist()):
        if v not in seen:  # -0.0 == 0.0, so the fp4 "-0" code is dropped
            seen.append(v)
            codes.append(code)
    vals = torch.tensor(seen, dtype=torch.float32)
    order = torch.argsort(vals)
    vals = vals[order]
    return (vals[1:] + vals[:-1]) / 2, torch.tensor(codes, dtype=torch.int64)[order]


_SEARCH = {kind: _search_table(lv) for kind, lv in LEVELS.items()}


def nearest_code(y: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 code of the level nearest to each y (ties go to the lower level)."""
    mids, codes = _SEARCH[kind]
    return codes[torch.bucketize(y.float().contiguous(), mids)].to(torch.uint8)


def double_quant(absmax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantize fp32 block absmax values [n] to {"scale_q", "scale_scale", "scale_offset"}."""
    a = absmax.float().reshape(-1)
    n = a.numel()
    offset = a.mean().reshape(1)
    c = a - offset
    pad = (-n) % DQ_CHUNK
    cb = torch.cat([c, c.new_zeros(pad)]).view(-1, DQ_CHUNK)  # [n_chunks, 256]
    ss = cb.abs().amax(dim=1) / 127  # [n_chunks]
    d = torch.where(ss > 0, ss, torch.ones_like(ss))
    q = torch.round(cb / d[:, None]).clamp(-127, 127).to(torch.int8).reshape(-1)[:n]
    return {"scale_q": q.contiguous(), "scale_scale": ss.contiguous(), "scale_offset": offset}


def double_dequant(scale_q: torch.Tensor, scale_scale: torch.Tensor, scale_offset: torch.Tensor) -> torch.Tensor:
    """Dequantized absmax float32 [n_blocks] = scale_q * scale_scale + scale_offset."""
    n = scale_q.numel()
    ss = scale_scale.float().repeat_interleave(DQ_CHUNK)[:n]
    return scale_q.float() * ss + scale_offset.float()


def block_absmax(qw: QuantizedWeight) -> torch.Tensor:
    """The (dequantized) absmax float32 [n_blocks] that dequantize() multiplies by."""
    t = qw.tensors
    if "scale" in t:
        return t["scale"].float()
    return double_dequant(t["scale_q"], t["scale_scale"], t["scale_offset"])


def block_codes(qw: QuantizedWeight) -> torch.Tensor:
    """Unpacked 4-bit codes uint8 [out, in]."""
    out, inn = qw.shape
    return packing.unpack(qw.tensors["qweight"], 4, out * inn).view(out, inn)


class CodebookCodec:
    """Blockwise-absmax 4-bit codebook codec (one instance per level table)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.levels = LEVELS[kind]

    def quantize(self, w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:  # shape checked by formats.quantize
        w = w.detach().float()
        if w.numel() == 0:
            raise ValueError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("cannot quantize a weight that contains NaN or Inf")
        wb = w.reshape(-1, scheme.group_size)  # [n_blocks, block]
        absmax = wb.abs().amax(dim=1)
        if scheme.double_quant:
            tensors = double_quant(absmax)
            a = double_dequant(tensors["scale_q"], tensors["scale_scale"], tensors["scale_offset"])
        else:
            tensors = {"scale": absmax.contiguous()}
            a = absmax
        d = torch.where(a != 0, a, torch.ones_like(a))
        codes = nearest_code((wb / d[:, None]).clamp(-1.0, 1.0), self.kind)
        tensors = {"qweight": packing.pack(codes, 4), **tensors}
        return QuantizedWeight(scheme=scheme, shape=(int(w.shape[0]), int(w.shape[1])), tensors=tensors)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        out, inn = qw.shape
        block = qw.scheme.group_size
        codes = block_codes(qw).view(-1, block).long()  # [n_blocks, block]
        x = self.levels[codes] * block_absmax(qw)[:, None]
        return x.view(out, inn)

    def storage_bytes(self, scheme: Scheme, shape: tuple[int, int]) -> int:
        scheme.validate_for(tuple(shape))
        n = shape[0] * shape[1]
        nb = n // scheme.group_size
        q_bytes = packing.packed_nbytes(n, 4)
        if not scheme.double_quant:
            return q_bytes + 4 * nb
        return q_bytes + nb + 4 * ((nb + DQ_CHUNK - 1) // DQ_CHUNK) + 4


NF4_CODEC = register(CodebookCodec("nf4"))
FP4_CODEC = register(CodebookCodec("fp4"))
