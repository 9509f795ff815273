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
(arch.Family.smooth); the statistics (max|X_j| over the calibration tokens) come from the
pipeline (calibrate.py).
"""
from __future__ import annotations

import torch

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
