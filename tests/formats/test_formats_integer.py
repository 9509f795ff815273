"""Integer codecs: hand-worked examples, storage layout and error-bound properties."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantkit.formats import FORMATS, quantize, storage_bytes
from quantkit.formats.integer import (
    MIN_SCALE,
    choose_qparams,
    dequantize_with,
    fp16_scale_up,
    from_int_codes,
    int_codes,
    quantize_with,
)
from quantkit.scheme import parse_scheme


def test_int8_absmax_hand_example():
    # absmax 3.2 -> s = 3.2/127 = 0.0251969, stored as fp16 (rounded up) 0.0252075;
    # 0.1 / s = 3.967 -> code 4 -> 4 * s = 0.10083
    w = torch.tensor([[3.2, 0.1, -1.0, 0.0]])
    qw = quantize(w, "int8")
    q, s, z, L = int_codes(qw)
    assert z is None and L == 4
    assert q.tolist() == [[127, 4, -40, 0]]
    assert qw.tensors["scale"].dtype == torch.float16
    assert abs(s.item() - 3.2 / 127) < 2e-5
    assert round(qw.dequantize()[0, 1].item(), 4) == 0.1008


def test_affine_4bit_min_max_hand_example():
    # w = [-1, 0, 0.6, 2]: alpha = -1, beta = 2, s = 3/15 = 0.2 (fp16: 0.20007),
    # Z = round(1/0.2) = 5; codes: round(-5)+5 = 0, 0+5 = 5, round(3)+5 = 8, round(10)+5 = 15
    w = torch.tensor([[-1.0, 0.0, 0.6, 2.0]])
    qw = quantize(w, "int4-asym")
    q, s, z, _ = int_codes(qw)
    assert q.tolist() == [[0, 5, 8, 15]]
    assert z.item() == 5 and abs(s.item() - 0.2) < 1e-4
    assert qw.tensors["zero"].dtype == torch.uint8
    # x = s * (q - Z) = 0.2 * [-5, 0, 3, 10]
    assert torch.allclose(qw.dequantize(), torch.tensor([[-1.0, 0.0, 0.6, 2.0]]), atol=1e-3)
    assert qw.dequantize()[0, 1].item() == 0.0  # zero is exactly representable


def test_affine_clipping_with_given_params():
    sc = parse_scheme("int4-asym")
    s, z = torch.tensor(0.2), torch.tensor(5)
    # 3.0/0.2 + 5 = 20 -> clamped to 15; -2.0/0.2 + 5 = -5 -> clamped to 0
    q = quantize_with(torch.tensor([3.0, -2.0, 0.4]), s, z, sc)
    assert q.tolist() == [15, 0, 7]
    assert torch.allclose(dequantize_with(q, s, z), torch.tensor([2.0, -1.0, 0.4]))
    sym = parse_scheme("int4-sym")  # qmax = 7
    assert quantize_with(torch.tensor([5.0, -5.0]), torch.tensor(0.1), None, sym).tolist() == [7, -7]
    with pytest.raises(ValueError):
        quantize_with(torch.tensor([1.0]), s, None, sc)


def test_choose_qparams_reduces_last_dim():
    w = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.25, 0.0]])
    s, z = choose_qparams(w, parse_scheme("int3-sym"))  # qmax 3
    assert z is None and s.dtype == torch.float16
    assert s.shape == (2,) and s[0].item() == 1.0 and abs(s[1].item() - 0.5 / 3) < 1e-4
    s, z = choose_qparams(w, parse_scheme("int2-asym"))  # levels 3
    assert z.dtype == torch.uint8 and z.tolist() == [round(3 / (5 / 3)), 0]


def test_fp16_scale_rounds_up_and_clamps():
    s = torch.tensor([0.2, 3.2 / 127, 0.0, 1e-9, 1e9, 0.5])
    h = fp16_scale_up(s)
    assert h.dtype == torch.float16
    assert (h.float() >= s.clamp(max=65504)).all()
    assert h[2].item() == MIN_SCALE and h[3].item() == MIN_SCALE and h[4].item() == 65504 and h[5].item() == 0.5


@pytest.mark.parametrize(
    "name,dtype,shape",
    [("int8", torch.int8, (4, 64)), ("int8-asym", torch.uint8, (4, 64)), ("int6", torch.uint8, (4, 64)),
     ("int5-sym", torch.uint8, (4, 64)), ("int4", torch.uint8, (128,)), ("int3", torch.uint8, (96,)),
     ("int2", torch.uint8, (64,))],
)
def test_storage_layout(name, dtype, shape):
    qw = quantize(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), name)
    assert qw.tensors["qweight"].dtype == dtype and tuple(qw.tensors["qweight"].shape) == shape
    assert qw.nbytes == storage_bytes(name, (4, 64))


def test_llm_int8_uses_int_codec():
    assert FORMATS["llm-int8"] is FORMATS["int"]
    w = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(quantize(w, "llm-int8").dequantize(), quantize(w, "int8").dequantize())


def test_from_int_codes_validates():
    sc = parse_scheme("int4-sym")
    with pytest.raises(ValueError):
        from_int_codes(sc, torch.full((2, 4), 8), torch.ones(2, 1, dtype=torch.float16), None)
    with pytest.raises(ValueError):
        from_int_codes(sc, torch.zeros(2, 4, dtype=torch.int32), torch.ones(3, 1, dtype=torch.float16), None)


def test_nan_is_refused():
    with pytest.raises(ValueError):
        quantize(torch.tensor([[1.0, float("nan")]]), "int8")


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    group=st.sampled_from([-1, 0, 32]),
    out=st.integers(1, 5),
    n_col_groups=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    log_mag=st.integers(-9, 3),
    zero_row=st.booleans(),
    zero_group=st.booleans(),
    shift=st.floats(-2.0, 2.0),
)
def test_int_round_trip_property(bits, symmetric, group, out, n_col_groups, seed, log_mag, zero_row, zero_group, shift):
    inn = 32 * n_col_groups
    g = "" if group == -1 else ("-tensor" if group == 0 else f"-g{group}")
    sc = parse_scheme(f"int{bits}{g}-{'sym' if symmetric else 'asym'}")
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, inn, generator=gen) + shift) * 10.0**log_mag
    if zero_row:
        w[0] = 0.0
    if zero_group:
        w[-1, :32] = 0.0
    qw = quantize(w, sc)
    x = qw.dequantize()
    assert x.shape == w.shape and x.dtype == torch.float32
    assert qw.nbytes == storage_bytes(sc, tuple(w.shape))
    q, s, z, L = int_codes(qw)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    s_el = s.repeat_interleave(L, dim=1)  # [out, in]: each element's group scale
    err = (w - x).abs()
    assert (err <= s_el / 2 + 1e-6 * w.abs() + 1e-30).all(), float((err - s_el / 2).max())
    if zero_row:
        assert torch.equal(x[0], torch.zeros(inn))
    if zero_group and group == 32:
        assert torch.equal(x[-1, :32], torch.zeros(32))
    # rebuilding from the semantic codes gives back the identical storage
    scale16 = qw.tensors["scale"]
    again = from_int_codes(sc, q, scale16, qw.tensors.get("zero"))
    assert all(torch.equal(again.tensors[k], qw.tensors[k]) for k in qw.tensors)
