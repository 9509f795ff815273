"""The statistics GPTQ needs: the layer-input Hessian H = 2/n · Σ x xᵀ (Frantar et al. 2022).

For a Linear y = W x with squared output error ||W X - Ŵ X||², the Hessian with respect to
each row of W is 2 X Xᵀ; GPTQ uses its mean over the n calibration rows.

Accumulation strategy:

* float64 throughout: inputs (float32 or bf16) are cast to float64 before the product, so
  the sum of many rank-m updates loses nothing that matters to the Cholesky solve.
* running mean: after n rows, adding m rows X [m, in] gives
  H ← H · n/(n+m) + 2/(n+m) · XᵀX, so H is always 2/n · Σ x xᵀ over the rows seen so far —
  the same matrix (up to float64 rounding) however the rows are split into batches, with
  no division by a count that is only known at the end.
* any leading shape: x [..., in] is flattened to rows [N, in] (Linear and transformers'
  Conv1D inputs alike); rows are cast in chunks so a large batch never needs a full
  float64 copy at once.
"""
from __future__ import annotations

import torch

from ..errors import QuantkitError

CHUNK_ROWS = 8192  # rows cast to float64 at a time


class HessianAccumulator:
    """Accumulates H = 2/n · Σ x xᵀ (float64 [in, in]) over layer inputs x [..., in]."""

    def __init__(self, in_features: "int | None" = None):
        self.in_features = in_features
        self.n = 0  # rows seen
        self._h: "torch.Tensor | None" = None  # float64 [in, in]

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs of shape [..., in_features] (any float dtype)."""
        if x.dim() == 0:
            raise QuantkitError("Hessian inputs must have at least one dimension [..., in_features]")
        d = int(x.shape[-1])
        if self.in_features is None:
            self.in_features = d
        elif d != self.in_features:
            raise QuantkitError(f"Hessian inputs have {d} features, expected {self.in_features}")
        rows = x.detach().reshape(-1, d)  # [N, in]
        if self._h is None:
            self._h = torch.zeros(d, d, dtype=torch.float64, device=rows.device)
        for i in range(0, rows.shape[0], CHUNK_ROWS):
            xc = rows[i:i + CHUNK_ROWS].to(device=self._h.device, dtype=torch.float64)  # [m, in]
            m = xc.shape[0]
            total = self.n + m
            self._h.mul_(self.n / total).add_(xc.T @ xc, alpha=2.0 / total)
            self.n = total

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2/n · Σ x xᵀ, float64 [in, in]. Raises if no input was ever added."""
        if self._h is None or self.n == 0:
            raise QuantkitError("no calibration inputs reached this layer, so its Hessian is undefined; "
                                "give more or longer calibration samples")
        return self._h
