"""A GGUF model that keeps llama.cpp's quantized bytes in memory instead of fp32 weights.

`keep_gguf_blocks(model, path, arch, blocks)` takes the model transformers built from the file
(its weights dequantized to fp32) and swaps every Linear and embedding whose GGUF tensor is a
block type quantkit runs (`gguf-q4_1`, ...) for a QuantLinear / QuantEmbedding over that
tensor's bytes as the file stores them. A swap happens only when the bytes dequantize to
exactly the weight transformers loaded (rows of llama's q/k projections are reordered as
transformers reorders them); a tensor that disagrees stays float and is reported, so the
model's outputs are the dequantized load's, to fp32 summation order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..formats import QuantizedWeight
from ..formats.ggml_types import GGML_TYPES
from ..modules import head_modules, set_module, tied_embeddings
from ..nn.quant_linear import QuantEmbedding, QuantLinear
from ..scheme import gguf_scheme
from . import validate

log = logging.getLogger(__name__)
_FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class KeptBlocks:
    """What `keep_gguf_blocks` did: layers swapped per GGUF type, tensors left float and why."""

    kept: dict[str, int] = field(default_factory=dict)  # GGUF type -> layers now on its bytes
    left_float: dict[str, str] = field(default_factory=dict)  # module name -> reason
    bytes_kept: int = 0


def _unpermute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved rotary rows back to transformers' rotate-half order (the inverse
    of io/gguf._permute); rows move whole, so block bytes move with them."""
    rest = rows.shape[1:]
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(rows.shape)


def _candidates(raw: torch.Tensor, cfg) -> list[torch.Tensor]:
    """The file's rows, then the row orders transformers may have put them in (llama q / k)."""
    out = [raw]
    for n in {getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)}:
        if n and raw.shape[0] % (2 * n) == 0:
            out.append(_unpermute(raw, n))
    return out


def _matching(raw: torch.Tensor, scheme, weight: torch.Tensor, cfg) -> QuantizedWeight | None:
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    w = weight.detach().float()
    for rows in _candidates(raw, cfg):
        qw = QuantizedWeight(scheme, shape, {"qweight": rows.contiguous()})
        if torch.equal(qw.dequantize(), w):
            return qw
    return None


def keep_gguf_blocks(model: nn.Module, path: Path, arch: str, blocks: int) -> KeptBlocks:
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))  # memory-mapped: a tensor's bytes are read when copied below
    tensors = {t.name: t for t in reader.tensors}
    res = KeptBlocks()
    cfg = getattr(model, "config", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    _, head_name, tied = head_modules(model)
    swaps: list[tuple[str, nn.Module, QuantizedWeight]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding)) or not hasattr(mod, "weight"):
            continue
        gname = validate.gguf_hf_to_gguf_name(arch, blocks, f"{name}.weight")
        t = tensors.get(gname) if gname else None
        if tied and name == head_name:
            continue  # the tied head: it becomes the embedding's table below
        if t is None:
            res.left_float[name] = "no GGUF tensor of that name"
            continue
        tname = t.tensor_type.name
        if tname in _FLOAT_TYPES:
            continue  # stored in float: nothing to keep
        if tname not in GGML_TYPES:
            res.left_float[name] = f"GGUF type {tname} is not one quantkit reads"
            continue
        raw = torch.from_numpy(np.array(t.data, copy=True)).reshape(int(mod.weight.shape[0]), -1)
        qw = _matching(raw, gguf_scheme(tname), mod.weight, cfg)
        if qw is None:
            res.left_float[name] = f"its {tname} bytes do not dequantize to the weight transformers loaded"
            continue
        swaps.append((name, mod, qw))
    for name, mod, qw in swaps:
        tname = qw.scheme.fp_format
        if isinstance(mod, nn.Embedding):
            qe = QuantEmbedding(qw, mod.padding_idx, out_dtype=mod.weight.dtype, embed_scale=getattr(mod, "embed_scale", None))
            aliases = tied_embeddings(model, mod)
            set_module(model, name, qe)
            for a in aliases:
                set_module(model, a, qe)
            if tied and mod is emb and head_name:
                set_module(model, head_name, qe.linear)
        else:
            bias = mod.bias.detach() if mod.bias is not None else None
            set_module(model, name, QuantLinear(qw, bias))
        res.kept[tname] = res.kept.get(tname, 0) + 1
        res.bytes_kept += int(qw.tensors["qweight"].numel())
    for name, why in res.left_float.items():
        log.warning("%s: %s; it stays float", name, why)
    return res
