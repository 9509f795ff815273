"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", arXiv:2210.17323).

Quantizes the columns of W [out, in] one at a time, and after each column spreads its
rounding error over the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs (H = 2/n · XXᵀ, see hessian.py), so that ||WX - ŴX||² stays small:

    Hinv = upper Cholesky factor of (H + λI)⁻¹
    for each column i:   q_i = quant(w_i);   e = (w_i - q_i) / Hinv[i, i]
                         W[:, i:] -= e · Hinv[i, i:]

Three pieces, kept apart: the statistics (hessian.HessianAccumulator), the solver
(`_solve`, with the paper's lazy batches of `block_size` columns), and the scale/zero
chooser (formats.integer.choose_qparams, the same one RTN uses). The result is built with
`from_int_codes`, so it is stored, dequantized and run exactly like an RTN weight of the
same scheme.

Options (`stats["gptq"]`, a dict with the fields of scheme.GPTQOptions):
damp (fraction of the mean Hessian diagonal added to it, 0.01), block_size (lazy-batch
width, 128), act_order (columns in descending Hessian-diagonal order, True), static_groups
(grouped schemes: every group's scale/zero chosen up front from the un-updated weights,
False).

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
from dataclasses import fields

import torch

from ..errors import QuantkitError, SchemeError
from ..formats import QuantizedWeight
from ..formats.integer import choose_qparams, dequantize_with, from_int_codes, group_len, quantize_with
from ..scheme import PER_TENSOR, GPTQOptions, Scheme
from . import Algorithm, register

log = logging.getLogger(__name__)


def _options(stats: dict) -> GPTQOptions:
    opts = stats.get("gptq") or {}
    if isinstance(opts, GPTQOptions):
        return opts
    valid = {f.name for f in fields(GPTQOptions)}
    unknown = set(opts) - valid
    if unknown:
        raise SchemeError(f"unknown GPTQ option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}")
    return GPTQOptions(**opts)


def _check(w: torch.Tensor, H: torch.Tensor, scheme: Scheme) -> None:
    if scheme.kind != "int":
        raise SchemeError(f"GPTQ produces integer schemes (int2..int8), not {scheme.name}")
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


def _inverse_factor(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), float64 [in, in]."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise QuantkitError("GPTQ: the dampened Hessian is not positive definite; raise damp "
                            "(e.g. 0.1) or give more calibration data")
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise QuantkitError("GPTQ: the inverse Hessian is numerically not positive definite; raise damp (e.g. 0.1)")
    return U


def _solve(w: torch.Tensor, U: torch.Tensor, scheme: Scheme, opts: GPTQOptions, perm: "torch.Tensor | None"):
    """Lazy-batch GPTQ in processing order.

    w: float32 [out, in], already permuted (processing order); U: float32 upper factor of
    the permuted H⁻¹ [in, in]; perm[j] = original column of processing position j (None =
    identity). Returns (codes int32 [out, in] in processing order, scale fp16 [R, ng],
    zero uint8 [R, ng] or None), groups in ORIGINAL column order (R = out, or 1 per tensor).
    """
    out, inn = w.shape
    dev = w.device
    orig = torch.arange(inn, device=dev) if perm is None else perm  # [in] original column of position j
    pos = torch.empty_like(orig)
    pos[orig] = torch.arange(inn, device=dev)  # [in] processing position of original column c
    L = group_len(scheme, inn)
    grouped = scheme.grouped
    ng = inn // L if grouped else 1
    gid = (orig // L) if grouped else torch.zeros_like(orig)  # [in] group of position j
    rows = 1 if scheme.group_size == PER_TENSOR else out
    scale = torch.empty(rows, ng, dtype=torch.float16, device=dev)
    zero = None if scheme.symmetric else torch.empty(rows, ng, dtype=torch.uint8, device=dev)
    lazy = grouped and not opts.static_groups
    if not lazy:  # every scale/zero now, from the un-updated weights
        w0 = w[:, pos]  # [out, in] back in original order
        wg = w0.reshape(1, 1, -1) if scheme.group_size == PER_TENSOR else w0.reshape(out, ng, -1)
        s, z = choose_qparams(wg, scheme)  # [rows, ng]
        scale.copy_(s)
        if zero is not None:
            zero.copy_(z)
    chosen = [False] * ng
    gid_list = gid.tolist()
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
                s, z = choose_qparams(cur, scheme)  # [out]
                scale[:, g] = s
                if zero is not None:
                    zero[:, g] = z
                chosen[g] = True
            s = scale[:, g]  # [rows]
            z = None if zero is None else zero[:, g]
            x = W1[:, i]  # [out]
            qi = quantize_with(x, s, z, scheme)  # [out] int32
            err = (x - dequantize_with(qi, s, z)) / U1[i, i]  # [out]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
            q[:, j] = qi
        if i2 < inn:
            w[:, i2:] -= E1 @ U[i1:i2, i2:]
    return q, scale, zero


def gptq(w: torch.Tensor, scheme: Scheme, stats: dict) -> QuantizedWeight:
    """GPTQ-quantize w [out, in] under an integer scheme, given stats["hessian"] (float64 [in, in]).

    Options in stats.get("gptq", {}): damp, block_size, act_order, static_groups (see the
    module docstring). Deterministic; the result dequantizes like any RTN weight of `scheme`.
    """
    if not stats or stats.get("hessian") is None:
        raise QuantkitError("GPTQ needs calibration data: stats must hold the layer's input Hessian "
                            "(stats['hessian'], float64 [in, in]); quantize with calibration text, or use method rtn")
    opts = _options(stats)
    H = stats["hessian"]
    _check(w, H, scheme)
    w, H = _prepare(w, H, opts.damp)
    perm = None
    if opts.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)  # [in] original column of position j
        w = w[:, perm]
        H = H[perm][:, perm]
    U = _inverse_factor(H).to(torch.float32)
    q, scale, zero = _solve(w, U, scheme, opts, perm)
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return from_int_codes(scheme, q, scale, zero)


def gptq_reference(w: torch.Tensor, H: torch.Tensor, scheme: Scheme, damp: float = 0.01,
                   dtype: torch.dtype = torch.float64) -> QuantizedWeight:
    """Slow, literal Algorithm 1 of the paper: column by column, no lazy batches, no act-order.

    Same preprocessing (dead columns, dampening) and the same scale/zero rule as `gptq`
    (per tensor / per channel: from the whole weight up front; groups: from the current
    weights of the group when its first column is reached). Golden reference for tests;
    `dtype` is the precision of the weight updates.
    """
    _check(w, H, scheme)
    w, H = _prepare(w, H, damp)
    U = _inverse_factor(H).to(dtype)  # Hinv ← Cholesky(H⁻¹)ᵀ
    W = w.to(dtype)
    out, inn = W.shape
    L = group_len(scheme, inn)
    rows = 1 if scheme.group_size == PER_TENSOR else out
    ng = inn // L
    scale = torch.empty(rows, ng, dtype=torch.float16, device=W.device)
    zero = None if scheme.symmetric else torch.empty(rows, ng, dtype=torch.uint8, device=W.device)
    if not scheme.grouped:
        s, z = choose_qparams(W.reshape(1, -1) if scheme.group_size == PER_TENSOR else W, scheme)
        scale[:, 0] = s
        if zero is not None:
            zero[:, 0] = z
    Q = torch.empty(out, inn, dtype=torch.int32, device=W.device)
    for i in range(inn):
        g = i // L
        if scheme.grouped and i % L == 0:
            s, z = choose_qparams(W[:, i:i + L], scheme)
            scale[:, g] = s
            if zero is not None:
                zero[:, g] = z
        s, z = scale[:, g], None if zero is None else zero[:, g]
        Q[:, i] = quantize_with(W[:, i], s, z, scheme)
        e = (W[:, i] - dequantize_with(Q[:, i], s, z).to(dtype)) / U[i, i]  # [out]
        W[:, i:] -= torch.outer(e, U[i, i:])
    return from_int_codes(scheme, Q, scale, zero)


register(Algorithm("gptq", gptq, needs=frozenset({"hessian"}), kinds=frozenset({"int"}),
                   summary="GPTQ: second-order error compensation with the layer-input Hessian (calibrated)"))
