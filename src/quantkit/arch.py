"""Architecture knowledge, declared per model family in one place.

Data-free methods need none of this (they walk every Linear). Calibrated methods process a
model block by block, and may process a block's Linears in sequential groups (each group
sees the outputs of the already-quantized groups before it), so they need to know where the
blocks are and which Linears share an input. Adding a family = one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import SourceError


@dataclass(frozen=True)
class Family:
    blocks: str  # dotted path of the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # Linears of a block (relative names), in sequential groups
    # SmoothQuant: (module whose output feeds them, Linears that read it). The scale is folded
    # into the first (a norm's weight/bias or a Linear's rows), so the pair must be linear in it.
    smooth: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Linears the block's forward calls on the very same input tensor (calibration computes
    # their input statistics once)
    shared_input: tuple[tuple[str, ...], ...] = ()


_LLAMA = Family(
    blocks="model.layers",
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    smooth=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ("mlp.up_proj", ("mlp.down_proj",))),  # down's input is act(gate)·up: linear in up's rows
    shared_input=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")),
)
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": Family(blocks="transformer.h", groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                   smooth=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",)))),
}


def family_of(model: nn.Module) -> Family:
    """The family of `model` (by config.model_type); a clear error for unknown ones."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in FAMILIES:
        raise SourceError(
            f"calibrated methods do not know the model family {kind!r} yet; known: {', '.join(sorted(FAMILIES))} "
            "(data-free methods such as rtn work on any model)"
        )
    return FAMILIES[kind]


def blocks_of(model: nn.Module, fam: Family) -> nn.ModuleList:
    return model.get_submodule(fam.blocks)
