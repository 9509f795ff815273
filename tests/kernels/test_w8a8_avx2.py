"""quantkit's AVX2 w8a8 kernel (kernels/w8a8_avx2.cpp) against the torch-ops backend: the
same activation codes, the same int32 sums and the same float epilogue, so the outputs must
be bit-identical, for every activation mode, ragged shapes, extreme codes and float channels.
Skipped where the kernel cannot be built (no AVX2, no compiler)."""
import pytest
import torch

from quantkit.errors import QuantkitError

from quantkit.formats import quantize
from quantkit.formats.integer import int_codes, quantize_activation, with_act_range
from quantkit.kernels import native
from quantkit.kernels.cpu import W8A8Kernel
from quantkit.nn import QuantLinear

mod = native.w8a8_avx2()
needs_kernel = pytest.mark.skipif(mod is None, reason=f"AVX2 kernel unavailable: {native.why_not_w8a8_avx2()}")


def _layers(w, scheme, scale=None, zero=None, outl=None, monkeypatch=None):
    """The same quantized weight run by the AVX2 kernel and by the float backend."""
    qw = quantize(w, scheme)
    if scale is not None:
        qw = with_act_range(qw, torch.tensor(scale), None if zero is None else torch.tensor(zero), outl)
    import quantkit.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "_INT8_MM_BACKEND", "avx2")
    fast = QuantLinear(qw)
    fast.pack()  # the layout is made (and the backend chosen) when the layer is first packed
    monkeypatch.setattr(cpu, "_INT8_MM_BACKEND", "float")
    ref = QuantLinear(qw)
    ref.pack()
    monkeypatch.setattr(cpu, "_INT8_MM_BACKEND", None)
    assert "panel" in fast.buffers_dict() and "q" not in fast.buffers_dict() and "q" in ref.buffers_dict()
    return qw, fast, ref


@needs_kernel
@pytest.mark.parametrize("n,k,rows", [(48, 576, 21), (17, 37, 5), (1536, 576, 1), (33, 1030, 130), (16, 4, 4)])
@pytest.mark.parametrize("scheme,scale,zero", [("w8a8-dynamic", None, None), ("w8a8-static-minmax", 0.03, None),
                                               ("w8a8-static-mse-asym", 0.03, 120)])
def test_bit_identical_to_float_backend(n, k, rows, scheme, scale, zero, monkeypatch):
    g = torch.Generator().manual_seed(n * k + rows)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(rows, k, generator=g) * 2
    x[:, 0] *= 40  # clipped by the static ranges
    qw, fast, ref = _layers(w, scheme, scale, zero, monkeypatch=monkeypatch)
    assert torch.equal(fast(x), ref(x))
    back = fast.quantized_weight()  # the panel gives the stored codes back exactly
    assert all(torch.equal(back.tensors[t], qw.tensors[t]) for t in qw.tensors)


def _codes_on_the_bound(x, scale, zero, outl):
    """Independent count of the activation codes a static range clips: x / scale rounded (half to
    even) lands on or beyond int8's symmetric bound +-127, or, affine, round(x / scale) + zero on or
    beyond 0 or 255; the float channels `outl` are not quantized (zero codes)."""
    x2 = x.reshape(-1, x.shape[-1]).float().clone()
    x2[:, outl.long()] = 0.0
    r = torch.round(x2 / torch.tensor(scale, dtype=torch.float32))
    if zero is None:
        return int((r.abs() >= 127).sum())
    u = r + zero
    return int(((u <= 0) | (u >= 255)).sum())


@needs_kernel
@pytest.mark.parametrize("shape", [(2, 9, 300), (1, 1, 300), (3, 300)])  # BLAS path, then the few-row loop
def test_float_channels_and_clip_counts(shape, monkeypatch):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 300, generator=g) * 0.05
    x = torch.randn(*shape, generator=g)
    x[..., 7] *= 200
    outl = torch.tensor([7, 100, 299], dtype=torch.int32)
    for scheme, zero in (("w8a8-static-minmax-o3", None), ("w8a8-static-minmax-asym-o3", 130)):
        _, fast, ref = _layers(w, scheme, 0.01, zero, outl, monkeypatch)
        sf, sr = fast.kernel.new_stats(fast.scheme), ref.kernel.new_stats(ref.scheme)
        yf = fast.kernel.matmul(x, fast.buffers_dict(), fast.scheme, (40, 300), stats=sf)
        yr = ref.kernel.matmul(x, ref.buffers_dict(), ref.scheme, (40, 300), stats=sr)
        # the float channels' 3-term dot product is summed in its own order: equal to rounding
        assert torch.allclose(yf, yr, rtol=1e-6, atol=1e-6 * float(yr.abs().max()))
        assert sf == sr and 0 < sf["clipped"] == _codes_on_the_bound(x, 0.01, zero, outl) <= sf["values"] == x.numel()


@needs_kernel
def test_extreme_codes_do_not_saturate():
    """|x_q| = 127 (and 128 for affine codes) against W_q = +-127 everywhere: the largest pair
    sums vpmaddubsw sees; the int32 result must equal the int64 product."""
    k, n = 1024, 16
    wq = torch.full((n, k), 127, dtype=torch.int8)
    wq[1::2] = -127
    panel = mod.pack(wq)
    sw = torch.ones(n)
    x = torch.full((3, k), 1.0)
    x[1] = -1.0
    y, _ = mod.linear(x, panel, n, sw, 1, torch.tensor([1 / 127, 0.0]), None, None, None, None)  # codes +-127
    exact = torch.round(x * 127).clamp(-127, 127).long() @ wq.long().t()
    assert exact.abs().max() == 127 * 127 * k
    assert torch.equal(y, exact.float() * (torch.tensor(1 / 127) * sw))
    y, clipped = mod.linear(torch.full((2, k), -50.0), panel, n, sw, 2, torch.tensor([1.0, 0.0]), None, None, None,
                            None)  # affine u = 0 -> -128
    assert torch.equal(y, (torch.full((2, k), -128).long() @ wq.long().t()).float())
    assert clipped == 2 * k


@needs_kernel
def test_quantization_matches_torch_rounding():
    """Ties round to even, as torch.round does (2.5 -> 2, 3.5 -> 4)."""
    x = torch.tensor([[2.5, 3.5, -2.5, -0.5, 0.5, 126.5, -126.5, 1000.0] * 5])
    wq = torch.eye(40, dtype=torch.int8)
    y, _ = mod.linear(x, mod.pack(wq), 40, torch.ones(48), 1, torch.tensor([1.0, 0.0]), None, None, None, None)
    y = y[:, :40]
    q, _ = quantize_activation(x, torch.tensor(1.0))
    assert torch.equal(y, q.float())


@needs_kernel
def test_weight_code_minus_128_keeps_the_exact_backend(monkeypatch):
    """-128 would overflow the sign trick: such a weight stays on the float backend."""
    qw = quantize(torch.randn(8, 32), "w8a8-dynamic")
    q, _, _, _ = int_codes(qw)
    assert int(q.min()) >= -127  # symmetric int8 codes never reach -128
    import quantkit.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "_INT8_MM_BACKEND", "avx2")
    monkeypatch.setattr(cpu, "int_codes", lambda qw: (torch.full((8, 32), -128, dtype=torch.int32),
                                                      torch.ones(8, 1), None, 0))
    assert "q" in W8A8Kernel.pack(qw)


def test_disabled_kernel_falls_back_and_says_why(monkeypatch):
    monkeypatch.setenv("QUANTKIT_NATIVE", "0")
    assert native.why_not_w8a8_avx2() == "QUANTKIT_NATIVE=0"
    monkeypatch.setattr(native, "_cache", {})
    assert native.w8a8_avx2() is None
    import quantkit.kernels.cpu as cpu

    monkeypatch.delenv("QUANTKIT_INT8_MM", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert cpu._pick_int8_mm() == "float"
    monkeypatch.setenv("QUANTKIT_INT8_MM", "avx2")
    with pytest.raises(QuantkitError, match="QUANTKIT_NATIVE=0"):
        cpu._pick_int8_mm()


@needs_kernel
def test_bad_arguments_are_refused_not_crashed():
    panel = mod.pack(torch.ones(20, 8, dtype=torch.int8))
    x = torch.ones(2, 8)
    with pytest.raises(RuntimeError, match="w_scale"):
        mod.linear(x, panel, 20, torch.ones(20), 0, None, None, None, None, None)  # not padded to 32
    with pytest.raises(RuntimeError, match="static mode"):
        mod.linear(x, panel, 20, torch.ones(32), 1, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="shapes"):
        mod.linear(torch.ones(2, 9), panel, 20, torch.ones(32), 0, None, None, None, None, None)
    with pytest.raises(RuntimeError, match="out of range"):
        mod.linear(x, panel, 20, torch.ones(32), 0, None, None, None, torch.tensor([8]), torch.ones(1, 32))


def test_failed_build_falls_back(monkeypatch, caplog):
    """A compiler error is logged and leaves the torch-ops backend in charge."""
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(native, "_cache", {})
    monkeypatch.setattr(native, "why_not_w8a8_avx2", lambda: None)

    def broken(*a, **k):
        raise RuntimeError("Error building extension\nfatal error: Python.h: No such file or directory")

    monkeypatch.setattr(ext, "load", broken)
    with caplog.at_level("INFO", logger="quantkit.kernels.native"):
        assert native.w8a8_avx2() is None
    assert "Python.h" in caplog.text


@needs_kernel
@pytest.mark.parametrize("scheme,zero,outl", [("w8a8-dynamic", None, None), ("w8a8-static-minmax-asym-o3", 130, [7, 9, 99])])
def test_panel_buffers_run_without_the_kernel(scheme, zero, outl, monkeypatch):
    """A layer packed for the kernel (say, pickled whole) still runs where the kernel cannot:
    torch ops read the panel layout, with the same results."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 100, generator=g) * 0.05
    x = torch.randn(5, 100, generator=g)
    o = None if outl is None else torch.tensor(outl, dtype=torch.int32)
    _, fast, ref = _layers(w, scheme, None if zero is None else 0.02, zero, o, monkeypatch)
    monkeypatch.setattr(native, "_cache", {"w8a8": None})
    assert torch.allclose(fast(x), ref(x), rtol=1e-6, atol=1e-7)
