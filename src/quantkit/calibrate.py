"""Block-by-block calibration: the loop every data-driven method shares, as a generator.

1. Run the calibration samples through the model up to the first block and keep its inputs.
2. For each block in order: the config's block transforms (SmoothQuant, ...) run on it first
   (each gets the block's inputs and a way to observe its Linears, see algorithms.base).
   Then for each group of its Linears (all at once, or in sequential groups such as
   q/k/v -> o -> gate/up -> down), run the block on the inputs while hooks accumulate the
   statistics each Linear needs (algorithms.collectors.STATS: for GPTQ the Hessian 2/n XXᵀ
   in float64, for static activation schemes an observer of the input range), and yield
   each Linear's name with its statistics. The caller (the pipeline) quantizes it and swaps
   the module in before asking for the next one: this module never swaps modules.
3. Run the quantized block to get the next block's inputs, so later blocks see the errors
   of earlier ones.
Memory stays at about one block's weights plus the activations of the samples.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms.collectors import STATS, AbsMax
from .arch import blocks_of, family_of
from .config import QuantConfig
from .errors import QuantkitError
from .formats.integer import top_channels
from .memory import trim_heap
from .modules import linear_weight, split_experts
from .scheme import Scheme

log = logging.getLogger(__name__)


def _collectors(scheme: Scheme, method, outliers: "torch.Tensor | None" = None) -> dict:
    needs = _needs((scheme, method))
    unknown = needs - STATS.keys()
    if unknown:
        raise QuantkitError(f"no collector for statistics {sorted(unknown)} (needed by {method} / {scheme.name})")
    return {k: STATS[k](scheme, outliers) for k in sorted(needs)}


def shared_inputs(block: nn.Module, inputs, rels: list[str]) -> list[list[str]]:
    """Groups of the Linears `rels` that the block's forward calls on the very same input tensor
    (q/k/v, gate/up), found by running the block once on the first input batch with a hook on
    each (once per block: about 1/batches more block work): found in the model, not declared
    per family. The inputs seen are kept alive until the
    groups are made, so no address can be reused by a later tensor."""
    seen: dict[str, torch.Tensor] = {}

    def hook(rel):
        def fn(mod, args, out):
            seen.setdefault(rel, args[0])
        return fn

    hooks = [block.get_submodule(rel).register_forward_hook(hook(rel)) for rel in rels]
    try:
        with torch.no_grad():
            h, kw = inputs[0]
            _run(block, h, kw)
    finally:
        for hk in hooks:
            hk.remove()
    groups: dict[tuple, list[str]] = {}
    for rel in rels:  # in the order given (the block's module order)
        x = seen.get(rel)
        if x is not None:
            key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), tuple(x.stride()))
            groups.setdefault(key, []).append(rel)
    del seen
    return [g for g in groups.values() if len(g) > 1]


def _needs(plan) -> frozenset:
    """The statistics a layer's (scheme, method) plan needs (none for a layer kept in float)."""
    scheme, method = plan
    return frozenset() if scheme is None else method.needs | scheme.needs


def _share_hessians(cols: dict, shared: list[list[str]]) -> dict:
    """Collectors to hook, per Linear: siblings that read the very same input (`shared_inputs`,
    e.g. q/k/v) get one Hessian between them, hooked on the first, since H = 2/n·XXᵀ depends on
    the input alone; computing it once instead of three times is the same matrix for a third of
    the work (GPTQ copies H before changing it)."""
    hooked = {rel: list(c.values()) for rel, c in cols.items()}
    for names in shared:
        sibs = [r for r in names if r in cols and "hessian" in cols[r]]
        for r in sibs[1:]:
            hooked[r].remove(cols[r]["hessian"])
            cols[r]["hessian"] = cols[sibs[0]]["hessian"]
    return hooked


def _float_channels(block: nn.Module, inputs, todo) -> dict:
    """{rel: indices} of the input channels a -oN static scheme keeps in float: the N with the
    largest |x| over the calibration inputs (one extra pass over the block)."""
    wanted = {rel: sc.act_outliers for rel, sc, _ in todo if sc.act == "static" and sc.act_outliers}
    if not wanted:
        return {}
    stats = {rel: AbsMax() for rel in wanted}
    _observe(block, inputs, {rel: [c] for rel, c in stats.items()})
    return {rel: top_channels(stats[rel].result(), n) for rel, n in wanted.items()}


def _observe(block: nn.Module, inputs, collectors: dict) -> None:
    """Run `block` on every input batch while collectors[rel] see the input of Linear `rel`."""
    def hook(cs):
        def fn(mod, args, out):  # returns None: the output is left as it is
            for c in cs:
                c.add(args[0].detach())
        return fn

    hooks = [block.get_submodule(rel).register_forward_hook(hook(cs)) for rel, cs in collectors.items() if cs]
    if not hooks:
        return
    try:
        with torch.no_grad():
            for h, kw in inputs:
                _run(block, h, kw)
    finally:
        for hk in hooks:
            hk.remove()


class _Stop(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, calib: torch.Tensor, batch_size: int):
    """[(hidden_states [B, L, D], kwargs)] at the input of `block` for each batch of `calib`.

    The hidden states are views of one [samples, L, D] tensor, filled batch by batch, which the
    walk then overwrites block after block (`quantize_blocks`): one allocation of the full size
    (an mmap of its own for glibc), not a chunk per batch, so the long-lived activations never
    sit between the block forward's temporaries in the heap and the end-of-block trim can give
    all of those back.
    """
    store = []
    buf: list[torch.Tensor] = []  # the one [samples, L, D] tensor, made at the first batch
    n = calib.shape[0]
    filled = 0

    def hook(mod, args, kwargs):
        nonlocal filled
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        kw = {k: v for k, v in kw.items() if k != "hidden_states"}
        if not buf:
            buf.append(torch.empty((n, *h.shape[1:]), dtype=h.dtype, device=h.device))
        view = buf[0][filled:filled + h.shape[0]]
        view.copy_(h.detach())
        filled += h.shape[0]
        store.append((view, kw))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
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


def min_hessian_rows(in_features: int) -> int:
    """Fewest input rows (tokens) a layer's Hessian needs for GPTQ to be worth running: below
    this (an expert the router rarely picks) the layer is quantized with RTN instead."""
    return max(32, in_features // 16)


def _results(cols: dict) -> dict:
    """The statistics of one layer's collectors, and "rows": the input rows its Hessian saw.
    A Hessian of too few rows (`min_hessian_rows`) is left out: the pipeline then uses RTN."""
    h = cols.get("hessian")
    out = {"rows": h.n} if h is not None else {}
    for k, c in cols.items():
        if k == "hessian" and (h.n == 0 or h.n < min_hessian_rows(h.in_features)):
            continue
        out[k] = c.result()
    return out


class _BlockContext:
    """What a block transform sees of the block being calibrated (algorithms.base.TransformContext)."""

    def __init__(self, block: nn.Module, prefix: str, family, inputs, plans: dict):
        self.block, self.prefix, self.family, self.inputs, self._plans = block, prefix, family, inputs, plans

    def observe(self, collectors: dict) -> None:
        _observe(self.block, self.inputs, collectors)

    def scheme_of(self, rel: str):
        return self._plans.get(self.prefix + rel, (None, None))[0]


def block_statistics(model: nn.Module, plans: dict, calib: torch.Tensor, cfg: QuantConfig,
                     batch_size: int = 8, progress: bool = True, loader=None):
    """Yield (layer name, statistics) for every Linear inside the model's blocks that `plans`
    stores (name -> (scheme or None, method), as the pipeline resolved them), block by block
    and group by group. Before resuming, the caller puts the quantized module in place: the
    rest of the block's groups and the next block's inputs are computed with it.

    `loader`, if given, has `load_into(block, prefix)` and fills a block's weights when it is
    reached (streaming: the blocks start as meta tensors).
    """
    fam = family_of(model)
    blocks = blocks_of(model, fam)
    if cfg.sequential and not fam.groups:
        log.warning("no sequential group order is known for %s models: each block's layers are calibrated together",
                    getattr(model.config, "model_type", "these"))
    calib = calib.to(torch.long)
    inputs = capture_block_inputs(model, blocks[0], calib, batch_size)
    bar = tqdm(range(len(blocks)), desc=f"{cfg.method.name} {cfg.scheme.name} blocks", unit="block", disable=not progress)
    for bi in bar:
        block = blocks[bi]
        prefix = f"{fam.blocks}.{bi}."
        if loader is not None:
            loader.load_into(block, prefix)
        split_experts(block)  # fused experts (loaded now, when streamed) become a layer each
        for transform in cfg.transforms:
            transform.apply(block, _BlockContext(block, prefix, fam, inputs, plans))
        wants = [rel for g in _groups(block, fam, False) for rel in g
                 if "hessian" in _needs(plans.get(prefix + rel, (None, None)))]
        shared = shared_inputs(block, inputs, wants) if len(wants) > 1 else []
        for group in _groups(block, fam, cfg.sequential):
            todo = [(rel, plans.get(prefix + rel, (None, None))) for rel in group]
            todo = [(rel, sc, m) for rel, (sc, m) in todo if sc is not None]
            outl = _float_channels(block, inputs, todo)
            cols = {rel: _collectors(sc, m, outl.get(rel)) for rel, sc, m in todo}
            _observe(block, inputs, _share_hessians(cols, shared))
            for rel, _, _ in todo:
                stats = _results(cols.pop(rel))  # popped: freed once used
                yield prefix + rel, stats
                del stats  # this layer's Hessian goes now, not with the group's last layer
            del cols
        with torch.no_grad():  # in place, batch by batch: one set of activations alive, not two
            for i, (h, kw) in enumerate(inputs):
                out = _run(block, h, kw)
                if out.shape == h.shape and out.dtype == h.dtype:
                    h.copy_(out)  # into the shared buffer (capture_block_inputs): h is not read again
                else:
                    inputs[i] = (out, kw)
                del h, out
        trim_heap()  # the block's Hessians and temporaries are freed: give the heap back (glibc keeps it)
