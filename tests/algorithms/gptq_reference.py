"""GPTQ written straight from the paper, for tests only: Frantar et al. 2022, arXiv:2210.17323,
Algorithm 1, without its lazy batches (they change the order of the same updates, not the
result) and without act-order. It shares nothing with quantkit's solver: its own dampening,
its own inverse (torch.linalg.inv, then the Cholesky factor of the inverse), its own
scale/zero choice written from the grid's definition, so a mistake in quantkit's damping, in
its inverse-Cholesky step or in its qparam chooser shows up as a disagreement.

    H ← H + λ·mean(diag H)·I             (dead inputs first: H_ii = 1, W[:, i] = 0)
    U ← Cholesky(H⁻¹)ᵀ                   (upper triangular, H⁻¹ = UᵀU)
    for each column i:  q = quant(W[:, i]);  e = (W[:, i] − q) / U_ii;  W[:, i:] −= e ⊗ U[i, i:]

The grid is the one quantkit's integer schemes store: symmetric codes in [−(2^(b−1)−1),
2^(b−1)−1] with scale absmax/qmax, affine codes in [0, 2^b−1] with scale (max−min)/(2^b−1) of a
range that includes 0 and zero point round(−min/scale); scales are float16, rounded up so that
no value falls outside the grid. Per channel / per tensor, scales come from the whole weight up
front; in groups, from the group's current (error-updated) values when its first column is
reached, as the paper's grouped variant does.
"""
from __future__ import annotations

import numpy as np
import torch


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= x (x > 0), elementwise, via numpy's nextafter."""
    a = np.clip(x.double().numpy(), 2.0**-24, 65504.0)
    h = a.astype(np.float16)
    low = h.astype(np.float64) < a
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return torch.from_numpy(h)


def _grid(cols: torch.Tensor, bits: int, symmetric: bool):
    """(scale float16 [rows], zero float64 [rows] or None) of rows of values `cols` [rows, n]."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return _fp16_up(cols.abs().max(dim=1).values / qmax), None
    qmax = 2**bits - 1
    lo = torch.minimum(cols.min(dim=1).values, torch.zeros(()))
    hi = torch.maximum(cols.max(dim=1).values, torch.zeros(()))
    s = _fp16_up((hi - lo) / qmax)
    z = torch.round(-lo / s.double()).clamp(0, qmax)
    return s, z


def _round(col: torch.Tensor, s: torch.Tensor, z, bits: int, symmetric: bool) -> torch.Tensor:
    """Nearest grid point of each value of `col` [rows]: the dequantized value."""
    s = s.double()
    if symmetric:
        m = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(col / s), -m, m) * s
    return (torch.clamp(torch.round(col / s) + z, 0, 2**bits - 1) - z) * s


def gptq_reference(w: torch.Tensor, H: torch.Tensor, bits: int, symmetric: bool, group: int | None = None,
                   per_tensor: bool = False, damp: float = 0.01) -> torch.Tensor:
    """Ŵ [out, in] (float64, dequantized) that Algorithm 1 gives for W [out, in] and H [in, in].

    group: columns per group (None = per output channel); per_tensor: one scale for all."""
    W = w.detach().double().clone()
    H = H.detach().double().clone()
    out, inn = W.shape
    for i in range(inn):  # dead inputs: nothing to compensate with, and nothing to keep
        if H[i, i] == 0:
            H[i, i] = 1.0
            W[:, i] = 0.0
    H = H + damp * torch.diagonal(H).mean() * torch.eye(inn, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)  # H⁻¹ = UᵀU
    Q = torch.zeros_like(W)
    if group is None:
        src = W.reshape(1, -1) if per_tensor else W
        s, z = _grid(src, bits, symmetric)
        s, z = (s.expand(out), None if z is None else z.expand(out)) if per_tensor else (s, z)
    for i in range(inn):
        if group is not None and i % group == 0:
            s, z = _grid(W[:, i:i + group], bits, symmetric)
        Q[:, i] = _round(W[:, i], s, z, bits, symmetric)
        e = (W[:, i] - Q[:, i]) / U[i, i]  # [out]
        W[:, i:] -= torch.outer(e, U[i, i:])
    return Q
