"""Float casts (fp32/bf16/fp16) and per-channel scaled fp8 (e4m3/e5m2)."""
import pytest
import torch

from quantkit.formats import quantize, storage_bytes


def weight(seed=0, shape=(6, 96)):
    g = torch.Generator().manual_seed(seed)
    # mix magnitudes over several decades so fp8 subnormals are exercised too
    return torch.randn(shape, generator=g) * 10.0 ** torch.randint(-4, 2, (shape[0], 1), generator=g)


def test_fp32_is_exact():
    w = weight()
    qw = quantize(w, "fp32")
    assert torch.equal(qw.dequantize(), w) and qw.nbytes == storage_bytes("fp32", w.shape) == w.numel() * 4


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_casts_equal_torch(name, dtype):
    w = weight(1)
    qw = quantize(w, name)
    assert qw.tensors["weight"].dtype == dtype
    assert torch.equal(qw.dequantize(), w.to(dtype).float())
    assert not torch.equal(qw.dequantize(), w)  # the cast does round
    assert qw.nbytes == storage_bytes(name, w.shape) == w.numel() * 2


@pytest.mark.parametrize("fmt,dtype", [("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)])
def test_fp8_round_trip(fmt, dtype):
    w = weight(2)
    w[3] = 0.0
    qw = quantize(w, f"fp8-{fmt}")
    q, s = qw.tensors["qweight"], qw.tensors["scale"]
    assert q.dtype == dtype and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (w.shape[0], 1)
    assert qw.nbytes == storage_bytes(f"fp8-{fmt}", w.shape) == w.numel() + 4 * w.shape[0]
    fi = torch.finfo(dtype)
    x = qw.dequantize()
    assert torch.isfinite(x).all() and torch.equal(x[3], torch.zeros(w.shape[1]))
    # half an ulp relative for normals, half the smallest subnormal (times s) absolute
    bound = fi.eps / 2 * w.abs() + s * fi.tiny * fi.eps / 2 + 1e-6 * w.abs()
    err = (w - x).abs()
    assert (err <= bound).all()
    assert float((err / w.abs().clamp(min=1e-30))[w.abs() > s * fi.tiny].max()) > fi.eps / 16  # rounding happens
    # each row's absmax maps onto the format's largest value
    rows = [r for r in range(w.shape[0]) if r != 3]
    assert torch.all(q.float().abs().amax(1)[rows] == fi.max)
