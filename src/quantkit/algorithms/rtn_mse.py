"""RTN with an MSE-chosen clipping range: round to nearest, but on the grid whose range minimises
the squared rounding error of each group (or row), searched over a few clip ratios.

Plain RTN spans each group's full range [min, max], so a single large value stretches the grid
for all the others. Shrinking the range by a ratio r clips that value but rounds the rest more
finely; the best r per group is the one with the smallest ||w - deq(q(w))||². This is the
"MSE" range search used for weights by e.g. llama.cpp's legacy quantizers and by GPTQ's
reference code (`Quantizer.find_params(..., mse=True)`, grid of 1 − i/100 ratios), written here
from that description. Data-free, integer schemes only; r = 1 (plain RTN) is always a
candidate, so no group's error exceeds RTN's. The result is stored exactly like RTN's.
It minimises the *weight* error, not the layer's output error: clipping a rare large weight
that the model needs can cost more than the finer grid gains, so it is no quality claim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.integer import choose_qparams, dequantize_with, from_int_codes, group_len, quantize_with
from ..scheme import PER_TENSOR
from .base import Method, register_method

RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.00, 0.95, ..., 0.50


@register_method
@dataclass(frozen=True)
class RTNMSE(Method):
    """RTN on the clipping range (of RATIOS) with the smallest squared error per group; integer schemes."""

    name = "rtn-mse"
    kinds = frozenset({"int"})
    summary = "round to nearest on the grid whose clipping range minimises each group's squared error"

    def quantize(self, w, scheme, stats=None):
        return rtn_mse(w, scheme)


def rtn_mse(w, scheme):
    w = w.detach().float()
    out, inn = w.shape
    L = group_len(scheme, inn)
    wg = w.reshape(1, 1, -1) if scheme.group_size == PER_TENSOR else w.reshape(out, inn // L, L)  # [r, g, L]
    best = None  # (error [r, g], scale, zero)
    for r in RATIOS:
        scale, zero = choose_qparams(wg * r, scheme)  # the grid of the range shrunk by r
        zs = None if zero is None else zero[..., None]
        q = quantize_with(wg, scale[..., None], zs, scheme)
        err = (dequantize_with(q, scale[..., None], zs) - wg).pow(2).sum(-1)  # [r, g]
        if best is None:
            best = [err, scale, zero]
            continue
        better = err < best[0]
        best[0] = torch.where(better, err, best[0])
        best[1] = torch.where(better, scale, best[1])
        if zero is not None:
            best[2] = torch.where(better, zero, best[2])
    _, scale, zero = best
    q = quantize_with(wg, scale[..., None], None if zero is None else zero[..., None], scheme)
    return from_int_codes(scheme, q.reshape(out, inn), scale, zero)

