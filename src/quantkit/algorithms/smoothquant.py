"""SmoothQuant (Xiao et al. 2022, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", arXiv:2211.10438).

Activations of LLMs have a few input channels with values far larger than the rest, which a
per-tensor int8 scale cannot hold without crushing the others; weights have no such
channels. SmoothQuant moves the difficulty from activations to weights with one scale per
input channel j, chosen from calibration data:

    s_j = max|X_j|^α / max|W_:,j|^(1-α)          (α = migration strength, 0.5 by default)
    Y = X W^T = (X diag(s)^-1) (W diag(s))^T

X / s is folded into the module that produces X (a norm's weight and bias, or the rows of
the Linear before), W·s into the Linears that read it, so the float model computes exactly
the same function before it is quantized. Which modules pair up is declared per model family
(arch.Family.smooth); the statistics (max|X_j| over the calibration tokens, and for
alpha="auto" a sample of the inputs) are gathered on the block's calibration inputs, which
calibration (calibrate.py) hands to `SmoothQuant.apply` before the block is quantized.

alpha="auto" (`choose_alpha`) picks alpha per group from ALPHAS: the one whose smoothed and
quantized Linears reproduce the group's float outputs best on the calibration sample, the way
Intel Neural Compressor's SmoothQuant tunes it per layer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import QuantkitError, SchemeError
from ..formats.integer import top_channels
from ..modules import linear_weight
from .base import Transform, register_transform
from .collectors import AbsMax, Range

log = logging.getLogger(__name__)

MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [in] from act_absmax [in] and the weights [out_i, in] of the Linears that share the input."""
    w_absmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)  # [in]
    a = act_absmax.float().clamp(min=MIN_SCALE)
    s = a.pow(alpha) / w_absmax.clamp(min=MIN_SCALE).pow(1 - alpha)
    s = torch.where((act_absmax > 0) & (w_absmax > 0), s, torch.ones_like(s))  # dead channels untouched
    return s.clamp(min=MIN_SCALE)


@torch.no_grad()
def fold(producers: list[torch.Tensor], weights: list[torch.Tensor], s: torch.Tensor) -> None:
    """In place: divide the producers' channels (dim 0: a norm's weight and bias [in], or the
    rows [in, ...] and bias of the Linear before) by s, multiply the weights' input columns
    ([out, in], views are fine) by s."""
    for t in producers:
        t.div_(s.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1))))
    for w in weights:
        w.mul_(s.to(w.dtype)[None, :])


def smooth(producers: list[torch.Tensor], weights: list[torch.Tensor], act_absmax: torch.Tensor,
           alpha: float) -> torch.Tensor:
    """Smooth one group of Linears that read the same input; returns the scales used."""
    s = smoothing_scales(act_absmax, weights, alpha)
    fold(producers, weights, s)
    return s


# ---------------------------------------------------------------- choosing alpha per group
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def act_key(scheme) -> tuple:
    """Schemes with the same key quantize a layer input the same way."""
    return (scheme.act, scheme.observer, scheme.act_symmetric, scheme.act_outliers)


def _fake_input(x: torch.Tensor, scheme, qparams=None) -> torch.Tensor:
    """The layer input as the quantized model will see it (float, [N, in]); a static scheme
    uses `qparams` (scale, zero) when given, else observes x itself."""
    from ..formats.integer import fake_quantize_activation
    from ..observers import make_observer

    if scheme.act == "dynamic":
        return fake_quantize_activation(x)
    if scheme.act == "static":
        if qparams is None:
            obs = make_observer(scheme.observer, bits=8, symmetric=scheme.act_symmetric)
            obs.update(x)
            qparams = obs.qparams()
        return fake_quantize_activation(x, *qparams)
    return x


def group_error(x: torch.Tensor, weights: list[torch.Tensor], schemes: list, s: torch.Tensor,
                qparams: dict | None = None, ys: list[torch.Tensor] | None = None) -> float:
    """Σ_i Σ_rows ||x̂ Ŵ_iᵀ - x W_iᵀ||² / ||x W_iᵀ||² (each token's relative output error, so the
    few tokens with massive activations and outputs do not outweigh all the others) when the
    group (input sample x [N, in], Linears W_i [out_i, in] stored as schemes[i]) is smoothed
    by s and then quantized (weights by round-to-nearest).
    qparams: {act_key(scheme): (scale, zero)} of static schemes, observed on all the
    calibration inputs divided by s (the sample alone can misjudge rare massive values).
    ys: the float outputs x W_iᵀ, when the caller has them (they do not depend on s)."""
    from ..formats import quantize

    err = 0.0
    xs = x / s
    fake: dict = {}
    for i, (w, scheme) in enumerate(zip(weights, schemes)):
        key = act_key(scheme)
        if key not in fake:
            fake[key] = _fake_input(xs, scheme, (qparams or {}).get(key))
        ws = w.float() * s[None, :]
        wq = ws if scheme.is_float else quantize(ws, scheme).dequantize()
        y = x @ w.float().T if ys is None else ys[i]  # [N, out]
        err += float((((fake[key] @ wq.T - y) ** 2).sum(1) / (y * y).sum(1).clamp(min=1e-12)).sum())
    return err


@torch.no_grad()  # weights are Parameters: no autograd graph for the search's products
def choose_alpha(x: torch.Tensor, weights: list[torch.Tensor], schemes: list, candidates: dict) -> tuple[float, torch.Tensor]:
    """The migration strength whose smoothed-then-quantized group reproduces the float outputs
    best on the sample x [N, in]. candidates: {alpha: (s, qparams)} (see `candidate_scales`
    and `group_error`); returns (alpha, s). Layers differ a lot (those fed by massive
    activations want more migration), so one alpha for a whole model is a compromise this
    search avoids."""
    best = None
    ys = [x @ w.float().T for w in weights]  # the float outputs, the same for every candidate
    for a, (s, qp) in candidates.items():
        e = group_error(x, weights, schemes, s, qp, ys)
        if best is None or e < best[0]:
            best = (e, a, s)
    return best[1], best[2]


def candidate_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alphas=ALPHAS) -> dict:
    """{alpha: s} for the search."""
    return {a: smoothing_scales(act_absmax, weights, a) for a in alphas}


# ---------------------------------------------------------------- the block transform
SMOOTH_SAMPLE_ROWS = 2048  # input rows per group that alpha="auto" is chosen on


@register_transform
@dataclass(frozen=True)
class SmoothQuant(Transform):
    """Smooth each of a block's (producer, Linears) pairs (arch.Family.smooth) before its
    Linears are quantized. alpha: migration strength in [0, 1], or "auto" (chosen per group)."""

    name = "smoothquant"
    needs = frozenset({"absmax"})
    summary = "SmoothQuant: per-channel scales moved from activations into weights (calibrated)"

    alpha: "float | str" = field(default=0.5, metadata={
        "flag": "--smooth", "enables": True, "help": "migration strength in [0, 1] or auto (chosen per layer group)"})

    def __post_init__(self):
        a = self.alpha
        if isinstance(a, str) and a != "auto":
            try:
                a = float(a)
            except ValueError:
                a = None
        if a != "auto" and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise SchemeError(f"SmoothQuant alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        object.__setattr__(self, "alpha", a if a == "auto" else float(a))

    def apply(self, block: nn.Module, ctx) -> None:
        """Per-channel input absmax of each smoothing group, then fold (alpha a number, or
        "auto": chosen per group on a sample of the calibration inputs)."""
        groups = [(prev, [r for r in lins if ctx.scheme_of(r) is not None]) for prev, lins in ctx.family.smooth]
        groups = [(prev, lins) for prev, lins in groups if lins]
        if not groups:
            return
        alpha = self.alpha
        rows = sum(h.shape[0] * h.shape[1] for h, _ in ctx.inputs)
        stride = max(1, -(-rows // SMOOTH_SAMPLE_ROWS)) if alpha == "auto" else None
        stats = {lins[0]: AbsMax(stride) for _, lins in groups}  # the Linears of a group share their input
        ctx.observe({rel: [c] for rel, c in stats.items()})
        found = {}
        for prev, lins in groups:
            absmax = stats[lins[0]].result()
            if absmax is None:
                raise QuantkitError(f"no calibration inputs reached {ctx.prefix}{lins[0]}; SmoothQuant needs its range")
            found[prev] = (absmax, [linear_weight(block.get_submodule(r)) for r in lins], [ctx.scheme_of(r) for r in lins])
        if alpha != "auto":
            for prev, _ in groups:
                absmax, weights, _ = found[prev]
                smooth(producers(block.get_submodule(prev)), weights, absmax, alpha)
            return
        # alpha="auto": for each candidate, the static ranges the final observer would choose on
        # all the calibration inputs divided by that candidate's scales (a second pass), then the
        # group's output error on the sample decides
        cands, ranges = {}, {}
        for prev, lins in groups:
            absmax, weights, schemes = found[prev]
            cands[prev] = candidate_scales(absmax, weights)
            statics = {act_key(sc): sc for sc in schemes if sc.act == "static"}
            ranges[prev] = {(a, k): Range(sc, s, top_channels(absmax / s, sc.act_outliers) if sc.act_outliers else None)
                            for a, s in cands[prev].items() for k, sc in statics.items()}
        ctx.observe({lins[0]: list(ranges[prev].values()) for prev, lins in groups if ranges[prev]})
        for prev, lins in groups:
            absmax, weights, schemes = found[prev]
            options = {a: (s, {k: r.result() for (a2, k), r in ranges[prev].items() if a2 == a})
                       for a, s in cands[prev].items()}
            a, s = choose_alpha(stats[lins[0]].sample(), weights, schemes, options)
            log.info("SmoothQuant %s%s: alpha %.1f", ctx.prefix, prev, a)
            fold(producers(block.get_submodule(prev)), weights, s)


def producers(mod: nn.Module) -> list[torch.Tensor]:
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
