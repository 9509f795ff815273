"""The int8-activation option of quantkit's native kernels (torch.ops.quantkit.wonly_linear_a8,
QuantLinear.set_activations, quantkit.set_activations) against a reference written from its
definition with torch ops: each input row quantized per block of QB values (the largest of
128, 64, 32 dividing the weight's group) to q = round(x * 127 / max|x|), times the weight the
codec dequantizes (codebooks with their levels rounded to int8 steps of max|level| / 127).
Every product and block sum is exact, so the kernel must give the reference up to fp32
summation order, on every layout that has the path and each ISA the CPU has."""
import pytest
import torch
import torch.nn.functional as F

from quantkit.formats import codebook, quantize
from quantkit.kernels import native
from quantkit.kernels.weight_only import GGUF_TYPES, MAX_FUSED_ROWS, NativeKernel

if not native.wonly():
    pytest.skip(f"quantkit's native kernels are not built here: {native.why_not_native() or 'the build failed'}",
                allow_module_level=True)

BEST = int(torch.ops.quantkit.wonly_a8_best_isa())
ISAS = [pytest.param(i, id=n) for i, n in ((1, "avx2"), (2, "avx512vnni")) if i <= BEST]
SCHEMES = ["int8", "int8-asym", "int8-g32", "int6-g64", "int4", "int4-g32", "int4-g64-sym", "int4-g128", "int3-g128",
           "int2-g64", "nf4-dq", "nf4-b64", "fp4-dq", *(f"gguf-{t.lower()}" for t in GGUF_TYPES)]
SHAPES = [(33, 576), (7, 1536), (5, 4864)]
ROWS = [1, 3, 16, 40]


def _qw(scheme, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (1 + 3 * torch.rand(shape[0], 1, generator=g))
    return quantize(w, scheme)


def _cases(scheme):
    for shape in SHAPES:
        try:
            yield shape, _qw(scheme, shape)
        except ValueError:  # the grammar refuses this width for the group size
            continue


def _block(group: int) -> int:
    return next(b for b in (128, 64, 32) if group % b == 0)


def _reference_x(x: torch.Tensor, qb: int) -> torch.Tensor:
    """x as the option sees it: per block of qb, q = round(x * 127 / max|x|), times max|x| / 127."""
    xb = x.reshape(x.shape[0], -1, qb)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return ((xb * inv).round() * (amax / 127)).reshape_as(x)


def _reference_w(qw) -> torch.Tensor:
    """The codec's dequantized weight; codebooks through their levels rounded to int8 steps."""
    kind = qw.scheme.kind
    if kind not in ("nf4", "fp4"):
        return qw.dequantize()
    levels = codebook.LEVELS[kind]
    amax = levels.abs().max()
    levels8 = (levels * 127 / amax).round() * (amax / 127)
    codes = codebook.block_codes(qw).view(-1, qw.scheme.group_size).long()
    return (levels8[codes] * codebook.block_absmax(qw)[:, None]).view(qw.shape)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_int8_activations_equal_the_reference(scheme, isa):
    n_cases = 0
    for shape, qw in _cases(scheme):
        args = NativeKernel.op_args(NativeKernel.pack(qw), qw.scheme, qw.shape)
        assert NativeKernel.int8_activations_ok(args), (scheme, shape)
        w = _reference_w(qw)
        for rows in ROWS:
            x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
            ref = F.linear(_reference_x(x, _block(args[9])), w)
            y = torch.ops.quantkit.wonly_linear_a8(x, *args, isa)
            err = float((y - ref).abs().max() / ref.abs().max())
            assert err <= 1e-4, f"{scheme} {shape} rows={rows}: max |dy| = {err:.2e} x max |y|"
            # and the option is an approximation of the exact product, not something else
            exact = F.linear(x, qw.dequantize())
            assert float((y - exact).abs().max() / exact.abs().max()) < 0.05
        n_cases += 1
    assert n_cases >= 1


def test_isa_paths_agree():
    """vpmaddubsw (AVX2) and vpdpbusd (VNNI) take the codes with different offsets and signs; the
    integer sums are the same, so the paths agree to the float rounding of the scaling."""
    if BEST < 2:
        pytest.skip("this CPU has no AVX-512 VNNI: only the AVX2 path runs here")
    for scheme in ("int4-g64", "nf4-dq", "int8", "gguf-q5_1"):
        qw = _qw(scheme, (64, 1536))
        args = NativeKernel.op_args(NativeKernel.pack(qw), qw.scheme, qw.shape)
        x = torch.randn(2, 1536, generator=torch.Generator().manual_seed(5))
        y1, y2 = torch.ops.quantkit.wonly_linear_a8(x, *args, 1), torch.ops.quantkit.wonly_linear_a8(x, *args, 2)
        assert float((y1 - y2).abs().max()) <= 1e-5 * float(y1.abs().max()), scheme


def test_zero_rows_and_all_zero_blocks():
    qw = _qw("int4-g32", (8, 256))
    args = NativeKernel.op_args(NativeKernel.pack(qw), qw.scheme, qw.shape)
    assert torch.ops.quantkit.wonly_linear_a8(torch.zeros(0, 256), *args, 0).shape == (0, 8)
    x = torch.randn(1, 256)
    x[:, 32:96] = 0  # blocks whose max is 0 quantize to 0, not NaN
    y = torch.ops.quantkit.wonly_linear_a8(x, *args, 0)
    assert torch.isfinite(y).all()


def test_layouts_without_the_path_are_refused_by_the_op():
    for scheme in ("fp8-e4m3", "fp8-e5m2"):
        qw = _qw(scheme, (8, 256))
        args = NativeKernel.op_args(NativeKernel.pack(qw), qw.scheme, qw.shape)
        assert not NativeKernel.int8_activations_ok(args)
        with pytest.raises(RuntimeError, match="not fp8"):
            torch.ops.quantkit.wonly_linear_a8(torch.randn(1, 256), *args, 0)


@pytest.mark.parametrize("scheme", ["int4-g32", "nf4-dq", "int8", "gguf-q4_k"])
def test_a8_op_passes_opcheck(scheme):
    qw = _qw(scheme, (16, 512))
    args = NativeKernel.op_args(NativeKernel.pack(qw), qw.scheme, qw.shape)
    for rows in (1, 5):
        torch.library.opcheck(torch.ops.quantkit.wonly_linear_a8.default, (torch.randn(rows, 512), *args, 0))


def test_quant_linear_runs_int8_activations_for_few_rows_and_exact_for_many():
    from quantkit.nn import QuantLinear

    qw = _qw("int4-g64", (48, 576))
    ql = QuantLinear(qw, torch.randn(48))
    exact = ql(torch.ones(1, 576))
    assert ql.set_activations("int8") and ql.bound_activations == "int8"
    w = _reference_w(qw)
    x = torch.randn(2, 3, 576)
    ref = F.linear(_reference_x(x.reshape(-1, 576), 64), w, ql.bias).reshape(2, 3, 48)
    torch.testing.assert_close(ql(x), ref, rtol=1e-4, atol=1e-4)
    many = torch.randn(MAX_FUSED_ROWS + 1, 576)  # prefill rows: the exact path
    torch.testing.assert_close(ql(many), F.linear(many, qw.dequantize(), ql.bias), rtol=1e-4, atol=1e-4)
    assert ql.set_activations("int8-all")  # every call, so that a window sees the decode numerics
    ref = F.linear(_reference_x(many, 64), w, ql.bias)
    torch.testing.assert_close(ql(many), ref, rtol=1e-4, atol=1e-4)
    rowwise = torch.cat([ql(many[i:i + 1]) for i in range(many.shape[0])])
    torch.testing.assert_close(ql(many), rowwise, rtol=1e-5, atol=1e-5)
    assert ql.set_activations("exact") and ql.bound_activations == "exact"
    assert torch.equal(ql(torch.ones(1, 576)), exact)
    with pytest.raises(ValueError, match="not one of"):
        ql.set_activations("int4")
    fp8 = QuantLinear(_qw("fp8-e4m3", (16, 256)))
    assert not fp8.set_activations("int8") and fp8.bound_activations == "exact"  # no int8 path: stays exact


def test_moving_a_layer_keeps_its_activation_mode():
    from quantkit.nn import QuantLinear

    ql = QuantLinear(_qw("int4-g32", (16, 256)))
    ql.set_activations("int8")
    ql.to(torch.float32)  # _apply rebinds the kernel's arguments
    assert ql.bound_activations == "int8"


def test_model_level_switch_counts_layers_and_compiles_as_one_graph():
    import quantkit as qk
    from quantkit.nn import QuantLinear

    model = torch.nn.Sequential(QuantLinear(_qw("int4-g64", (128, 576))), torch.nn.SiLU(),
                                QuantLinear(_qw("nf4-dq", (256, 128), seed=1)), torch.nn.SiLU(),
                                QuantLinear(_qw("fp8-e4m3", (64, 256), seed=2)))
    assert qk.set_activations(model, "int8") == (2, 3)
    x = torch.randn(1, 576)
    with torch.inference_mode():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert qk.set_activations(model, "exact") == (3, 3)
    with pytest.raises(qk.QuantkitError, match="no quantized layers"):
        qk.set_activations(torch.nn.Linear(4, 4))
