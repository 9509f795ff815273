"""GGML block formats (the tensor types of GGUF files), as vectorised torch functions.

A GGML type stores a row of `k` values as k/block blocks of `nbytes` bytes each. This module
holds the table of types (`GGML_TYPES`, name -> GGMLType) and, for each, a quantizer that
reproduces llama.cpp's reference rounding (`quantize_row_*_ref` in ggml-quants.c, which the
`gguf` package mirrors) bit for bit, and a dequantizer. Tests check both against the `gguf`
package. The K-quants (super-blocks of 256) are in `ggml_k.py`; both register into the one
table of `ggml_types.py`.

The legacy types are linear grids over blocks of 32: value = d·q + m with one float16 `d`
(and, for the `_1` types, one float16 `m`) per block.

    type  codes q        d (reference choice)          m      bytes / 32 values
    Q8_0  -127..127      absmax / 127                   0      34  (d, 32 x int8)
    Q4_0  -8..7          -(signed absmax) / 8           0      18  (d, 16 B nibbles)
    Q4_1  0..15          (max - min) / 15               min    20  (d, m, nibbles)
    Q5_0  -16..15        -(signed absmax) / 16          0      22  (d, 4 B high bits, nibbles)
    Q5_1  0..31          (max - min) / 31               min    24  (d, m, high bits, nibbles)

The reference computes codes with id = 1/d in float32 from the *unrounded* d, then stores d
as float16. `LinearGrid.encode` takes d explicitly, so a solver (GPTQ onto a GGUF grid)
can encode against the stored float16 d instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .ggml_types import (GGML_TYPES, GGMLType, dequantize_rows, f16_bytes, f16_from, grid,  # noqa: F401
                         quantize_rows, register, register_grid)

BLOCK = 32  # values per block of the legacy types


def _inv(d: torch.Tensor) -> torch.Tensor:
    """1/d in float32, 0 where d == 0 (as the reference)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def round_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf: halves away from zero."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """codes 0..15 (low 4 bits used) [n, 32] -> [n, 16]: value j in the low nibble of byte j, value 16+j high."""
    q = q.to(torch.uint8) & 0x0F
    return q[:, :16] | (q[:, 16:] << 4)


def _unnibble(b: torch.Tensor) -> torch.Tensor:
    """[n, 16] uint8 -> [n, 32] int32."""
    return torch.cat([b & 0x0F, b >> 4], dim=1).to(torch.int32)


_BITS8 = torch.arange(8, dtype=torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """bit 4 of codes [n, 32] -> [n, 4] bytes, value i at bit i of a little-endian uint32."""
    hb = ((q.to(torch.uint8) >> 4) & 1).reshape(-1, 4, 8)
    return (hb << _BITS8).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _unhigh(b: torch.Tensor) -> torch.Tensor:
    """[n, 4] uint8 -> [n, 32] int32 bits."""
    return ((b.unsqueeze(-1) >> _BITS8) & 1).reshape(-1, 32).to(torch.int32)


@dataclass(frozen=True)
class LinearGrid:
    """A legacy block type as a grid: value = d·q + m, q in [qmin, qmax] (stored as q - qmin)."""

    name: str
    qmin: int
    qmax: int
    affine: bool  # stores a per-block float16 m (the block minimum)
    nbytes: int

    def choose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference (d, m) for blocks x [..., 32] float32 -> two [...] float32 tensors (unrounded)."""
        if self.affine:
            lo, hi = x.amin(dim=-1), x.amax(dim=-1)
            return (hi - lo) / float(self.qmax - self.qmin), lo
        if self.qmin == -self.qmax:  # Q8_0: plain absmax
            return x.abs().amax(dim=-1) / float(self.qmax), torch.zeros_like(x[..., 0])
        i = x.abs().argmax(dim=-1, keepdim=True)  # first index of the largest |x|, as numpy/C
        return x.gather(-1, i).squeeze(-1) / float(self.qmin), torch.zeros_like(x[..., 0])

    def encode(self, x: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Codes (int32, in [qmin, qmax]) of x [...] with per-element d, m (broadcast), the reference way."""
        inv = _inv(d)
        if self.affine:  # trunc((x - m)·id + 0.5)
            q = torch.trunc((x - m) * inv + 0.5)
        elif self.qmin == -self.qmax:  # roundf(x·id)
            q = round_away(x * inv)
        else:  # trunc(x·id + (0.5 - qmin)) + qmin
            q = torch.trunc(x * inv + (0.5 - self.qmin)) + self.qmin
        return q.clamp(self.qmin, self.qmax).to(torch.int32)

    def pack_dm(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """codes [n, 32], d [n], m [n] -> [n, nbytes] uint8."""
        parts = [f16_bytes(d)]
        if self.affine:
            parts.append(f16_bytes(m))
        if self.qmax - self.qmin == 254:  # Q8_0
            parts.append(q.to(torch.int8).view(torch.uint8))
        else:
            u = q - self.qmin
            if self.qmax - self.qmin == 31:
                parts.append(_high_bits(u))
            parts.append(_nibbles(u))
        return torch.cat(parts, dim=1)

    def unpack(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[n, nbytes] uint8 -> codes [n, 32] int32, d [n], m [n] (float32)."""
        d = f16_from(b[:, 0:2])
        o = 2
        m = torch.zeros_like(d)
        if self.affine:
            m, o = f16_from(b[:, 2:4]), 4
        if self.qmax - self.qmin == 254:
            return b[:, o:].contiguous().view(torch.int8).to(torch.int32), d, m
        hi = 0
        if self.qmax - self.qmin == 31:
            hi, o = _unhigh(b[:, o:o + 4]) << 4, o + 4
        return (_unnibble(b[:, o:]) | hi) + self.qmin, d, m

    # The grid interface GPTQ uses (params / code / value / pack, as ggml_k.KGrid): one block =
    # one group of 32 columns.
    group = BLOCK

    def params(self, x: torch.Tensor) -> dict:
        """The reference (d, m) of blocks x [n, 32], as stored (float16)."""
        d, m = self.choose(x.float())
        return {"d": d.to(torch.float16).float(), "m": m.to(torch.float16).float()}

    def code(self, x: torch.Tensor, P: dict, j0: int = 0) -> torch.Tensor:
        return self.encode(x.float(), P["d"][:, None], P["m"][:, None])

    def value(self, q: torch.Tensor, P: dict, j0: int = 0) -> torch.Tensor:
        return P["d"][:, None] * q.float() + P["m"][:, None]

    def pack(self, q: torch.Tensor, P: dict) -> torch.Tensor:
        return self.pack_dm(q, P["d"], P["m"])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        d, m = self.choose(x)
        q = self.encode(x, d[:, None], m[:, None])
        return self.pack_dm(q, d, m)

    def dequantize(self, b: torch.Tensor) -> torch.Tensor:
        q, d, m = self.unpack(b)
        return d[:, None] * q.float() + m[:, None]

    def ggml_type(self) -> GGMLType:
        return GGMLType(self.name, BLOCK, self.nbytes, self.quantize, self.dequantize)


LINEAR_GRIDS = {g.name: g for g in (
    LinearGrid("Q8_0", -127, 127, False, 34),
    LinearGrid("Q4_0", -8, 7, False, 18),
    LinearGrid("Q4_1", 0, 15, True, 20),
    LinearGrid("Q5_0", -16, 15, False, 22),
    LinearGrid("Q5_1", 0, 31, True, 24),
)}
for _g in LINEAR_GRIDS.values():
    register(_g.ggml_type())
    register_grid(_g.name, _g)


def _bf16_quantize(x: torch.Tensor) -> torch.Tensor:
    return x.float().to(torch.bfloat16).view(torch.uint8)


register(GGMLType("F32", 1, 4, lambda x: x.float().contiguous().view(torch.uint8),
                  lambda b: b.contiguous().view(torch.float32)))
register(GGMLType("F16", 1, 2, lambda x: x.float().to(torch.float16).view(torch.uint8),
                  lambda b: b.contiguous().view(torch.float16).float()))
register(GGMLType("BF16", 1, 2, _bf16_quantize, lambda b: b.contiguous().view(torch.bfloat16).float()))


class GGMLCodec:
    """Scheme kind "ggml" (`gguf-q4_k`, ...): the weight stored as the GGUF file stores it,
    "qweight" uint8 [out, in/block·nbytes]. A GGUF export copies these bytes unchanged."""

    kind = "ggml"

    def quantize(self, w: torch.Tensor, scheme) -> "QuantizedWeight":
        from .base import QuantizedWeight

        if not bool(torch.isfinite(w).all()):
            raise ValueError("cannot quantize a weight that contains NaN or Inf")
        return QuantizedWeight(scheme, (int(w.shape[0]), int(w.shape[1])),
                               {"qweight": quantize_rows(w.float(), scheme.fp_format)})

    def dequantize(self, qw) -> torch.Tensor:
        return dequantize_rows(qw.tensors["qweight"], qw.scheme.fp_format).reshape(qw.shape)

    def storage_bytes(self, scheme, shape) -> int:
        scheme.validate_for(tuple(shape))
        return shape[0] * GGML_TYPES[scheme.fp_format].bytes_for(shape[1])


def _register_codec():
    from .base import register as register_codec

    register_codec(GGMLCodec())


_register_codec()
