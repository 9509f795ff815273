"""Block-by-block calibration: the loop every data-driven method shares.

1. Run the calibration samples through the model up to the first block and keep its inputs.
2. For each block in order, for each group of its Linears (all at once, or in sequential
   groups such as q/k/v -> o -> gate/up -> down), run the block on the inputs while hooks
   accumulate each Linear's statistics (for GPTQ the Hessian 2/n XXᵀ in float64), quantize
   the group and swap in QuantLinear.
3. Run the quantized block to get the next block's inputs, so later blocks see the errors
   of earlier ones.
Memory stays at about one block's weights plus the activations of the samples.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from . import algorithms
from .algorithms.hessian import HessianAccumulator
from .arch import blocks_of, family_of
from .pipeline import QuantInfo, linear_weight, swap_quantized
from .scheme import QuantConfig

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch_size: int):
    """[(hidden_states [B, L, D], kwargs)] at the input of `block` for each batch of `calib`."""
    store = []

    def hook(mod, args, kwargs):
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        store.append((h.detach(), {k: v for k, v in kw.items() if k != "hidden_states"}))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, calib.shape[0], batch_size):
                try:
                    model(input_ids=calib[i:i + batch_size], use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return store


def _run(block: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = block(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def _groups(block: nn.Module, fam, sequential: bool) -> list[list[str]]:
    """Relative names of the block's Linears, in the order they are quantized."""
    present = {n for n, m in block.named_modules() if linear_weight(m) is not None}
    groups = [[n for n in g if n in present] for g in fam.groups]
    listed = {n for g in groups for n in g}
    extra = sorted(present - listed)  # Linears this family entry does not name: last, on their own
    groups = [g for g in groups if g] + ([extra] if extra else [])
    return groups if sequential else [[n for g in groups for n in g]]


def quantize_blocks(model: nn.Module, plans: dict, calib: torch.Tensor, cfg: QuantConfig, info: QuantInfo,
                    batch_size: int = 8, progress: bool = True, loader=None) -> set[str]:
    """Quantize the Linears inside the model's blocks with calibration; returns their names.

    plans: layer name -> (scheme or None, method), as resolved by the pipeline. `loader`, if
    given, has `load_into(block, prefix)` and fills a block's weights when it is reached
    (streaming: the blocks start as meta tensors).
    """
    fam = family_of(model)
    blocks = blocks_of(model, fam)
    calib = calib.to(torch.long)
    inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
    done: set[str] = set()
    gopts = {"damp": cfg.gptq.damp, "block_size": cfg.gptq.block_size, "act_order": cfg.gptq.act_order,
             "static_groups": cfg.gptq.static_groups}
    bar = tqdm(range(len(blocks)), desc=f"{cfg.method} {cfg.scheme.name} blocks", unit="block", disable=not progress)
    for bi in bar:
        block = blocks[bi]
        prefix = f"{fam.blocks}.{bi}."
        if loader is not None:
            loader.load_into(block, prefix)
        for group in _groups(block, fam, cfg.sequential):
            todo = [(rel, plans.get(prefix + rel, (None, None))) for rel in group]
            todo = [(rel, sc, m) for rel, (sc, m) in todo if sc is not None]
            need = {rel for rel, _, m in todo if "hessian" in algorithms.get(m).needs}
            accs = {rel: HessianAccumulator() for rel in need}
            hooks = [block.get_submodule(rel).register_forward_hook(
                lambda mod, args, out, acc=acc: acc.add(args[0].detach())) for rel, acc in accs.items()]
            try:
                if accs:
                    with torch.no_grad():
                        for h, kw in inputs:
                            _run(block, h, kw)
            finally:
                for hk in hooks:
                    hk.remove()
            for rel, scheme, method in todo:
                stats = {"hessian": accs[rel].hessian, "gptq": gopts} if rel in accs else {}
                swap_quantized(model, prefix + rel, block.get_submodule(rel), scheme, method, stats, info)
                done.add(prefix + rel)
            del accs
        with torch.no_grad():
            inputs = [(_run(block, h, kw), kw) for h, kw in inputs]
    for name, (sc, _) in plans.items():  # layers kept in high precision are "done" too
        if name.startswith(fam.blocks + ".") and sc is None:
            done.add(name)
    return done
