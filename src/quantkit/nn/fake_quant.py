"""`FakeQuantLinear`: a trainable Linear whose forward pass sees its quantized weight (QAT).

Quantization-aware training (Jacob et al. 2018, arXiv:1712.05877): the forward pass uses
W_hat = dequantize(quantize(W)), exactly what the converted QuantLinear will store, and the
backward pass treats the rounding as the identity (straight-through estimator, Bengio et al.
2013), so gradients reach the float weights that keep being trained.

Learnable step size (LSQ, Esser et al. 2019, arXiv:1902.08153), integer schemes only: the
scale s of every group becomes a parameter. Forward q = clamp(round(w/s) + z, qmin, qmax),
W_hat = s (q - z); d W_hat / d w = 1 inside the range and 0 outside; d W_hat / d s =
(q - z) - (w/s) inside and qmin - z or qmax - z outside; the scale's gradient is multiplied by
1/sqrt(L * qmax) (L = group length) as the paper prescribes. The scale is rounded to float16
(with a straight-through gradient) before use, so the codes are those `convert` stores.

Activations (w8a8 schemes): "dynamic" fake-quantizes each token with its own absmax;
"static" keeps the scheme's observer (observers.py) up to date in training mode and uses its
frozen range in eval mode; values outside the range get no gradient.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SchemeError
from ..formats import FORMATS, QuantizedWeight, quantize
from ..formats.integer import (MAX_SCALE, MIN_SCALE, choose_qparams, fake_quantize_activation, from_int_codes,
                               qrange, with_act_range)
from ..observers import make_observer
from ..scheme import PER_TENSOR, Scheme
from .weights import linear_weight


def check_qat_scheme(scheme: Scheme, lsq: bool = False) -> None:
    """Refuse schemes quantization-aware training cannot simulate exactly."""
    if scheme.is_float:
        raise SchemeError(f"{scheme.name} is a plain cast: there is nothing to train for; pick an integer or 4-bit scheme")
    if scheme.kind == "llm-int8":
        raise SchemeError("llm-int8 splits outlier columns at run time, which QAT does not simulate; "
                          "train int8 (or w8a8-dynamic) instead")
    if scheme.act_outliers:
        raise SchemeError(f"{scheme.name} keeps calibrated float channels, which QAT does not learn; "
                          f"train {scheme.name.rsplit('-o', 1)[0]} instead")
    if lsq and scheme.kind != "int":
        raise SchemeError(f"learnable scales (LSQ) are for integer schemes (int4-g128, int3-g128, ...), not {scheme.name}")


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """w [out, in] viewed as [G0, G1, L] groups (per tensor: [1, 1, out*in])."""
    out, inn = w.shape
    if scheme.group_size == PER_TENSOR:
        return w.reshape(1, 1, -1)
    L = scheme.group_for(inn)
    return w.reshape(out, inn // L, L)


def fake_quantize_weight(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """dequantize(quantize(w, scheme)) with a straight-through gradient to `w`."""
    with torch.no_grad():
        if scheme.kind == "int":  # the codec's own math, without packing (runs every step)
            wg = _grouped(w.float(), scheme)
            s, z = choose_qparams(wg, scheme)
            s = s.float()[..., None]
            qmin, qmax = qrange(scheme)
            q = torch.round(wg / s)
            if z is not None:
                q = (q + z.float()[..., None]).clamp(qmin, qmax) - z.float()[..., None]
            else:
                q = q.clamp(qmin, qmax)
            wq = (s * q).reshape(w.shape)
        else:
            wq = FORMATS[scheme.kind].dequantize(quantize(w.detach().float(), scheme))
    return w + (wq.to(w.dtype) - w).detach()


class FakeQuantLinear(nn.Module):
    """nn.Linear stand-in for QAT. Build it with `FakeQuantLinear.from_linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme, lsq: bool = False):
        super().__init__()
        check_qat_scheme(scheme, lsq)
        scheme.validate_for(tuple(weight.shape))
        self.out_features, self.in_features = weight.shape
        self.scheme, self.lsq = scheme, lsq
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        if lsq:
            s, z = choose_qparams(_grouped(self.weight.detach(), scheme), scheme)
            self.scale = nn.Parameter(s.float())  # [G0, G1]
            self.register_buffer("zero", torch.zeros_like(s, dtype=torch.float32) if z is None else z.float())
            self._grad_scale = 1.0 / math.sqrt(_grouped(self.weight, scheme).shape[-1] * qrange(scheme)[1])
        self.observer = make_observer(scheme.observer, bits=8, symmetric=scheme.act_symmetric) if scheme.act == "static" else None
        self._act_qparams = None  # (scale, zero) frozen from the observer, refreshed after each update

    @classmethod
    def from_linear(cls, mod: nn.Module, scheme: Scheme, lsq: bool = False) -> "FakeQuantLinear":
        w = linear_weight(mod)
        return cls(w, getattr(mod, "bias", None), scheme, lsq)

    # ------------------------------------------------------------------ weights
    def _lsq_parts(self):
        """(s [G0, G1, 1] float16-rounded with gradient, z [G0, G1, 1], qmin, qmax)."""
        s = self.scale.clamp(MIN_SCALE, MAX_SCALE)
        s = s + (s.half().float() - s).detach()
        g = self._grad_scale
        s = (s - s * g).detach() + s * g  # value s, gradient scaled by g
        return s[..., None], self.zero[..., None], *qrange(self.scheme)

    def quantized_weight_float(self) -> torch.Tensor:
        """W_hat [out, in] as the forward pass uses it (differentiable)."""
        if not self.lsq:
            return fake_quantize_weight(self.weight, self.scheme)
        s, z, qmin, qmax = self._lsq_parts()
        q = torch.clamp(_round_ste(_grouped(self.weight, self.scheme) / s) + z, qmin, qmax)
        return (s * (q - z)).reshape(self.weight.shape)

    @torch.no_grad()
    def to_quantized(self) -> QuantizedWeight:
        """The QuantizedWeight whose dequantization is the forward pass's W_hat (plus the frozen
        activation range for static schemes)."""
        if not self.lsq:
            qw = quantize(self.weight.detach().float(), self.scheme)
        else:
            s, z, qmin, qmax = self._lsq_parts()
            q = torch.clamp(torch.round(_grouped(self.weight, self.scheme) / s) + z, qmin, qmax)  # semantic codes
            zero = None if self.scheme.symmetric else self.zero.to(torch.uint8)
            qw = from_int_codes(self.scheme, q.reshape(self.weight.shape).to(torch.int32), s[..., 0].half(), zero)
        if self.scheme.act == "static":
            qw = with_act_range(qw, *self.act_qparams())
        return qw

    # -------------------------------------------------------------- activations
    def act_qparams(self):
        if self._act_qparams is None:
            self._act_qparams = self.observer.qparams()
        return self._act_qparams

    def _fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.scheme.act == "dynamic":
            return x + (fake_quantize_activation(x2).reshape(x.shape).to(x.dtype) - x).detach()
        if self.training:
            self.observer.update(x2)
            self._act_qparams = None
        s, z = self.act_qparams()
        s = s.float().reshape(())
        lo, hi = (-127 * s, 127 * s) if z is None else (-(z.float().reshape(()) * s), (255 - z.float().reshape(())) * s)
        xc = torch.maximum(torch.minimum(x, hi.to(x.dtype)), lo.to(x.dtype))  # no gradient where clipped
        fq = fake_quantize_activation(x2, s, z).reshape(x.shape).to(x.dtype)
        return xc + (fq - xc).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.act:
            x = self._fake_quant_input(x)
        w = self.quantized_weight_float()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}"
                + (", lsq" if self.lsq else ""))
