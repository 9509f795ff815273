"""The w8a8 integer kernel against a float64 fake-quantization reference (quantize the
activations the same way, dequantize both operands, multiply in float64)."""
import pytest
import torch

from quantkit.formats import quantize
from quantkit.formats.integer import act_parts, int_codes, with_act_range
from quantkit.kernels import pick_kernel
from quantkit.kernels.cpu import W8A8Kernel
from quantkit.nn import QuantLinear
from quantkit.scheme import parse_scheme

G = torch.Generator().manual_seed(0)
W = torch.randn(48, 576, generator=G) * 0.05
X = torch.randn(3, 7, 576, generator=G)
X[..., 5] *= 30  # an outlier channel


def _reference(x, qw):
    q, s, _, _ = int_codes(qw)
    w = (q.double() * s.double())  # [N, K]
    x2 = x.reshape(-1, x.shape[-1]).double()
    if qw.scheme.act == "dynamic":
        sx = (x2.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0).float().double()
        xh = torch.round(x2 / sx).clamp(-127, 127) * sx
    else:
        sx = qw.tensors["in_scale"].double()
        if "in_zero" in qw.tensors:
            z = qw.tensors["in_zero"].double()
            xh = (torch.round(x2 / sx) + z).clamp(0, 255).sub(z) * sx
        else:
            xh = torch.round(x2 / sx).clamp(-127, 127) * sx
    return (xh @ w.T).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("scheme,scale,zero", [("w8a8-dynamic", None, None),
                                               ("w8a8-static-minmax", 0.05, None),
                                               ("w8a8-static-mse-asym", 0.05, 120)])
def test_kernel_equals_fake_quant_reference(scheme, scale, zero):
    qw = quantize(W, scheme)
    if scale is not None:
        qw = with_act_range(qw, torch.tensor(scale), None if zero is None else torch.tensor(zero))
    assert pick_kernel(qw) is W8A8Kernel
    lin = QuantLinear(qw)
    y = lin(X)
    ref = _reference(X, qw)
    assert y.shape == (3, 7, 48) and y.dtype == X.dtype
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    # and the round trip of the storage (the activation parameters included) is exact
    back = lin.quantized_weight()
    assert set(back.tensors) == set(qw.tensors)
    assert all(torch.equal(back.tensors[k], qw.tensors[k]) for k in qw.tensors)


def test_static_clips_and_dynamic_does_not():
    qs = with_act_range(quantize(W, "w8a8-static-minmax"), torch.tensor(0.02), None)  # range +-2.54
    qd = quantize(W, "w8a8-dynamic")
    x = torch.zeros(1, 576)
    x[0, 0] = 100.0
    ys, yd = QuantLinear(qs)(x), QuantLinear(qd)(x)
    w0 = int_codes(qd)[0][:, 0].float() * int_codes(qd)[1][:, 0]
    assert torch.allclose(yd[0], 100.0 * w0, rtol=1e-5, atol=1e-6)  # per-token scale: exact here
    assert torch.allclose(ys[0], 127 * 0.02 * w0, rtol=1e-5, atol=1e-6)  # clipped at 127 steps


def test_static_without_its_scale_is_refused():
    with pytest.raises(ValueError, match="calibration"):
        QuantLinear(quantize(W, "w8a8-static-mse"))


def test_activation_parts_sizes():
    assert act_parts(parse_scheme("w8a8-dynamic")) == {}
    assert act_parts(parse_scheme("w8a8-static-mse")) == {"in_scale": (torch.float32, (1,))}
    assert set(act_parts(parse_scheme("w8a8-static-entropy-asym"))) == {"in_scale", "in_zero"}


@pytest.mark.parametrize("k", [1, 576, 1040, 1041, 4096])
def test_int8_mm_backends_are_exact(k):
    """Both int8 GEMM backends equal the int64 product, also for extreme codes and a reduction
    longer than one float32-exact chunk (where a single float32 matmul would round)."""
    from quantkit.kernels.cpu import _int8_mm_float

    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (19, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (k, 5), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = 127, 127  # the largest possible sum, 127*127*k
    exact = a.long() @ b.long()
    assert torch.equal(_int8_mm_float(a, b).long(), exact)
    assert torch.equal(torch._int_mm(a, b).long(), exact)


@pytest.mark.parametrize("scheme,zero", [("w8a8-static-minmax-o3", None), ("w8a8-static-mse-asym-o3", 120)])
def test_float_channels_run_in_float(scheme, zero):
    """-oN: the float channels multiply their dequantized weight columns in float; the other
    channels go through the int8 path with the frozen range, as in the reference."""
    outl = torch.tensor([5, 17, 400], dtype=torch.int32)
    qw = with_act_range(quantize(W, scheme), torch.tensor(0.02), None if zero is None else torch.tensor(zero), outl)
    lin = QuantLinear(qw)
    q, s, _, _ = int_codes(qw)
    w = q.double() * s.double()
    keep = torch.ones(576, dtype=torch.bool)
    keep[outl.long()] = False
    x2 = X.reshape(-1, 576).double()
    plain = qw.tensors.copy()
    del plain["in_outliers"]
    from quantkit.formats import QuantizedWeight
    ref_int = _reference(X * keep, QuantizedWeight(qw.scheme, qw.shape, plain)).reshape(-1, 48)
    ref = ref_int + x2[:, ~keep] @ w[:, ~keep].T
    y = lin(X).reshape(-1, 48).double()
    assert float((y - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    back = lin.quantized_weight()
    assert torch.equal(back.tensors["in_outliers"], outl)
    with pytest.raises(ValueError, match="indices"):
        with_act_range(quantize(W, scheme), torch.tensor(0.02), None if zero is None else torch.tensor(zero))
    assert act_parts(qw.scheme)["in_outliers"] == (torch.int32, (3,))
