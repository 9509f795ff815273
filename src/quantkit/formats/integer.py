"""Integer codecs ("int", and "llm-int8" which stores the same int8 per-channel weights).

Math (b bits, one scale s per group; a group is a whole row, a whole tensor, or N
consecutive input columns within a row):

* symmetric (absmax): s = absmax / (2^(b-1) - 1), q = clamp(round(w/s), -qmax, qmax), x = s*q.
* affine (min-max): a = min(min(w), 0), b = max(max(w), 0), s = (b - a) / (2^b - 1),
  Z = clamp(round(-a/s), 0, 2^b - 1), q = clamp(round(w/s) + Z, 0, 2^b - 1), x = s*(q - Z).

Scales are stored as float16 and rounded to float16 *before* the codes are computed, so
dequantization is exact with respect to what is stored. The fp16 rounding is directed
upwards (the smallest fp16 value >= the exact scale), so every value of the group lies in
the representable range and |w - x| <= s/2 holds for all of them. Scales are clamped to
[2^-24, 65504] (fp16 smallest subnormal / largest value): an all-zero group gets s > 0 and
dequantizes to exact zeros.

Storage ("qweight"): bits 2-4 packed (packing.pack of the flattened [out, in] codes), bits
5-7 one uint8 per code, bits 8 int8 (symmetric) or uint8 (affine). Symmetric codes below
8 bits are stored offset by +2^(b-1) so they are non-negative; the offset is implied by the
scheme. "scale" float16 [out, n_groups] ([1, 1] per tensor); affine adds "zero" uint8 of
the same shape.
"""
from __future__ import annotations

import math

import torch

from ..scheme import PER_TENSOR, Scheme
from . import packing
from .base import FORMATS, QuantizedWeight, register

MIN_SCALE = 2.0**-24  # smallest positive float16 (subnormal); exactly representable
MAX_SCALE = 65504.0  # largest finite float16


def qrange(scheme: Scheme) -> tuple[int, int]:
    """(qmin, qmax) of the semantic codes: symmetric [-(2^(b-1)-1), 2^(b-1)-1], affine [0, 2^b-1]."""
    if scheme.symmetric:
        m = 2 ** (scheme.bits - 1) - 1
        return -m, m
    return 0, 2**scheme.bits - 1


def group_len(scheme: Scheme, in_features: int) -> int:
    """Input columns sharing one scale within a row (per tensor: the whole row)."""
    return scheme.group_for(in_features)


def scale_shape(scheme: Scheme, shape: tuple[int, int]) -> tuple[int, int]:
    """Shape of the stored "scale" (and "zero") tensor for a weight of `shape`."""
    out, inn = shape
    if scheme.group_size == PER_TENSOR:
        return (1, 1)
    L = group_len(scheme, inn)
    return (out, inn // L if L else 0)


def fp16_scale_up(s: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 scales to float16, upwards, after clamping to [MIN_SCALE, MAX_SCALE]."""
    s = s.float().clamp(MIN_SCALE, MAX_SCALE)
    h = s.to(torch.float16)
    up = (h.view(torch.int16) + 1).view(torch.float16)  # next fp16 above a positive finite h
    return torch.where(h.float() < s, up, h)


def choose_qparams(w_groups: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, "torch.Tensor | None"]:
    """Scale (float16) and zero point (uint8, affine only) for each group.

    w_groups: [..., L], a group being the last dimension. Returns tensors of shape [...].
    """
    w = w_groups.float()
    qmin, qmax = qrange(scheme)
    if scheme.symmetric:
        return fp16_scale_up(w.abs().amax(dim=-1) / qmax), None
    lo = w.amin(dim=-1).clamp(max=0.0)
    hi = w.amax(dim=-1).clamp(min=0.0)
    s = fp16_scale_up((hi - lo) / qmax)
    z = torch.round(-lo / s.float()).clamp(0, qmax).to(torch.uint8)
    return s, z


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: "torch.Tensor | None", scheme: Scheme) -> torch.Tensor:
    """Round w to the grid of (scale, zero), all broadcast together; int32 semantic codes."""
    if scheme.symmetric != (zero is None):
        raise ValueError("zero must be None for symmetric schemes and given for affine ones")
    qmin, qmax = qrange(scheme)
    q = torch.round(w.float() / scale.float())
    if zero is not None:
        q = q + zero.float()
    return q.clamp(qmin, qmax).to(torch.int32)


def dequantize_with(q: torch.Tensor, scale: torch.Tensor, zero: "torch.Tensor | None") -> torch.Tensor:
    """x = s * (q - Z) in fp32 (Z = 0 when zero is None); arguments broadcast together."""
    qf = q.float() if zero is None else q.float() - zero.float()
    return scale.float() * qf


def _store_offset(scheme: Scheme) -> int:
    return 2 ** (scheme.bits - 1) if scheme.symmetric and scheme.bits < 8 else 0


def from_int_codes(
    scheme: Scheme, q: torch.Tensor, scale_fp16: torch.Tensor, zero_uint8: "torch.Tensor | None"
) -> QuantizedWeight:
    """Build a QuantizedWeight from semantic codes q [out, in], scale and zero [out, n_groups]."""
    if q.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(q.shape)}")
    shape = (int(q.shape[0]), int(q.shape[1]))
    scheme.validate_for(shape)
    if scheme.symmetric != (zero_uint8 is None):
        raise ValueError("zero must be None for symmetric schemes and given for affine ones")
    qmin, qmax = qrange(scheme)
    q = q.to(torch.int32)
    if q.numel() and (int(q.min()) < qmin or int(q.max()) > qmax):
        raise ValueError(f"codes out of range [{qmin}, {qmax}] for {scheme.name}")
    sshape = scale_shape(scheme, shape)
    if scale_fp16.numel() != sshape[0] * sshape[1]:
        raise ValueError(f"scale has shape {tuple(scale_fp16.shape)}, expected {sshape}")
    tensors = {}
    stored = q + _store_offset(scheme)
    if scheme.bits <= 4:
        tensors["qweight"] = packing.pack(stored.to(torch.uint8), scheme.bits)
    elif scheme.bits == 8 and scheme.symmetric:
        tensors["qweight"] = stored.to(torch.int8).contiguous()
    else:
        tensors["qweight"] = stored.to(torch.uint8).contiguous()
    tensors["scale"] = scale_fp16.to(torch.float16).reshape(sshape).contiguous()
    if zero_uint8 is not None:
        if zero_uint8.numel() != sshape[0] * sshape[1]:
            raise ValueError(f"zero has shape {tuple(zero_uint8.shape)}, expected {sshape}")
        tensors["zero"] = zero_uint8.to(torch.uint8).reshape(sshape).contiguous()
    return QuantizedWeight(scheme=scheme, shape=shape, tensors=tensors)


def act_parts(scheme: Scheme) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Storage parts a static activation scheme adds to its weight: the frozen input scale
    ("in_scale" float32 [1]) and, for affine activations, zero point ("in_zero" uint8 [1])."""
    if scheme.act != "static":
        return {}
    parts = {"in_scale": (torch.float32, (1,))}
    if not scheme.act_symmetric:
        parts["in_zero"] = (torch.uint8, (1,))
    if scheme.act_outliers:  # -oN: which input channels stay in float
        parts["in_outliers"] = (torch.int32, (scheme.act_outliers,))
    return parts


def quantize_activation(x2: torch.Tensor, scale: "torch.Tensor | None" = None,
                        zero: "torch.Tensor | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and scale of activations x2 [M, K] float32, the w8a8 way.

    scale None: per token, symmetric, s = absmax/127 of each row (w8a8-dynamic). Otherwise the
    frozen per-tensor scale; with `zero` the codes are affine u = round(x/s) + z in [0, 255],
    returned shifted to int8 (u - 128) so that an int8 x int8 matmul can take them.
    x ≈ s·q (symmetric) or s·(q + 128 - z) (affine).
    """
    if scale is None:
        s = x2.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0  # [M, 1]
        return torch.round(x2 / s).clamp(-127, 127).to(torch.int8), s
    s = scale.float().reshape(1, 1)
    if zero is not None:
        u = torch.round(x2 / s) + zero.float().reshape(1, 1)
        return (u.clamp(0, 255) - 128).to(torch.int8), s
    return torch.round(x2 / s).clamp(-127, 127).to(torch.int8), s


def clipped_count(q: torch.Tensor, zero: "torch.Tensor | None" = None) -> torch.Tensor:
    """How many codes of `quantize_activation` with a frozen scale sit on the clipping bound
    (an upper bound on the values that were clipped: a value that rounds exactly onto the
    bound counts too)."""
    if zero is None:
        return (q.abs() == 127).sum()
    return ((q == -128) | (q == 127)).sum()


def fake_quantize_activation(x2: torch.Tensor, scale=None, zero=None, outliers=None) -> torch.Tensor:
    """What the w8a8 kernel multiplies, in float: dequantize(quantize_activation(x2)); the
    `outliers` channels (indices) of a -oN static scheme pass through as they are."""
    xi = x2 if outliers is None else x2.index_fill(1, outliers.long(), 0.0)
    q, s = quantize_activation(xi, scale, zero)
    shift = 0.0 if zero is None else 128.0 - zero.float().reshape(1, 1)
    out = (q.float() + shift) * s
    if outliers is not None:
        idx = outliers.long()
        out = out.index_copy(1, idx, x2.float().index_select(1, idx))
    return out


def top_channels(absmax: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (sorted, int32) of the `n` channels with the largest calibrated |x| (ties: lower
    index first): the float channels of a -oN static scheme."""
    order = torch.sort(absmax.float(), descending=True, stable=True).indices[:n]
    return torch.sort(order).values.to(torch.int32)


def with_act_range(qw: QuantizedWeight, scale: torch.Tensor, zero: "torch.Tensor | None",
                   outliers: "torch.Tensor | None" = None) -> QuantizedWeight:
    """`qw` with the frozen activation scale (and zero point, and float channels) of a static
    scheme attached."""
    tensors = dict(qw.tensors)
    n_out = qw.scheme.act_outliers
    if n_out:
        if outliers is None or outliers.numel() != n_out:
            raise ValueError(f"{qw.scheme.name} keeps {n_out} input channels in float: it needs their indices")
        tensors["in_outliers"] = outliers.detach().reshape(-1).to(torch.int32).clone()
    tensors["in_scale"] = scale.detach().float().reshape(1).clone()
    if not qw.scheme.act_symmetric:
        if zero is None:
            raise ValueError(f"{qw.scheme.name} has affine activations: it needs a zero point")
        tensors["in_zero"] = zero.detach().reshape(1).to(torch.uint8).clone()
    return QuantizedWeight(qw.scheme, qw.shape, tensors)


def int_codes(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", int]:
    """(q int32 [out, in], scale fp32 [out, n_groups], zero fp32 [out, n_groups] or None, group length).

    Codes are semantic (symmetric in [-qmax, qmax], affine in [0, 2^b-1]). A per-tensor
    scale is expanded to [out, 1] so callers never special-case it.
    """
    scheme = qw.scheme
    out, inn = qw.shape
    raw = qw.tensors["qweight"]
    if scheme.bits <= 4:
        raw = packing.unpack(raw, scheme.bits, out * inn).view(out, inn)
    q = raw.to(torch.int32) - _store_offset(scheme)
    L = group_len(scheme, inn)
    ng = inn // L if L else 0
    scale = qw.tensors["scale"].float().expand(out, ng).clone()
    zero = qw.tensors.get("zero")
    zero = None if zero is None else zero.float().expand(out, ng).clone()
    return q, scale, zero, L


class IntCodec:
    """Round-to-nearest integer codec; see the module docstring for the math and layout."""

    kind = "int"

    def quantize(self, w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:  # shape checked by formats.quantize
        w = w.detach().float()
        if w.numel() == 0:
            raise ValueError(f"cannot quantize an empty weight of shape {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()):
            raise ValueError("cannot quantize a weight that contains NaN or Inf")
        out, inn = w.shape
        L = group_len(scheme, inn)
        wg = w.reshape(1, 1, -1) if scheme.group_size == PER_TENSOR else w.reshape(out, inn // L, L)
        scale, zero = choose_qparams(wg, scheme)  # [1, 1] or [out, n_groups]
        q = quantize_with(wg, scale[..., None], None if zero is None else zero[..., None], scheme)
        return from_int_codes(scheme, q.reshape(out, inn), scale, zero)

    def dequantize(self, qw: QuantizedWeight) -> torch.Tensor:
        q, s, z, L = int_codes(qw)
        out, inn = qw.shape
        qg = q.view(out, -1, L) if L else q.view(out, 0, 0)  # [out, n_groups, L]
        x = dequantize_with(qg, s[..., None], None if z is None else z[..., None])
        return x.reshape(out, inn)

    def storage_bytes(self, scheme: Scheme, shape: tuple[int, int]) -> int:
        scheme.validate_for(tuple(shape))
        out, inn = shape
        so, si = scale_shape(scheme, (out, inn))
        n_params = so * si
        q_bytes = packing.packed_nbytes(out * inn, scheme.bits) if scheme.bits <= 4 else out * inn
        act = sum(torch.empty((), dtype=dt).element_size() * math.prod(sh) for dt, sh in act_parts(scheme).values())
        return q_bytes + 2 * n_params + (0 if scheme.symmetric else n_params) + act


INT_CODEC = register(IntCodec())
FORMATS["llm-int8"] = INT_CODEC  # LLM.int8 stores int8 symmetric per-channel weights
