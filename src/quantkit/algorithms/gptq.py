"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323).

Quantizes the columns of W [out, in] one at a time, and after each column spreads its
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs (H = 2/n · XXᵀ, see hessian.py), so that ||WX - ŴX||² stays small:

    Hinv = upper Cholesky factor of (H + λI)⁻¹
    for each column i:   q_i = quant(w_i);   e = (w_i - q_i) / Hinv[i, i]
                         W[:, i:] -= e · Hinv[i, i:]

Three pieces, kept apart: the statistics (hessian.HessianAccumulator), the solver
(`_solve`, with the paper's lazy batches of `block_size` columns), and the grid: for integer
schemes the scale/zero chooser RTN uses (formats.integer.choose_qparams), for GGUF block
types (`gguf-q4_0`, `gguf-q4_k`, ...) the type's own parameter choice (formats/ggml.py,
ggml_k.py; for K-quants this includes quantizing the sub-block scales). The result is stored,
dequantized and run exactly like an RTN weight of the same scheme, and a GGUF block weight
goes into a GGUF file byte for byte.

Options (the fields of `GPTQ`): damp (fraction of the mean Hessian diagonal added to it,
0.01), block_size (lazy-batch width, 128), act_order (columns in descending Hessian-diagonal
order, True), static_groups (grouped schemes: every group's scale/zero chosen up front from
the un-updated weights, False).

Scales and zeros: per tensor / per channel, chosen once from the whole weight before any
update. Grouped schemes store groups of consecutive ORIGINAL columns (the layout every
kernel and checkpoint expects), whatever the processing order. A group's scale/zero are
chosen when the first of its columns is reached in processing order, from the current
(already error-updated) values of all its columns; none of them is quantized yet at that
point, so this is well defined with or without act_order. Without act_order this is the
paper's behaviour; with act_order it is the layout-preserving counterpart of the reference
implementation's g_idx (which groups columns by processing position and so needs a
permutation at inference time): groups stay contiguous, the order only decides when each
group's parameters are fixed. static_groups=True fixes all of them up front instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import QuantkitError, SchemeError
from ..formats import QuantizedWeight
from ..formats.integer import choose_qparams, dequantize_with, from_int_codes, group_len, quantize_with
from ..scheme import PER_TENSOR, Scheme
from .base import Method, register_method

log = logging.getLogger(__name__)


def _check(w: torch.Tensor, H: torch.Tensor, scheme: Scheme) -> None:
    if scheme.kind not in ("int", "ggml"):
        raise SchemeError(f"GPTQ produces integer schemes (int2..int8) and GGUF block types (gguf-q4_k, ...), "
                          f"not {scheme.name}")
    scheme.validate_for(tuple(w.shape))
    inn = w.shape[1]
    if tuple(H.shape) != (inn, inn):
        raise QuantkitError(f"GPTQ Hessian has shape {tuple(H.shape)}, expected ({inn}, {inn}) for a weight {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise QuantkitError("cannot quantize a weight that contains NaN or Inf")
    if not bool(torch.isfinite(H).all()):
        raise QuantkitError("the GPTQ Hessian contains NaN or Inf; check the calibration activations")


def _prepare(w: torch.Tensor, H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns (zero diagonal) get diag 1 and zero weights; then H += damp·mean(diag)·I.

    Returns (w float32 [out, in], H float64 [in, in]), both fresh copies.
    """
    w = w.detach().to(torch.float32).clone()
    H = H.detach().to(device=w.device, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0  # [in]
    if bool(dead.any()):
        H[dead, dead] = 1.0
        w[:, dead] = 0.0
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp * torch.mean(torch.diag(H))
    return w, H


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor L of H (H = LLᵀ)."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise QuantkitError("GPTQ: the dampened Hessian is not positive definite; raise damp "
                            "(e.g. 0.1) or give more calibration data")
    return L


def _upper_of_inverse(Hinv: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ = UᵀU, given H⁻¹."""
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise QuantkitError("GPTQ: the inverse Hessian is numerically not positive definite; raise damp (e.g. 0.1)")
    return U


def _inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), float64 [in, in]."""
    return _upper_of_inverse(torch.cholesky_inverse(_cholesky(H)))


class _IntGrid:
    """Scale/zero bookkeeping for integer schemes (formats.integer), group by group."""

    def __init__(self, scheme: Scheme, out: int, inn: int, dev):
        self.scheme = scheme
        self.L = group_len(scheme, inn)
        self.ng = inn // self.L if scheme.grouped else 1
        rows = 1 if scheme.group_size == PER_TENSOR else out
        self.scale = torch.empty(rows, self.ng, dtype=torch.float16, device=dev)
        self.zero = None if scheme.symmetric else torch.empty(rows, self.ng, dtype=torch.uint8, device=dev)

    def choose(self, g: int, cur: torch.Tensor) -> None:  # cur [out, L] current values of group g
        s, z = choose_qparams(cur, self.scheme)
        self.scale[:, g] = s
        if self.zero is not None:
            self.zero[:, g] = z

    def choose_all(self, w0: torch.Tensor) -> None:  # w0 [out, in], original column order
        out = w0.shape[0]
        wg = w0.reshape(1, 1, -1) if self.scheme.group_size == PER_TENSOR else w0.reshape(out, self.ng, -1)
        s, z = choose_qparams(wg, self.scheme)  # [rows, ng]
        self.scale.copy_(s)
        if self.zero is not None:
            self.zero.copy_(z)

    def quantize(self, x: torch.Tensor, g: int, jg: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and dequantized values of column x [out] (column jg of group g)."""
        s = self.scale[:, g]
        z = None if self.zero is None else self.zero[:, g]
        q = quantize_with(x, s, z, self.scheme)
        return q, dequantize_with(q, s, z)

    def result(self, q: torch.Tensor) -> QuantizedWeight:
        return from_int_codes(self.scheme, q, self.scale, self.zero)


class _GGMLGrid:
    """GGML block types (gguf-q4_0, gguf-q4_k, ...): GPTQ onto the GGUF grid itself.

    A group is one block (32) or super-block (256); its parameters (scales, mins, and for
    K-quants the quantized sub-block scales) are chosen from the current values when it starts.
    """

    def __init__(self, scheme: Scheme, out: int, inn: int, dev):
        from ..formats.ggml import grid

        self.scheme, self.grid = scheme, grid(scheme.fp_format)
        self.L = self.grid.group
        self.ng = inn // self.L
        self.P: list = [None] * self.ng

    def choose(self, g: int, cur: torch.Tensor) -> None:
        self.P[g] = self.grid.params(cur)

    def choose_all(self, w0: torch.Tensor) -> None:
        for g in range(self.ng):
            self.choose(g, w0[:, g * self.L:(g + 1) * self.L])

    def quantize(self, x: torch.Tensor, g: int, jg: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.grid.code(x[:, None], self.P[g], jg)
        return q[:, 0], self.grid.value(q, self.P[g], jg)[:, 0]

    def result(self, q: torch.Tensor) -> QuantizedWeight:
        parts = [self.grid.pack(q[:, g * self.L:(g + 1) * self.L], self.P[g]) for g in range(self.ng)]
        return QuantizedWeight(self.scheme, (int(q.shape[0]), int(q.shape[1])), {"qweight": torch.cat(parts, dim=1)})


def _grid_for(scheme: Scheme, out: int, inn: int, dev):
    return (_GGMLGrid if scheme.kind == "ggml" else _IntGrid)(scheme, out, inn, dev)


def _solve(w: torch.Tensor, U: torch.Tensor, scheme: Scheme, opts: "GPTQ", perm: "torch.Tensor | None"):
    """Lazy-batch GPTQ in processing order.

    w: float32 [out, in], already permuted (processing order); U: float32 upper factor of
    the permuted H⁻¹ [in, in]; perm[j] = original column of processing position j (None =
    identity). Returns (codes int32 [out, in] in processing order, grid holding the group
    parameters, groups in ORIGINAL column order).
    """
    out, inn = w.shape
    dev = w.device
    orig = torch.arange(inn, device=dev) if perm is None else perm  # [in] original column of position j
    pos = torch.empty_like(orig)
    pos[orig] = torch.arange(inn, device=dev)  # [in] processing position of original column c
    grid = _grid_for(scheme, out, inn, dev)
    L = grid.L
    grouped = scheme.grouped
    ng = grid.ng
    gid = (orig // L) if grouped else torch.zeros_like(orig)  # [in] group of position j
    lazy = grouped and not opts.static_groups
    if not lazy:  # every group's parameters now, from the un-updated weights
        grid.choose_all(w[:, pos])
    chosen = [False] * ng
    gid_list = gid.tolist()
    col_in_group = (orig % L).tolist() if grouped else orig.tolist()
    q = torch.empty(out, inn, dtype=torch.int32, device=dev)
    B = opts.block_size
    for i1 in range(0, inn, B):
        i2 = min(i1 + B, inn)
        W1 = w[:, i1:i2].clone()  # [out, b] current values of this block
        E1 = torch.zeros_like(W1)  # [out, b] scaled errors (w - dq) / U[j, j]
        U1 = U[i1:i2, i1:i2]  # [b, b]
        for i in range(i2 - i1):
            j = i1 + i
            g = gid_list[j]
            if lazy and not chosen[g]:
                cols = pos[g * L:(g + 1) * L]  # [L] processing positions of the group, all >= j
                inb = cols < i2
                cur = torch.empty(out, L, dtype=w.dtype, device=dev)  # [out, L] current values
                cur[:, inb] = W1[:, cols[inb] - i1]
                later = cols[~inb]
                if later.numel():  # not yet updated by this block's errors: apply them now
                    cur[:, ~inb] = w[:, later] - E1[:, :i] @ U[i1:j, later]
                grid.choose(g, cur)
                chosen[g] = True
            x = W1[:, i]  # [out]
            qi, dq = grid.quantize(x, g, col_in_group[j])  # [out] int32, [out]
            err = (x - dq) / U1[i, i]  # [out]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
            q[:, j] = qi
        if i2 < inn:
            w[:, i2:] -= E1 @ U[i1:i2, i2:]
    return q, grid


@register_method
@dataclass(frozen=True)
class GPTQ(Method):
    """GPTQ's solver options; `quantize` needs stats["hessian"] (float64 [in, in])."""

    name = "gptq"
    needs = frozenset({"hessian"})
    kinds = frozenset({"int", "ggml"})
    summary = "GPTQ: second-order error compensation with the layer-input Hessian (calibrated)"

    damp: float = field(default=0.01, metadata={"flag": "--damp", "help": "fraction of the mean Hessian diagonal added to it"})
    block_size: int = field(default=128, metadata={"flag": "--gptq-block-size", "help": "lazy-batch width in columns"})
    act_order: bool = field(default=True, metadata={
        "flag": "--act-order", "help": "columns in descending Hessian-diagonal order (--no-act-order: natural order)"})
    static_groups: bool = field(default=False, metadata={
        "flag": "--static-groups", "help": "with act-order: choose every group's scale up front"})

    def __post_init__(self):
        if isinstance(self.damp, int) and not isinstance(self.damp, bool):
            object.__setattr__(self, "damp", float(self.damp))
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise SchemeError(f"GPTQ damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise SchemeError(f"GPTQ block size must be a positive integer, got {self.block_size!r}")
        for k in ("act_order", "static_groups"):
            if not isinstance(getattr(self, k), bool):
                raise SchemeError(f"GPTQ {k} must be true or false, got {getattr(self, k)!r}")

    def quantize(self, w, scheme, stats):
        return gptq(w, scheme, stats, self)


def gptq(w: torch.Tensor, scheme: Scheme, stats: dict, opts: "GPTQ | None" = None) -> QuantizedWeight:
    """GPTQ-quantize w [out, in] under an integer or GGML scheme, given stats["hessian"]
    (float64 [in, in]) and the options `opts` (GPTQ(); see the module docstring).
    Deterministic; the result dequantizes like any RTN weight of `scheme`.
    """
    if not stats or stats.get("hessian") is None:
        raise QuantkitError("GPTQ needs calibration data: stats must hold the layer's input Hessian "
                            "(stats['hessian'], float64 [in, in]); quantize with calibration text, or use method rtn")
    opts = GPTQ() if opts is None else opts
    H = stats["hessian"]
    _check(w, H, scheme)
    w, H = _prepare(w, H, opts.damp)
    perm = None
    if opts.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)  # [in] original column of position j
        w = w[:, perm]
        H = H[perm]  # two steps, each dropping the previous copy: at most two [in, in] alive
        H = H[:, perm]
    # _inverse_factor step by step, each float64 [in, in] dropped as soon as the next exists
    # (at most two alive, not four: for a wide layer, tens of MB less at the walk's peak)
    H = _cholesky(H)
    H = torch.cholesky_inverse(H)
    U = _upper_of_inverse(H)
    del H
    U = U.to(torch.float32)
    q, grid = _solve(w, U, scheme, opts, perm)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return grid.result(q)

