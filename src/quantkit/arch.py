"""Architecture knowledge: what is found in the model, and the hints that cannot be.

Data-free methods need none of this (they walk every Linear). Calibrated methods process a
model block by block, and may process a block's Linears in sequential groups (each group sees
the outputs of the already-quantized groups before it). The blocks are found in the model
(`find_blocks`: the repeated ModuleList that holds its quantizable layers), and so are the
Linears that read the very same input (calibrate.shared_inputs, one hooked pass), so any family
transformers builds calibrates; what cannot be discovered is a per-family hint here
(`FAMILIES`): the sequential group order and SmoothQuant's fold pairs. A family without hints
calibrates all of a block's Linears together.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from torch import nn

from .errors import SourceError
from .modules import quantizable_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    blocks: str = ""  # dotted path of the ModuleList of blocks (found in the model: find_blocks)
    groups: tuple[tuple[str, ...], ...] = ()  # Linears of a block (relative names), in sequential groups
    # SmoothQuant: (module whose output feeds them, Linears that read it). The scale is folded
    # into the first (a norm's weight/bias or a Linear's rows), so the pair must be linear in it.
    smooth: tuple[tuple[str, tuple[str, ...]], ...] = ()
    hinted: bool = True  # False: nothing is known of the family beyond its blocks


_LLAMA = Family(
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    smooth=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            ("mlp.up_proj", ("mlp.down_proj",))),  # down's input is act(gate)·up: linear in up's rows
)
FAMILIES: dict[str, Family] = {  # hints by config.model_type
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gpt2": Family(groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                   smooth=(("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",)))),
}


def find_blocks(model: nn.Module) -> str:
    """The dotted path of the model's stack of blocks: of the ModuleLists whose entries are all
    of one class, the one holding the most quantizable layers. A model with a second such stack
    of comparable weight (an encoder-decoder's encoder and decoder) is refused: calibration
    walks one stack."""
    layers = [n for n, _ in quantizable_layers(model)]
    stacks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(b) for b in mod}) == 1 and name:
            inside = sum(n.startswith(name + ".") for n in layers)
            if inside:
                stacks.append((inside, name))
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if not stacks:
        raise SourceError(f"calibrated methods found no stack of blocks in this {kind} model "
                          "(data-free methods such as rtn work on any model)")
    stacks.sort(reverse=True)
    count, best = stacks[0]
    rivals = [n for c, n in stacks[1:] if c >= count / 4 and not n.startswith(best + ".") and not best.startswith(n + ".")]
    if rivals:
        raise SourceError(f"calibrated methods walk one stack of blocks; this {kind} model has several "
                          f"({best}, {', '.join(rivals)}): use a data-free method such as rtn")
    return best


def family_of(model: nn.Module) -> Family:
    """The model's family: its blocks as found in it, with the hints `FAMILIES` has for its
    config.model_type (none: all Linears of a block are calibrated together)."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    hints = FAMILIES.get(kind) or Family(hinted=False)
    return dataclasses.replace(hints, blocks=find_blocks(model))


def blocks_of(model: nn.Module, fam: Family) -> nn.ModuleList:
    return model.get_submodule(fam.blocks)
