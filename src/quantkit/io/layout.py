"""What a quantkit checkpoint stores, without reading or writing one: the version numbers, the
file name and metadata, and the tensors (names' parts, dtypes, shapes) a quantized layer
stores. io/checkpoint.py writes and loads by these; io/checkpoint_validate.py checks by them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedWeight, quantize
from ..modules import linear_weight

FORMAT_VERSION = 2  # of quantization_config (2: methods and transforms recorded as {name, options})
LAYOUT_VERSION = 1  # of the tensors in model.safetensors (the same in both config versions)
WEIGHTS_FILE = "model.safetensors"
# One key only: safetensors writes the metadata map in hash order, and two keys would make two
# saves of the same model differ byte for byte.
METADATA = {"format": f"quantkit/{LAYOUT_VERSION}"}


def stored_spec(qw: QuantizedWeight) -> dict:
    """{part: (dtype, shape)} a quantized layer stores (its codec's tensors and activation parts)."""
    from ..formats.integer import act_parts

    return {**{k: (t.dtype, tuple(t.shape)) for k, t in qw.tensors.items()}, **act_parts(qw.scheme)}


def meta_quantize(shape, scheme) -> QuantizedWeight:
    """A QuantizedWeight of `shape` under `scheme` with no data (meta tensors where the codec allows)."""
    try:
        return quantize(torch.empty(shape, device="meta"), scheme)
    except Exception:  # a codec op without a meta kernel: build it for real (zeros are cheap)
        return quantize(torch.zeros(shape, device="cpu"), scheme)


def stored_parts(shape, scheme) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{part: (dtype, shape)} that `scheme` stores for a weight of `shape` (what `save` writes)."""
    return stored_spec(meta_quantize(tuple(shape), scheme))


def stored_shape(mod: nn.Module) -> tuple[int, int]:
    """[out, in] of a Linear/Conv1D, [num, dim] of an embedding, or a placeholder's `stored_shape`."""
    if hasattr(mod, "stored_shape"):
        return tuple(mod.stored_shape)
    w = linear_weight(mod)
    return tuple((w if w is not None else mod.weight).shape)
