"""FakeQuantLinear: straight-through gradients, LSQ's scale gradient, and convert() storing
exactly the weights the forward pass used."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from quantkit.errors import SchemeError
from quantkit.formats.integer import MIN_SCALE
from quantkit.nn import FakeQuantLinear, QuantLinear
from quantkit.scheme import parse_scheme

WEIGHT_SCHEMES = ["int8", "int4-g32", "int4-g32-sym", "int3-g64", "int2-g32", "int4-tensor", "nf4-b64-dq", "fp4-b64",
                  "fp8-e4m3"]


def _layer(scheme, lsq=False, seed=0, shape=(48, 128)):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(shape[1], shape[0])
    return FakeQuantLinear.from_linear(lin, parse_scheme(scheme), lsq)


def test_straight_through_gradient_is_the_gradient_at_the_quantized_weight():
    fq = _layer("int4-g32")
    x = torch.randn(7, 128)
    g = torch.randn(7, 48)
    (fq(x) * g).sum().backward()
    w_hat = fq.quantized_weight_float().detach().requires_grad_(True)
    (F.linear(x, w_hat, fq.bias.detach()) * g).sum().backward()
    assert fq.weight.grad is not None
    torch.testing.assert_close(fq.weight.grad, w_hat.grad)  # dL/dW := dL/dW_hat (identity through rounding)
    assert not torch.equal(fq.quantized_weight_float(), fq.weight)  # ... while the forward pass is quantized


def test_lsq_scale_gradient_matches_the_paper_formula_on_a_hand_example():
    # one group of 4 values, symmetric int3 (q in [-3, 3]); s = 0.5 exactly representable in fp16
    fq = FakeQuantLinear(torch.tensor([[0.3, -0.74, 1.2, 2.0]]), None, parse_scheme("int3-g-1-sym"), lsq=True)
    with torch.no_grad():
        fq.scale.fill_(0.5)
    w_hat = fq.quantized_weight_float()
    # w/s = 0.6, -1.48, 2.4, 4.0 -> q = 1, -1, 2, clipped to 3
    torch.testing.assert_close(w_hat, torch.tensor([[0.5, -0.5, 1.0, 1.5]]))
    w_hat.sum().backward()
    # dW_hat/ds: q - w/s inside the range, qmax outside; times g = 1/sqrt(L * qmax) = 1/sqrt(12)
    expected = ((1 - 0.6) + (-1 + 1.48) + (2 - 2.4) + 3) / 12**0.5
    assert fq.scale.grad.item() == pytest.approx(expected, rel=1e-5)
    # weight gradient: 1 inside the range, 0 where clipped
    torch.testing.assert_close(fq.weight.grad, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("scheme,lsq", [(s, False) for s in WEIGHT_SCHEMES]
                         + [(s, True) for s in WEIGHT_SCHEMES if parse_scheme(s).kind == "int"])
def test_converted_layer_computes_what_the_fake_quantized_layer_computed(scheme, lsq):
    fq = _layer(scheme, lsq)
    if lsq:  # move the scales away from their initial absmax choice, as training would
        with torch.no_grad():
            fq.scale.mul_(0.83)
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = fq(x)
        qw = fq.to_quantized()
        torch.testing.assert_close(qw.dequantize(), fq.quantized_weight_float(), rtol=0, atol=0)
        y_ref = QuantLinear(qw, fq.bias, kernel="dequant")(x)
        y_fast = QuantLinear(qw, fq.bias)(x)
    torch.testing.assert_close(y_ref, y, rtol=0, atol=1e-5)
    assert (y_fast - y).abs().max() < 0.05 * y.abs().max()  # fast kernels take bf16 activations


@pytest.mark.parametrize("scheme", ["w8a8-dynamic", "w8a8-static-ema", "w8a8-static-minmax-asym", "w8a8-static-percentile"])
def test_activation_fake_quant_matches_the_w8a8_kernel_after_convert(scheme):
    fq = _layer(scheme)
    fq.train()
    for _ in range(3):
        fq(torch.randn(16, 128))
    fq.eval()
    x = torch.randn(5, 128)
    with torch.no_grad():
        y = fq(x)
        y_kernel = QuantLinear(fq.to_quantized(), fq.bias)(x)
    torch.testing.assert_close(y_kernel, y, rtol=0, atol=1e-4)


def test_static_observer_learns_in_training_mode_only():
    fq = _layer("w8a8-static-minmax")
    fq.train()
    fq(torch.randn(8, 128))
    s1 = fq.act_qparams()[0].clone()
    fq.eval()
    fq(100 * torch.randn(8, 128))
    assert torch.equal(fq.act_qparams()[0], s1)
    fq.train()
    fq(100 * torch.randn(8, 128))
    assert fq.act_qparams()[0] > 10 * s1


def test_inputs_beyond_the_static_range_get_no_gradient():
    fq = _layer("w8a8-static-minmax")
    fq.train()
    fq(torch.ones(2, 128))  # range [-1, 1]
    fq.eval()
    x = torch.tensor([[0.5] * 64 + [3.0] * 64]).requires_grad_(True)
    fq(x).sum().backward()
    assert (x.grad[0, 64:] == 0).all() and (x.grad[0, :64] != 0).any()


def test_lsq_scales_stay_positive_and_representable():
    fq = _layer("int4-g32", lsq=True)
    with torch.no_grad():
        fq.scale.fill_(-1.0)  # a scale pushed below zero by a bad step is clamped, not used negative
    qw = fq.to_quantized()
    assert (qw.tensors["scale"].float() >= MIN_SCALE).all()
    assert torch.isfinite(fq.quantized_weight_float()).all()


@pytest.mark.parametrize("scheme,lsq,msg", [("fp32", False, "nothing to train"), ("llm-int8", False, "outlier"),
                                            ("nf4", True, "LSQ")])
def test_refused_schemes(scheme, lsq, msg):
    with pytest.raises(SchemeError, match=msg):
        _layer(scheme, lsq)


def test_group_that_does_not_divide_is_refused():
    with pytest.raises(SchemeError, match="does not divide"):
        _layer("int4-g128", shape=(8, 96))
