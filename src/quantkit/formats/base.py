"""`QuantizedWeight` (the data every layer above passes around) and the codec registry.

A codec turns a float weight into named storage tensors and back, exactly:
`codec.dequantize(codec.quantize(w, s))` is what every kernel computes (up to the kernel's
activation dtype). Codecs register themselves in `FORMATS` keyed by `Scheme.kind`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..scheme import Scheme


@dataclass
class QuantizedWeight:
    """Packed integer (or low-precision float) tensor(s) plus the parameters that undo them.

    `tensors` holds the storage parts by name (e.g. "qweight", "scale", "zero", "scale_q",
    "scale_scale", "scale_offset"); their dtypes and shapes are the on-disk layout, so
    `nbytes` is the exact size of the weight in a quantkit checkpoint.
    """

    scheme: Scheme
    shape: tuple[int, int]  # (out_features, in_features) of the original weight
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return FORMATS[self.scheme.kind].dequantize(self).to(dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Codec(Protocol):
    """What a format registers in `FORMATS`: quantize, dequantize, exact storage size."""

    kind: str

    def quantize(self, w: torch.Tensor, scheme: Scheme) -> QuantizedWeight: ...

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor: ...

    def storage_bytes(self, scheme: Scheme, shape: tuple[int, int]) -> int:
        """Exact bytes `quantize` stores for a weight of `shape` (no tensor is built)."""
        ...


FORMATS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    FORMATS[codec.kind] = codec
    return codec
