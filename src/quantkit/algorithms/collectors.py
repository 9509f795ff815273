"""Collectors of layer-input statistics, by the name a method or scheme `needs`.

Each is an object with `add(x)` (a batch of inputs [..., in]) and `result()`; calibration
(calibrate.py) hooks them on the Linears' inputs. `STATS` maps a statistic's name to the
factory of its collector; a method that needs a new statistic adds its collector here.
"""
from __future__ import annotations

import torch

from ..observers import make_observer
from ..scheme import Scheme
from .hessian import HessianAccumulator


class Hessian(HessianAccumulator):
    """GPTQ's statistic: H = 2/n·XXᵀ of the layer's inputs (hessian.py)."""

    def result(self):
        return self.hessian


class Range:
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


class AbsMax:
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


# statistic name -> collector factory ((scheme, float channels or None) -> object with add(x) and result())
STATS = {"hessian": lambda scheme, outliers: Hessian(), "act_range": lambda scheme, outliers: Range(scheme, None, outliers)}
