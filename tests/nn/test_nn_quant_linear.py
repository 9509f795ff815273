"""QuantLinear / QuantEmbedding against nn.Linear, the dequantized weight, and round trips."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats import quantize
from quantkit.kernels.cpu import DequantKernel, FloatKernel, Int4Kernel, Int8Kernel, LLMInt8Kernel
from quantkit.nn import QuantEmbedding, QuantLinear


def _linear(n_in=128, n_out=48, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=True)
    with torch.no_grad():
        lin.bias.uniform_(-1, 1)  # a bias large enough to matter in the comparison
    return lin


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _same_qw(a, b):
    assert a.scheme == b.scheme and tuple(a.shape) == tuple(b.shape) and sorted(a.tensors) == sorted(b.tensors)
    for k in a.tensors:
        ta, tb = a.tensors[k], b.tensors[k]
        assert ta.dtype == tb.dtype, k
        if ta.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            ta, tb = ta.view(torch.uint8), tb.view(torch.uint8)
        assert torch.equal(ta, tb), k


def test_fp32_quant_linear_equals_nn_linear():
    lin = _linear()
    ql = QuantLinear(quantize(lin.weight.detach(), "fp32"), lin.bias)
    assert ql.kernel is FloatKernel
    x = _x(3, 5, 128)
    torch.testing.assert_close(ql(x), lin(x), rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("torch_ops_path")
def test_int8_quant_linear_equals_nn_linear_within_quantization_error():
    lin = _linear()
    qw = quantize(lin.weight.detach(), "int8")
    ql = QuantLinear(qw, lin.bias)
    assert ql.kernel is Int8Kernel
    x = _x(3, 5, 128)
    with torch.no_grad():
        y, ref = ql(x), lin(x)
        # against the dequantized weight: only the kernel's bf16 activations differ
        deq = F.linear(x, qw.dequantize(), lin.bias)
        no_bias = ref - lin.bias
    assert float((y - deq).norm() / deq.norm()) < 1e-2
    # against the float layer: int8 per-channel weight error (~0.5% of the weight) + bf16
    assert float((y - ref).norm() / ref.norm()) < 2e-2
    # the bias is really added (not silently dropped)
    assert float((y - no_bias).norm() / ref.norm()) > 0.1


def test_bias_is_a_frozen_copy():
    lin = _linear()
    ql = QuantLinear(quantize(lin.weight.detach(), "int8"), lin.bias)
    assert ql.bias is not lin.bias and not ql.bias.requires_grad
    with torch.no_grad():
        lin.bias.add_(1.0)
    assert not torch.equal(ql.bias, lin.bias)


@pytest.mark.parametrize("scheme,kernel", [
    ("int8", Int8Kernel), ("int8-asym", Int8Kernel), ("int4-g32", Int4Kernel), ("int3-g32", Int4Kernel),
    ("llm-int8", LLMInt8Kernel), ("nf4-dq", DequantKernel), ("fp8-e4m3", DequantKernel), ("bf16", FloatKernel),
    ("int5-g32", DequantKernel),
])
@pytest.mark.parametrize("path", ["native", "torch-ops"])
def test_quantized_weight_round_trip(scheme, kernel, path, request):
    """The storage comes back exactly from the layout of the kernel each path picks (kernel: the
    torch-ops path's; the native path runs every weight-only layout through NativeKernel)."""
    from quantkit.kernels import native
    from quantkit.kernels.weight_only import NativeKernel

    if path == "torch-ops":
        request.getfixturevalue("torch_ops_path")
    elif not native.wonly():
        pytest.skip(f"quantkit's native kernels are not built here: {native.why_not_native() or 'the build failed'}")
    lin = _linear(seed=2)
    qw = quantize(lin.weight.detach(), scheme)
    ql = QuantLinear(qw, None)
    if path == "native" and kernel in (Int8Kernel, Int4Kernel, DequantKernel):
        kernel = NativeKernel
    assert ql.kernel is kernel
    ql(_x(2, 128))  # packed: the storage now comes from the kernel's layout
    _same_qw(ql.quantized_weight(), qw)
    assert torch.equal(ql.dequantized_weight(), qw.dequantize())
    # no persistent buffers: the state dict holds nothing (the checkpoint writes storage parts)
    assert list(ql.state_dict()) == []


def test_forced_kernel_and_run_stats():
    lin = _linear(seed=3)
    qw = quantize(lin.weight.detach(), "int4-g32")
    ql = QuantLinear(qw, lin.bias, kernel="dequant")
    assert ql.kernel is DequantKernel and ql.run_stats is None
    x = _x(2, 128)
    torch.testing.assert_close(ql(x), F.linear(x, qw.dequantize(), lin.bias), rtol=1e-6, atol=1e-6)

    ql8 = QuantLinear(quantize(lin.weight.detach(), "llm-int8"))
    x = _x(2, 4, 128, seed=4)
    x[0, 1, 3] = 30.0
    ql8(x)
    ql8(x[:, :, :])
    assert ql8.run_stats == {"outlier_cols": 2, "cols": 256}  # accumulates over calls


# ----------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("scheme", ["fp32", "bf16", "fp16", "int8", "llm-int8"])
def test_quant_embedding_lookup_equals_dequantized_rows(scheme):
    table = _x(50, 32, seed=5)
    qw = quantize(table, scheme)
    emb = QuantEmbedding(qw, padding_idx=None, out_dtype=torch.float32)
    ids = torch.tensor([[0, 7, 7, 49], [3, 2, 1, 0]])
    out = emb(ids)
    assert out.shape == (2, 4, 32) and out.dtype == torch.float32
    assert torch.equal(out, qw.dequantize()[ids])
    _same_qw(emb.quantized_weight(), qw)
    assert emb.scheme == qw.scheme


def test_quant_embedding_int8_is_close_to_the_float_table():
    table = _x(50, 32, seed=6)
    emb = QuantEmbedding(quantize(table, "int8"))
    ids = torch.arange(50)
    # per-row absmax int8: |error| <= scale/2 = absmax/254 per element
    err = (emb(ids) - table).abs().amax(dim=1)
    assert bool((err <= table.abs().amax(dim=1) / 254 * 1.001).all())


def test_quant_embedding_linear_is_the_tied_head():
    table = _x(50, 32, seed=7)
    emb = QuantEmbedding(quantize(table, "bf16"))
    h = _x(3, 32, seed=8)
    # the inner linear computes h @ table.T with the same stored rows (the tied output head)
    ref = (h.to(torch.bfloat16) @ table.to(torch.bfloat16).T).float()
    torch.testing.assert_close(emb.linear(h), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scheme", ["int4", "int4-g32", "int8-g32", "int8-asym", "nf4", "fp8-e4m3"])
def test_quant_embedding_refuses_other_schemes(scheme):
    with pytest.raises(ValueError, match="embeddings can be stored as"):
        QuantEmbedding(quantize(_x(64, 64, seed=9), scheme))


@pytest.mark.parametrize("scheme", ["int8", "int4-g32", "nf4-dq", "fp8-e4m3", "gguf-q4_1", "int5-g32"])
def test_weight_attribute_reads_as_int8_codes_before_and_after_packing(scheme):
    """Model code reads `layer.weight.dtype` (T5 casts its feed-forward input to it unless it is
    int8): a quantized layer must never answer with a scale's float16 or the codes' uint8."""
    ql = QuantLinear(quantize(torch.randn(32, 256), scheme))
    assert ql.weight.dtype == torch.int8
    ql(torch.randn(1, 256))
    assert ql.weight.dtype == torch.int8
