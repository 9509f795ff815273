"""quantkit's native weight-only kernels (kernels/wonly.cpp through NativeKernel) against the
codecs: the dequantized rows bit for bit, and x @ W^T against F.linear(x, dequantized W) on
awkward shapes, with each ISA path the CPU has forced in turn; the custom ops pass
torch.library.opcheck and trace under torch.compile without graph breaks."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from quantkit.formats import quantize
from quantkit.kernels import native, pick_kernel
from quantkit.kernels.weight_only import GGUF_TYPES, MAX_FUSED_ROWS, NativeKernel

if not native.wonly():
    pytest.skip(f"quantkit's native kernels are not built here: {native.why_not_native() or 'the build failed'}",
                allow_module_level=True)

BEST = int(torch.ops.quantkit.wonly_best_isa())
ISAS = [pytest.param(i, id=n) for i, n in ((1, "avx2"), (2, "avx512")) if i <= BEST]
# every stored layout: integer widths 2-8, symmetric and affine, per channel, per tensor and
# grouped; nf4 / fp4 with and without double quant; both fp8 formats
SCHEMES = ["int8", "int8-asym", "int8-g32", "int7", "int6-g64", "int5-g32-sym", "int4", "int4-g32", "int4-g64-sym",
           "int4-tensor", "int3-g128", "int3-g32-sym", "int2-g64", "int2-g32-sym", "nf4-dq", "nf4-b32", "fp4-dq",
           "fp4-b128", "fp8-e4m3", "fp8-e5m2",
           # every GGUF block type the native path runs, from its own table (the K-quants need rows of
           # 256: 1536 and 4864 here)
           *(f"gguf-{t.lower()}" for t in GGUF_TYPES)]
SHAPES = [(33, 576), (7, 896), (5, 1536), (3, 4864), (9, 577)]  # odd N; K of SmolLM2 / Qwen2.5 and an odd one
ROWS = [1, 3, 64, 513]  # decode, few rows, and many rows (the dequantize-then-GEMM side of the op)


def _qw(scheme, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (1 + 3 * torch.rand(shape[0], 1, generator=g))  # rows of different ranges
    return quantize(w, scheme)


def _cases(scheme):
    for shape in SHAPES:
        try:
            yield shape, _qw(scheme, shape)
        except ValueError:  # the grammar refuses this width for the group size: nothing to run
            continue


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantized_rows_are_the_codecs_bit_for_bit(scheme, isa):
    n_cases = 0
    for shape, qw in _cases(scheme):
        b = NativeKernel.pack(qw)
        ref = qw.dequantize()
        assert torch.equal(NativeKernel.dequantize_rows(b, qw.scheme, qw.shape, 0, shape[0], isa), ref), shape
        assert torch.equal(NativeKernel.dequantize_rows(b, qw.scheme, qw.shape, 1, 3, isa), ref[1:3]), shape
        n_cases += 1
    assert n_cases >= 2


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_matmul_equals_dequantize_then_linear(scheme, isa, monkeypatch):
    monkeypatch.setenv("QUANTKIT_ISA", {1: "avx2", 2: "avx512"}[isa])
    for shape, qw in _cases(scheme):
        assert pick_kernel(qw) is NativeKernel
        b = NativeKernel.pack(qw)
        w = qw.dequantize()
        for rows in ROWS:
            x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(rows))
            y = NativeKernel.matmul(x, b, qw.scheme, qw.shape)
            ref = F.linear(x, w)
            assert y.shape == ref.shape and y.dtype == torch.float32
            err = float((y - ref).abs().max() / ref.abs().max())
            assert err <= 1e-4, f"{scheme} {shape} rows={rows}: max |dy| = {err:.2e} x max |y|"


def test_the_isa_paths_really_differ_and_agree():
    """Guard against a forced ISA being ignored: AVX2 and AVX-512 sum in different orders, so
    their outputs differ in the last bits while both stay within the bound."""
    if BEST < 2:
        pytest.skip("this CPU has no AVX-512: only the AVX2 path runs here")
    qw = _qw("int4-g32", (64, 1536))
    args = NativeKernel.op_args(NativeKernel.pack(qw), qw.scheme, qw.shape)
    x = torch.randn(1, 1536, generator=torch.Generator().manual_seed(3))
    y1 = torch.ops.quantkit.wonly_linear(x, *args, 1, MAX_FUSED_ROWS)
    y2 = torch.ops.quantkit.wonly_linear(x, *args, 2, MAX_FUSED_ROWS)
    assert not torch.equal(y1, y2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-4)


def test_leading_dims_dtype_and_bias_through_quant_linear():
    from quantkit.nn import QuantLinear

    qw = _qw("nf4-dq", (48, 576))
    bias = torch.randn(48)
    ql = QuantLinear(qw, bias)
    assert ql.kernel is NativeKernel
    x = torch.randn(2, 3, 576)
    ref = F.linear(x, qw.dequantize(), bias)
    assert float((ql(x) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    yb = ql(x.to(torch.bfloat16))  # a bf16 model's activations: computed in fp32, returned in bf16
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), F.linear(x.to(torch.bfloat16).float(), qw.dequantize(), bias),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scheme", ["int4-g32", "int8", "nf4-dq", "fp8-e4m3", "fp4-b64"])
def test_layer_holds_the_stored_bytes_and_gives_them_back(scheme):
    """No float copy: the kernel's buffers are the storage tensors themselves (plus nf4/fp4's
    64-byte level table), and unpack rebuilds the storage exactly."""
    qw = _qw(scheme, (48, 576))
    b = NativeKernel.pack(qw)
    stored = {id(t) for t in qw.tensors.values()}
    extra = [n for n, t in b.items() if id(t) not in stored]
    assert extra == (["lut"] if scheme.startswith(("nf4", "fp4")) else [])
    back = NativeKernel.unpack(b, qw.scheme, qw.shape)
    for name, t in qw.tensors.items():
        assert torch.equal(back.tensors[name].view(torch.uint8) if t.element_size() == 1 else back.tensors[name],
                           t.view(torch.uint8) if t.element_size() == 1 else t), name


@pytest.mark.parametrize("scheme", ["int3-g32", "int2-g64", "int4"])
def test_repacked_layouts_give_the_storage_back(scheme):
    qw = _qw(scheme, (9, 577) if scheme == "int4" else (16, 576))
    b = NativeKernel.pack(qw)
    assert "codes" in b and "st_qweight" not in b  # 2-/3-bit and odd rows: 4-bit rows instead
    back = NativeKernel.unpack(b, qw.scheme, qw.shape)
    for name, t in qw.tensors.items():
        assert torch.equal(back.tensors[name], t), name


@pytest.mark.parametrize("scheme,ratio", [("gguf-q4_0", 1.0), ("gguf-q4_1", 1.0), ("gguf-q8_0", 1.0),
                                          ("gguf-q4_k", 6.5 / 4.5), ("gguf-iq4_nl", 1.0 + 64 / (16 * 1536 // 32 * 18))])  # + the 16 levels
def test_gguf_layouts_hold_the_files_bytes_and_give_them_back(scheme, ratio):
    """The legacy types split into codes and float16 d (and m) hold exactly the file's bytes; Q4_K
    holds fp32 sub-block scales beside its codes. unpack gives llama.cpp's block bytes back."""
    qw = _qw(scheme, (16, 1536))
    b = NativeKernel.pack(qw)
    held = sum(t.numel() * t.element_size() for t in b.values())
    assert held == pytest.approx(ratio * qw.tensors["qweight"].numel(), rel=1e-9)
    assert torch.equal(NativeKernel.unpack(b, qw.scheme, qw.shape).tensors["qweight"], qw.tensors["qweight"])


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "gguf-q4_1", "gguf-q4_k", "int8"])
def test_embedding_rows_are_the_dequantized_rows(scheme):
    from quantkit.nn import QuantEmbedding

    qw = _qw(scheme, (40, 256))
    emb = QuantEmbedding(qw)
    ids = torch.tensor([[3, 0, 39], [3, 7, 7]])
    assert torch.equal(emb(ids), qw.dequantize()[ids])


@pytest.mark.parametrize("scheme", ["int4-g32", "int6-g64", "nf4-dq", "fp8-e5m2", "gguf-q4_1", "gguf-q4_k"])
def test_custom_ops_pass_opcheck(scheme):
    qw = _qw(scheme, (16, 512))
    args = NativeKernel.op_args(NativeKernel.pack(qw), qw.scheme, qw.shape)
    for rows in (1, 40):
        x = torch.randn(rows, 512)
        torch.library.opcheck(torch.ops.quantkit.wonly_linear.default, (x, *args, 0, MAX_FUSED_ROWS))
    torch.library.opcheck(torch.ops.quantkit.wonly_dequant.default, (*args, 0, 2, 9))


def test_compiles_without_graph_breaks():
    """torch.compile traces QuantLinear layers on the native ops as one graph (fullgraph=True
    raises at the first graph break) and gives the eager result."""
    from quantkit.nn import QuantLinear

    layers = torch.nn.Sequential(QuantLinear(_qw("int4-g64", (128, 576))), torch.nn.SiLU(),
                                 QuantLinear(_qw("nf4-dq", (576, 128), seed=1)))
    x = torch.randn(1, 576)
    with torch.inference_mode():
        eager = layers(x)
        compiled = torch.compile(layers, fullgraph=True, dynamic=False)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_without_native_everything_runs_on_torch_ops_and_says_so_once():
    """QUANTKIT_NATIVE=0: NativeKernel supports nothing, torch's kernels run, and one log line
    says why (however many layers ask)."""
    code = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s|%(message)s')\n"
        "from quantkit.formats import quantize\n"
        "from quantkit.nn import QuantLinear\n"
        "w = torch.randn(32, 128)\n"
        "ys = [QuantLinear(quantize(w, s))(torch.randn(1, 128)) for s in ('int4-g32', 'nf4-dq', 'fp8-e4m3', 'int8')]\n"
        "print('kernels', [QuantLinear(quantize(w, s)).kernel.name for s in ('int4-g32', 'nf4-dq', 'int8')])\n"
    )
    env = dict(os.environ, QUANTKIT_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "kernels ['int4pack', 'dequant', 'int8pack']" in out.stdout
    lines = [ln for ln in out.stderr.splitlines() if "weight-only kernels are not used" in ln]
    assert len(lines) == 1 and "QUANTKIT_NATIVE=0" in lines[0], out.stderr


def test_bound_layers_run_by_handle_and_are_released_with_their_layer():
    """A layer's arguments are registered once (wonly_bind) and each call passes a handle; the
    handle answers the same as the unbound op, and goes away with the layer's bind result."""
    import gc

    qw = _qw("int4-g64", (40, 576))
    b = NativeKernel.pack(qw)
    bound = NativeKernel.bind(b, qw.scheme, qw.shape)
    handle = bound[0]
    args = NativeKernel.op_args(b, qw.scheme, qw.shape)
    for rows in (1, 5, MAX_FUSED_ROWS + 3):
        x = torch.randn(rows, 576)
        torch.testing.assert_close(torch.ops.quantkit.wonly_run(x, handle, 40),
                                   torch.ops.quantkit.wonly_linear(x, *args, 0, MAX_FUSED_ROWS), rtol=0, atol=0)
        torch.library.opcheck(torch.ops.quantkit.wonly_run.default, (x, handle, 40))
    with pytest.raises(RuntimeError, match="has 40 outputs"):
        torch.ops.quantkit.wonly_run(torch.randn(1, 576), handle, 41)
    del bound
    gc.collect()
    with pytest.raises(RuntimeError, match="no bound layer"):
        torch.ops.quantkit.wonly_run(torch.randn(1, 576), handle, 40)
