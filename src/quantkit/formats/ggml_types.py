"""The one table of GGML tensor types (GGUF's block formats): `GGML_TYPES` (name -> GGMLType:
block, bytes, quantize, dequantize) and `GRIDS` (name -> the grid a solver such as GPTQ
encodes onto). The legacy types (ggml.py) and the K-quants (ggml_k.py) register into it;
the row-level `quantize_rows` / `dequantize_rows` and `grid` read only this table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import SchemeError

@dataclass(frozen=True)
class GGMLType:
    """One GGUF tensor type: `quantize` [n, block] float32 -> [n, nbytes] uint8, `dequantize` back."""

    name: str
    block: int
    nbytes: int
    quantize: Callable[[torch.Tensor], torch.Tensor]
    dequantize: Callable[[torch.Tensor], torch.Tensor]

    def bytes_for(self, n_values: int) -> int:
        return n_values // self.block * self.nbytes


GGML_TYPES: dict[str, GGMLType] = {}


def register(t: GGMLType) -> GGMLType:
    GGML_TYPES[t.name] = t
    return t


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float [n] -> uint8 [n, 2] (float16, little-endian)."""
    return x.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def f16_from(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] -> float32 [n]."""
    return b.contiguous().view(torch.float16).reshape(-1).float()


GRIDS: dict[str, object] = {}  # type name -> grid (params / code / value / pack, one block = one group)


def register_grid(name: str, g) -> None:
    GRIDS[name] = g


def grid(type_name: str):
    """The grid of a block type (params / code / value / pack), for solvers such as GPTQ."""
    g = GRIDS.get(type_name.upper())
    if g is None:
        raise SchemeError(f"no grid for GGML type {type_name!r}")
    return g


def ggml_type(name: str) -> GGMLType:
    t = GGML_TYPES.get(name.upper())
    if t is None:
        raise SchemeError(f"unknown GGUF tensor type {name!r}; known: {', '.join(GGML_TYPES)}")
    return t


def quantize_rows(w: torch.Tensor, type_name: str) -> torch.Tensor:
    """float tensor [..., k] -> uint8 [..., k/block·nbytes] in GGML type `type_name`."""
    t = ggml_type(type_name)
    k = w.shape[-1]
    if k % t.block:
        raise SchemeError(f"{t.name} needs rows that are a multiple of {t.block} values; this tensor has {k}")
    blocks = w.detach().float().reshape(-1, t.block)
    if t.block == 1:
        return t.quantize(w.detach()).reshape(*w.shape[:-1], k * t.nbytes)
    return t.quantize(blocks).reshape(*w.shape[:-1], k // t.block * t.nbytes)


def dequantize_rows(b: torch.Tensor, type_name: str) -> torch.Tensor:
    """uint8 [..., nbytes·n_blocks] -> float32 [..., n_blocks·block]."""
    t = ggml_type(type_name)
    lead = b.shape[:-1]
    nb = b.shape[-1] // t.nbytes
    out = t.dequantize(b.reshape(-1, t.nbytes).contiguous())
    return out.reshape(*lead, nb * t.block)
