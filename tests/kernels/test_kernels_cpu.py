"""CPU kernels against dequantize-then-matmul, pack/unpack round trips, dispatch, LLM.int8().

Every kernel in `KERNELS` is run on every scheme it supports from a representative list, so a
new kernel (or a kernel that starts supporting more schemes) is tested without a new test.
"""
import pytest
import torch

from quantkit.formats import QuantizedWeight, quantize
from quantkit.kernels import ACT_DTYPE, KERNELS, KERNELS_BY_NAME, pick_kernel
from quantkit.kernels.cpu import DequantKernel, FloatKernel, Int4Kernel, Int8Kernel, LLMInt8Kernel, W8A8Kernel

SCHEMES = ["int8", "int8-asym", "int7", "int5-g32", "int4-g32", "int4-g64-sym", "int4", "int4-tensor",
           "int3-g32", "int2-g64", "llm-int8", "bf16", "fp16", "fp32", "nf4-dq", "fp8-e4m3", "w8a8-dynamic"]
SHAPES = [(48, 576), (32, 128)]
X_LEADS = [(1,), (3, 5)]  # x is [*lead, K]

# Relative error ||y - ref|| / ||ref|| allowed against x @ dequantize(qw).T (fp32):
# - "dequant" and "float" on fp32 weights compute the same fp32 product: only summation order.
# - bf16-activation kernels round x (and their scales/zero terms) to bf16: 2^-9 relative per
#   element, so a few 1e-3 at most; 1e-2 leaves a 2x margin over the worst seen.
# - LLM.int8() and w8a8 quantize each activation row to int8 (step absmax/127, error <= absmax/254 per
#   element, about 0.8% of the row's rms for Gaussian rows): 2e-2.
TIGHT, BF16_TOL, LLM_INT8_TOL = 1e-6, 1e-2, 2e-2


def _tolerance(kernel, qw) -> float:
    if kernel is DequantKernel or (kernel is FloatKernel and qw.scheme.name == "fp32"):
        return TIGHT
    if kernel in (LLMInt8Kernel, W8A8Kernel):  # int8 activations (per row): the same error budget
        return LLM_INT8_TOL
    return BF16_TOL


def _weight(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _cases():
    """(kernel, scheme, shape) for every kernel x every representative scheme it supports."""
    out = []
    for shape in SHAPES:
        w = _weight(shape)
        for s in SCHEMES:
            qw = quantize(w, s)
            for k in KERNELS:
                if k.supports(qw):
                    out.append(pytest.param(k, s, shape, id=f"{k.name}-{s}-{shape[0]}x{shape[1]}"))
    return out


CASES = _cases()


def test_every_kernel_is_exercised():
    """The case list is not vacuous: each registered kernel runs at least one scheme."""
    names = {c.values[0].name for c in CASES}
    assert names == {k.name for k in KERNELS}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality with dtype and shape (fp8 compared through its bytes)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return torch.equal(a, b)


def assert_same_qw(a: QuantizedWeight, b: QuantizedWeight):
    assert a.scheme == b.scheme and tuple(a.shape) == tuple(b.shape)
    assert sorted(a.tensors) == sorted(b.tensors)
    for name in a.tensors:
        assert _same(a.tensors[name], b.tensors[name]), name


@pytest.mark.parametrize("lead", X_LEADS, ids=lambda s: "x" + "x".join(map(str, s)))
@pytest.mark.parametrize("kernel,scheme,shape", CASES)
def test_matmul_matches_dequantize_then_matmul(kernel, scheme, shape, lead):
    qw = quantize(_weight(shape), scheme)
    x = torch.randn(*lead, shape[1], generator=torch.Generator().manual_seed(7))
    y = kernel.matmul(x, kernel.pack(qw), qw.scheme, qw.shape)
    ref = x @ qw.dequantize().T
    assert y.shape == (*lead, shape[0]) and y.dtype == x.dtype
    rel = float((y - ref).norm() / ref.norm())
    assert rel < _tolerance(kernel, qw), f"{kernel.name} {scheme}: relative error {rel:.3g}"


@pytest.mark.parametrize("kernel,scheme,shape", CASES)
def test_unpack_pack_round_trip_is_exact(kernel, scheme, shape):
    qw = quantize(_weight(shape, seed=3), scheme)
    back = kernel.unpack(kernel.pack(qw), qw.scheme, qw.shape)
    assert_same_qw(back, qw)


@pytest.mark.parametrize("kernel", [Int8Kernel, Int4Kernel], ids=lambda k: k.name)
def test_bf16_kernels_are_not_trivially_exact(kernel):
    """Guard for the tolerance above: the packed kernels really run in bf16 (not a dequant fallback)."""
    s = "int8" if kernel is Int8Kernel else "int4-g32"
    qw = quantize(_weight((48, 576)), s)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    y = kernel.matmul(x, kernel.pack(qw), qw.scheme, qw.shape)
    ref_bf16 = (x.to(ACT_DTYPE).float() @ qw.dequantize().T)
    assert not torch.equal(y, x @ qw.dequantize().T)
    assert float((y - ref_bf16).norm() / ref_bf16.norm()) < BF16_TOL


@pytest.mark.usefixtures("torch_ops_path")
@pytest.mark.parametrize("scheme", ["int7", "int6", "int5"])
def test_int8pack_affine_low_bits_keeps_bf16_accuracy(scheme):
    """Regression: affine 5-7 bit codes were shifted by 128 (not 2^(b-1)), so the bf16 zero-point
    correction cancelled a large term and int5 per channel lost ~20% of the output."""
    qw = quantize(_weight((48, 576), seed=5), scheme)
    assert pick_kernel(qw) is Int8Kernel
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(6))
    y = Int8Kernel.matmul(x, Int8Kernel.pack(qw), qw.scheme, qw.shape)
    ref = x @ qw.dequantize().T
    assert float((y - ref).norm() / ref.norm()) < BF16_TOL


@pytest.mark.usefixtures("torch_ops_path")
# ----------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("scheme", ["int2-g64", "int3-g32", "int4-g32", "int4-g64-sym", "int4", "int4-tensor"])
def test_pick_int4pack_when_rows_are_a_multiple_of_16(scheme):
    assert pick_kernel(quantize(_weight((48, 576)), scheme)) is Int4Kernel
    assert pick_kernel(quantize(_weight((32, 128)), scheme)) is Int4Kernel
    # 24 rows: the int4 packed kernel needs N % 16 == 0 -> dequantize fallback
    assert pick_kernel(quantize(_weight((24, 128)), scheme)) is DequantKernel


@pytest.mark.usefixtures("torch_ops_path")
@pytest.mark.parametrize("scheme", ["int8", "int8-asym", "int7", "int5", "int8-tensor"])
@pytest.mark.parametrize("rows", [48, 24])
def test_pick_int8pack_for_per_channel_up_to_8_bits(scheme, rows):
    assert pick_kernel(quantize(_weight((rows, 128)), scheme)) is Int8Kernel


@pytest.mark.usefixtures("torch_ops_path")
@pytest.mark.parametrize("scheme,expected", [
    ("int8-g32", DequantKernel), ("int5-g32", DequantKernel), ("nf4-dq", DequantKernel),
    ("fp8-e4m3", DequantKernel), ("llm-int8", LLMInt8Kernel), ("bf16", FloatKernel), ("fp32", FloatKernel),
])
def test_pick_other_schemes(scheme, expected):
    assert pick_kernel(quantize(_weight((48, 128)), scheme)) is expected


def test_pick_by_name_refuses_an_unsupported_scheme():
    qw = quantize(_weight((48, 128)), "nf4-dq")
    assert pick_kernel(qw, "dequant") is DequantKernel
    with pytest.raises(ValueError, match="int4pack cannot run scheme nf4-b64-dq"):
        pick_kernel(qw, "int4pack")
    assert set(KERNELS_BY_NAME) == {k.name for k in KERNELS}


def test_int4_per_channel_576_runs_as_group_64_with_repeated_scales():
    qw = quantize(_weight((48, 576)), "int4")
    b = Int4Kernel.pack(qw)
    assert int(b["kgroup"]) == 64
    sz = b["sz"]  # [K/64, N, 2]: one per-row scale repeated over the 9 kernel groups
    assert sz.shape == (9, 48, 2)
    assert torch.equal(sz, sz[:1].expand_as(sz))
    assert torch.equal(sz[0, :, 0].float(), qw.tensors["scale"].float().reshape(-1).to(ACT_DTYPE).float())


# ----------------------------------------------------------------------------- LLM.int8()
def _llm_int8_reference(x, qw, threshold=6.0):
    """Independent LLM.int8() decomposition: outlier columns in float, the rest int8 x int8."""
    q = qw.tensors["qweight"].to(torch.float64)  # [N, K] int8 codes
    sw = qw.tensors["scale"].float().reshape(-1)  # [N]
    x2 = x.reshape(-1, x.shape[-1]).float()
    outl = (x2.abs() > threshold).any(dim=0)  # [K]
    regular = x2.clone()
    regular[:, outl] = 0
    sx = regular.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # [M, 1]
    xq = torch.round(regular / sx)
    assert xq.abs().max() <= 127
    acc = (xq.to(torch.float64) @ q.T).float()  # exact integer dot products
    y = acc * sx * sw
    if outl.any():
        y = y + x2[:, outl] @ (q[:, outl].float() * sw[:, None]).T
    return y.reshape(*x.shape[:-1], q.shape[0]), int(outl.sum())


def test_llm_int8_outlier_column_goes_through_the_float_path():
    K, N = 128, 48
    qw = quantize(_weight((N, K), seed=11), "llm-int8")
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(12))
    x[1, 2, 17] = 20.0  # one outlier (> threshold 6) in column 17
    ref, n_out = _llm_int8_reference(x, qw)
    assert n_out == 1
    stats = {"outlier_cols": 0, "cols": 0}
    y = LLMInt8Kernel.matmul(x, LLMInt8Kernel.pack(qw), qw.scheme, qw.shape, stats=stats)
    assert stats == {"outlier_cols": 1, "cols": K}
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the decomposition matters: quantizing the outlier with the rest would be far worse
    exact = x @ qw.dequantize().T
    naive, _ = _llm_int8_reference(x, qw, threshold=float("inf"))
    assert (y - exact).norm() < 0.5 * (naive - exact).norm()


def test_llm_int8_without_outliers_is_int8_times_int8():
    K, N = 128, 32
    qw = quantize(_weight((N, K), seed=13), "llm-int8")
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(14)).clamp(-5, 5)
    # hand-rolled: row-wise absmax int8 activations times the int8 weight codes
    q = qw.tensors["qweight"].to(torch.float64)
    sx = x.abs().amax(1, keepdim=True) / 127.0
    xq = torch.round(x / sx)
    expected = (xq.double() @ q.T).float() * sx * qw.tensors["scale"].float().reshape(-1)
    stats = {"outlier_cols": 0, "cols": 0}
    y = LLMInt8Kernel.matmul(x, LLMInt8Kernel.pack(qw), qw.scheme, qw.shape, stats=stats)
    assert stats == {"outlier_cols": 0, "cols": K}
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_llm_int8_threshold_counts_columns_over_the_whole_batch():
    K = 64
    qw = quantize(_weight((16, K), seed=15), "llm-int8")
    x = torch.zeros(2, 3, K)
    x[0, 0, 5] = 7.0
    x[1, 2, 9] = -6.5
    x[1, 1, 9] = 6.1  # same column twice: counted once
    x[0, 1, 20] = 6.0  # not above the threshold
    stats = {"outlier_cols": 0, "cols": 0}
    y = LLMInt8Kernel.matmul(x, LLMInt8Kernel.pack(qw), qw.scheme, qw.shape, stats=stats)
    assert stats["outlier_cols"] == 2
    ref, n_out = _llm_int8_reference(x, qw)
    assert n_out == 2
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widened_16bit_linear_is_the_16bit_gemm(dtype):
    """Without native 16-bit GEMM (AVX2), many-row 16-bit matmuls widen the weight to fp32 chunk
    by chunk: exact products summed in fp32 and rounded once to the 16-bit dtype, like the
    16-bit GEMM itself (within one 16-bit rounding of the float64 product)."""
    from quantkit.kernels import cpu

    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 96, generator=g).to(dtype)
    x = torch.randn(2, 40, 96, generator=g).to(dtype)
    exact = (x.double() @ w.double().T)
    old = cpu.WIDEN_CHUNK
    cpu.WIDEN_CHUNK = 128  # several chunks, the last one short
    try:
        y = cpu._widened_linear(x, w)
    finally:
        cpu.WIDEN_CHUNK = old
    assert y.dtype == dtype and y.shape == (2, 40, 300)
    tol = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert torch.allclose(y.double(), exact, rtol=tol, atol=1e-4)  # atol: fp32 summation of cancelling terms
    if dtype == torch.bfloat16:  # (torch's own fp16 CPU GEMM rounds along the way: it is further off)
        assert torch.allclose(torch.nn.functional.linear(x, w).double(), y.double(), rtol=2 * tol, atol=1e-6)


def test_widened_16bit_linear_keeps_gradients():
    """QLoRA trains through a 16-bit base: the widened path must pass gradients to the input."""
    from quantkit.kernels import cpu

    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 32, generator=g).bfloat16()
    x = torch.randn(40, 32, generator=g).bfloat16().requires_grad_()
    cpu._widened_linear(x, w).float().sum().backward()
    assert torch.allclose(x.grad.float(), w.float().sum(0).expand(40, 32), rtol=1e-2)


WIDE_SCHEMES = ["int8", "int8-asym", "int7", "int5", "int8-tensor", "int4-g32", "int4-g64-sym", "int4", "int4-tensor",
                "int3-g32", "int2-g64", "int4-g64"]


@pytest.fixture
def widen_everything(monkeypatch):
    """Make the fp32 path of the packed weight-only kernels run from one row, in chunks of 32
    weight rows, as it does on a CPU without a native 16-bit GEMM (whatever this CPU has)."""
    from quantkit.kernels import cpu

    monkeypatch.setattr(cpu, "_NATIVE_16BIT", False)
    monkeypatch.setattr(cpu, "WIDEN_INT4_MIN_ROWS", 1)
    monkeypatch.setattr(cpu, "WIDEN_INT8_MIN_ROWS", 1)
    monkeypatch.setattr(cpu, "WIDEN_CHUNK", 32)
    return cpu


@pytest.mark.usefixtures("torch_ops_path")
@pytest.mark.parametrize("shape", [(96, 256), (64, 576), (32, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scheme", WIDE_SCHEMES)
def test_widened_packed_kernels_use_the_exact_dequantized_weight(widen_everything, scheme, shape):
    """Many-row (prefill, calibration) int4/int8 matmuls on CPUs without a native bf16 GEMM
    dequantize the weight chunk by chunk from the stored scale/zero and run fp32: the result is
    x @ dequantize(qw).T to fp32 summation order, not the bf16 kernels' 1e-3 (several chunks,
    the last one short for 96 rows)."""
    qw = quantize(_weight(shape, seed=5), scheme)
    kernel = pick_kernel(qw)
    assert kernel in (Int4Kernel, Int8Kernel)
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(8))
    y = kernel.matmul(x, kernel.pack(qw), qw.scheme, qw.shape)
    ref = x.double() @ qw.dequantize().double().T
    assert y.shape == (3, 5, shape[0]) and y.dtype == x.dtype
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < TIGHT, f"{kernel.name} {scheme}: relative error {rel:.3g}"


def test_widened_int4_is_exact_for_any_row_count_and_packed_kernel_is_bf16(widen_everything, monkeypatch):
    """The widened path reads the stored codes the kernel keeps, so row counts that are not a
    multiple of torch's 32-row blocks are exact too; with widening off, the same layer runs the
    packed bf16 kernel, whose error is the bf16 kernel's, well above fp32 summation order."""
    x = torch.randn(40, 576, generator=torch.Generator().manual_seed(9))
    for rows in (48, 64):
        qw = quantize(_weight((rows, 576)), "int4-g32")
        ref = x.double() @ qw.dequantize().double().T
        for widen, lo, hi in ((1, 0.0, TIGHT), (10**9, TIGHT * 10, BF16_TOL)):
            monkeypatch.setattr(widen_everything, "WIDEN_INT4_MIN_ROWS", widen)
            y = Int4Kernel.matmul(x, Int4Kernel.pack(qw), qw.scheme, qw.shape)
            rel = float((y.double() - ref).norm() / ref.norm())
            assert lo <= rel < hi, (rows, widen, rel)


def test_widened_path_is_chosen_by_rows_and_cpu(monkeypatch):
    """Few rows (decode) keep the packed kernel; so does a CPU with a native 16-bit GEMM, and a
    forward that needs gradients through x."""
    from quantkit.kernels import cpu

    x = torch.zeros(8, 64)
    monkeypatch.setattr(cpu, "_NATIVE_16BIT", False)
    assert cpu._widen_packed(x, 64, 8) and not cpu._widen_packed(x, 64, 9)
    assert not cpu._widen_packed(x.requires_grad_(), 64, 8)
    monkeypatch.setattr(cpu, "_NATIVE_16BIT", True)
    assert not cpu._widen_packed(torch.zeros(8, 64), 64, 8)
