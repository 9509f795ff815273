"""Block-by-block calibration: the loop every data-driven method shares.

1. Run the calibration samples through the model up to the first block and keep its inputs.
2. For each block in order: with SmoothQuant (`cfg.smooth`), one pass records each Linear
   input's per-channel absmax and the block is smoothed (algorithms/smoothquant.py). Then for
   each group of its Linears (all at once, or in sequential groups such as q/k/v -> o ->
   gate/up -> down), run the block on the inputs while hooks accumulate the statistics each
   Linear needs (`STATS`: for GPTQ the Hessian 2/n XXᵀ in float64, for static activation
   schemes an observer of the input range), quantize the group and swap in QuantLinear.
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
from .errors import QuantkitError
from .memory import trim_heap
from .formats.integer import top_channels
from .observers import make_observer
from .pipeline import QuantInfo, linear_weight, swap_quantized
from .scheme import QuantConfig, Scheme

log = logging.getLogger(__name__)


class _Hessian(HessianAccumulator):
    def result(self):
        return self.hessian


class _Range:
    """The input range of a static activation scheme, from the scheme's observer (of x / s
    when SmoothQuant's candidate scales s are given), over the channels that are quantized:
    a -oN scheme's float channels (`outliers`, indices) are left out."""

    def __init__(self, scheme: Scheme, s: "torch.Tensor | None" = None, outliers: "torch.Tensor | None" = None):
        self.obs = make_observer(scheme.observer, bits=8, symmetric=scheme.act_symmetric)
        self.s = s
        self.outliers = outliers
        self.keep = None

    def add(self, x: torch.Tensor) -> None:
        x = x if self.s is None else x / self.s
        if self.outliers is not None:
            if self.keep is None:
                self.keep = torch.ones(x.shape[-1], dtype=torch.bool)
                self.keep[self.outliers.long()] = False
            x = x[..., self.keep]
        self.obs.update(x)

    def result(self):
        return (*self.obs.qparams(), self.outliers)  # (scale, zero or None, float channels or None)


class _AbsMax:
    """Per-input-channel max |x| (SmoothQuant's statistic) and, with `stride`, a sample of input
    rows for alpha="auto": every stride-th row plus, per batch, the `extremes` rows with the
    largest |x| (the rare tokens with massive activations decide the ranges, so a strided
    sample that missed them would choose alpha for a distribution the model does not have)."""

    extremes = 8

    def __init__(self, stride: int | None = None):
        self.m = None
        self.stride = stride
        self.rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        a = x2.abs().amax(0)
        self.m = a if self.m is None else torch.maximum(self.m, a)
        if self.stride:
            top = x2.abs().amax(1).topk(min(self.extremes, x2.shape[0])).indices
            keep = torch.zeros(x2.shape[0], dtype=torch.bool)
            keep[:: self.stride] = True
            keep[top] = True
            self.rows.append(x2[keep].clone())

    def result(self):
        return self.m

    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


# statistic name -> collector factory (scheme -> object with add(x) and result())
STATS = {"hessian": lambda scheme, outliers: _Hessian(), "act_range": lambda scheme, outliers: _Range(scheme, None, outliers)}


def _collectors(scheme: Scheme, method: str, outliers: "torch.Tensor | None" = None) -> dict:
    needs = algorithms.get(method).needs | scheme.needs
    unknown = needs - STATS.keys()
    if unknown:
        raise QuantkitError(f"no collector for statistics {sorted(unknown)} (needed by {method} / {scheme.name})")
    return {k: STATS[k](scheme, outliers) for k in sorted(needs)}


def _share_hessians(cols: dict, fam) -> dict:
    """Collectors to hook, per Linear: siblings that read the very same input (the family's
    `shared_input`, e.g. q/k/v) get one Hessian between them, hooked on the first, since
    H = 2/n·XXᵀ depends on the input alone; computing it once instead of three times is the
    same matrix for a third of the work (GPTQ copies H before changing it)."""
    hooked = {rel: list(c.values()) for rel, c in cols.items()}
    for names in fam.shared_input:
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
    stats = {rel: _AbsMax() for rel in wanted}
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
        if cfg.smooth is not None:
            _smooth(block, fam, inputs, cfg.smooth, plans, prefix)
        for group in _groups(block, fam, cfg.sequential):
            todo = [(rel, plans.get(prefix + rel, (None, None))) for rel in group]
            todo = [(rel, sc, m) for rel, (sc, m) in todo if sc is not None]
            outl = _float_channels(block, inputs, todo)
            cols = {rel: _collectors(sc, m, outl.get(rel)) for rel, sc, m in todo}
            _observe(block, inputs, _share_hessians(cols, fam))
            for rel, scheme, method in todo:
                stats = {k: c.result() for k, c in cols.pop(rel).items()}  # popped: freed once used
                if "hessian" in stats:
                    stats["gptq"] = gopts
                swap_quantized(model, prefix + rel, block.get_submodule(rel), scheme, method, stats, info)
                done.add(prefix + rel)
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
    for name, (sc, _) in plans.items():  # layers kept in high precision are "done" too
        if name.startswith(fam.blocks + ".") and sc is None:
            done.add(name)
    return done


SMOOTH_SAMPLE_ROWS = 2048  # input rows per group that alpha="auto" is chosen on


def _smooth(block: nn.Module, fam, inputs, alpha, plans: dict, prefix: str) -> None:
    """SmoothQuant one block: per-channel input absmax of each smoothing group, then fold
    (alpha a number, or "auto": chosen per group on a sample of the calibration inputs)."""
    from .algorithms.smoothquant import act_key, candidate_scales, choose_alpha, fold, smooth

    groups = [(prev, [r for r in lins if plans.get(prefix + r, (None,))[0] is not None])
              for prev, lins in fam.smooth]
    groups = [(prev, lins) for prev, lins in groups if lins]
    if not groups:
        return
    rows = sum(h.shape[0] * h.shape[1] for h, _ in inputs)
    stride = max(1, -(-rows // SMOOTH_SAMPLE_ROWS)) if alpha == "auto" else None
    stats = {lins[0]: _AbsMax(stride) for _, lins in groups}  # the Linears of a group share their input
    _observe(block, inputs, {rel: [c] for rel, c in stats.items()})
    found = {}
    for prev, lins in groups:
        absmax = stats[lins[0]].result()
        if absmax is None:
            raise QuantkitError(f"no calibration inputs reached {prefix}{lins[0]}; SmoothQuant needs its range")
        found[prev] = (absmax, [linear_weight(block.get_submodule(r)) for r in lins],
                       [plans[prefix + r][0] for r in lins])
    if alpha != "auto":
        for prev, _ in groups:
            absmax, weights, _ = found[prev]
            smooth(_producers(block.get_submodule(prev)), weights, absmax, alpha)
        return
    # alpha="auto": for each candidate, the static ranges the final observer would choose on
    # all the calibration inputs divided by that candidate's scales (a second pass), then the
    # group's output error on the sample decides
    cands, ranges = {}, {}
    for prev, lins in groups:
        absmax, weights, schemes = found[prev]
        cands[prev] = candidate_scales(absmax, weights)
        statics = {act_key(sc): sc for sc in schemes if sc.act == "static"}
        ranges[prev] = {(a, k): _Range(sc, s, top_channels(absmax / s, sc.act_outliers) if sc.act_outliers else None)
                        for a, s in cands[prev].items() for k, sc in statics.items()}
    _observe(block, inputs, {lins[0]: list(ranges[prev].values()) for prev, lins in groups if ranges[prev]})
    for prev, lins in groups:
        absmax, weights, schemes = found[prev]
        options = {a: (s, {k: r.result() for (a2, k), r in ranges[prev].items() if a2 == a})
                   for a, s in cands[prev].items()}
        a, s = choose_alpha(stats[lins[0]].sample(), weights, schemes, options)
        log.info("SmoothQuant %s%s: alpha %.1f", prefix, prev, a)
        fold(_producers(block.get_submodule(prev)), weights, s)


def _producers(mod: nn.Module) -> list[torch.Tensor]:
    """The tensors whose dim 0 indexes `mod`'s output channels (where SmoothQuant folds 1/s)."""
    w = linear_weight(mod)
    if w is None:
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1:
            raise QuantkitError(f"SmoothQuant cannot fold a scale into {type(mod).__name__}")
    elif type(mod).__name__ == "Conv1D":
        raise QuantkitError("SmoothQuant folds into norms, or into nn.Linear rows; not into a Conv1D")
    bias = getattr(mod, "bias", None)
    return [w.data] + ([bias.data] if isinstance(bias, torch.Tensor) else [])
