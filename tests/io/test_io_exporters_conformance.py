"""Every exporter, every scheme it accepts: the exported file, read back by a reader that is not
quantkit's, holds every quantized Linear and dequantizes to quantkit's own dequantized weights.

The Hugging Face layouts come from the registry (io/export_hf.py `EXPORTERS`) and the schemes
from what each layout's `check_scheme` accepts, so a new exporter or a wider bit range is tested
here without a new test (a new exporter fails until it has a reader in tests/io/export_reference.py).
They are read with `safetensors` and the slow readers of export_reference.py, written from the
formats' descriptions. GGUF files (io/gguf.py) are read with the `gguf` package's GGUFReader and
dequantized by its reference `gguf.quants.dequantize`: float files, quantkit's integer grids that
a legacy GGUF type holds (repacked), and every GGML type a file type gives the Linears (quantized
onto it by `quantize_for_gguf`, copied into the file).

The model: a tiny random Llama 256 wide (every group size 32/64/128 divides its widths, and the
K-quants' 256-blocks fit) with the tokenizer's vocabulary (GGUF writes the tokenizer)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import quantkit as qk
from quantkit.errors import SchemeError
from quantkit.formats.ggml import LINEAR_GRIDS
from quantkit.io.export_hf import EXPORTERS, check_scheme, export_hf
from quantkit.io.ggml_mix import FTYPES
from quantkit.nn import QuantLinear

from export_reference import READERS

try:
    import gguf
except ImportError:  # the GGUF cases skip; the Hugging Face layouts do not need it
    gguf = None

needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed")

# The integer weight-only schemes the layouts are made for: every width, symmetric or not,
# groups of 32/64/128 or per channel. Which of them each layout holds is the registry's to say.
CANDIDATES = [f"int{b}{g}-{sym}" for b in range(2, 9) for g in ("-g32", "-g64", "-g128", "") for sym in ("sym", "asym")]


def _accepts(fmt: str, scheme: str) -> bool:
    try:
        check_scheme(fmt, scheme)
    except SchemeError:
        return False
    return True


HF_CASES = [(fmt, s) for fmt in sorted(EXPORTERS) for s in CANDIDATES if _accepts(fmt, s)]

# llama.cpp's names of a Llama block's Linears (GGUF's tensor naming)
LLAMA_CPP_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                     "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                     "ffn_down": "mlp.down_proj"}
FLOAT_FILES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}  # GGUF float file type -> quantkit scheme


def _gguf_cases() -> list[tuple[str, str | None]]:
    """(GGUF file type, quantkit scheme, or None: quantize_for_gguf onto the file's GGML types)."""
    cases = [(ftype, scheme) for ftype, scheme in FLOAT_FILES.items()]
    for name, grid in LINEAR_GRIDS.items():  # quantkit's integer grid a legacy type holds: groups of 32
        bits = (grid.qmax - grid.qmin).bit_length()
        cases.append((name, f"int{bits}-g32-{'asym' if grid.affine else 'sym'}"))
    cases += [(ftype, None) for ftype in FTYPES if ftype not in FLOAT_FILES]
    return cases


GGUF_CASES = _gguf_cases()


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def quantized(model):
    """scheme -> the model quantized with it (rtn), each quantized once per module."""
    cache = {}

    def get(scheme):
        if scheme not in cache:
            cache[scheme] = qk.quantize(model, scheme, progress=False)
        return cache[scheme]
    return get


def _quantized_linears(model, qm) -> set[str]:
    """The Linears quantkit quantized, checked against the source: every Linear but the head."""
    layers = set(qm.quantkit.layers)
    assert layers == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert all(isinstance(qm.get_submodule(n), QuantLinear) for n in layers)
    return layers


def test_every_registered_exporter_is_tested():
    assert set(READERS) == set(EXPORTERS)  # a reader for each layout, no more
    assert {fmt for fmt, _ in HF_CASES} == set(EXPORTERS)  # and each layout accepts some scheme here
    assert {ftype for ftype, _ in GGUF_CASES} == set(FTYPES)  # and every GGUF file type


@pytest.mark.parametrize("fmt,scheme", HF_CASES, ids=[f"{f}-{s}" for f, s in HF_CASES])
def test_hf_export_reads_back_to_quantkits_weights(model, quantized, tmp_path, fmt, scheme):
    if fmt not in READERS:
        pytest.fail(f"no independent reader for the {fmt!r} layout: add one to tests/io/export_reference.py")
    qm = quantized(scheme)
    export_hf(qm, None, tmp_path / "out", fmt)
    got = READERS[fmt](tmp_path / "out")
    layers = _quantized_linears(model, qm)
    assert set(got) == layers  # every quantized Linear, and nothing else, stored quantized
    for name in sorted(layers):
        # the layouts store quantkit's float16 scales as they are: exact
        assert torch.equal(got[name], qm.get_submodule(name).dequantized_weight()), name


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (convert_hf_to_gguf.py's permute: within each head the
    two rotary halves interleaved) back to Hugging Face's rotate-half order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_linears(path) -> dict[str, tuple[str, str, torch.Tensor]]:
    """{Hugging Face Linear name: (GGUF tensor name, GGML type, float32 weight [out, in])} of every
    block Linear in a GGUF file, read and dequantized by the gguf package, head counts from the
    file's metadata."""
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    n_head = r.fields[f"{arch}.attention.head_count"].contents()
    n_kv = r.fields[f"{arch}.attention.head_count_kv"].contents()
    out = {}
    for t in r.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        if m is None or m[2] not in LLAMA_CPP_LINEARS:
            continue
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if m[2] in ("attn_q", "attn_k"):
            w = _unpermute(w, n_head if m[2] == "attn_q" else n_kv)
        out[f"model.layers.{m[1]}.{LLAMA_CPP_LINEARS[m[2]]}"] = (t.name, t.tensor_type.name, torch.from_numpy(w.copy()))
    return out


@needs_gguf
@pytest.mark.parametrize("ftype,scheme", GGUF_CASES, ids=[f"{f}-{s or 'gguf-grid'}" for f, s in GGUF_CASES])
def test_gguf_export_reads_back_to_quantkits_weights(model, quantized, tiny_tokenizer, tmp_path, ftype, scheme):
    if scheme is None:  # every Linear onto the GGML type llama.cpp's rules give it in a file of ftype
        qm = qk.quantize_for_gguf(model, tiny_tokenizer, ftype, method="rtn", progress=False)
    else:
        qm = quantized(scheme)
    path = tmp_path / "m.gguf"
    s = qk.export_gguf(qm, tiny_tokenizer, path, ftype, tokenizer_pre="gpt-2", progress=False)
    layers = _quantized_linears(model, qm)
    got = read_gguf_linears(path)
    assert set(got) == layers  # every quantized Linear is in the file
    if ftype not in FLOAT_FILES:  # quantkit says it copied every Linear's codes, none rounded again
        assert sorted(s.repacked) == sorted(g for g, _, _ in got.values()) and not s.requantized
    for name in sorted(layers):
        mod = qm.get_submodule(name)
        _, type_name, w = got[name]
        want = mod.dequantized_weight()
        if scheme is None:  # held in its own GGML type, bytes copied: exact
            assert type_name == mod.scheme.fp_format, name
            assert torch.equal(w, want), name
        elif ftype in FLOAT_FILES:  # fp16/bf16/fp32 values written in the same float type: exact
            assert type_name == ftype, name
            assert torch.equal(w, want), name
        elif qk.parse_scheme(scheme).symmetric:  # codes and float16 scales copied: exact
            assert type_name == ftype, name
            assert torch.equal(w, want), name
        else:  # affine: the type stores the offset m = -s·z in float16, the only rounding
            assert type_name == ftype, name
            # per block of 32: |fp16(m) - m| <= 2^-11 |m|, and |m| <= |block min| + s <= ~1.15 max|w| (4-5 bits)
            err = (w - want).abs().reshape(want.shape[0], -1, 32).amax(-1)
            tol = 2**-10 * want.abs().reshape(want.shape[0], -1, 32).amax(-1) + 2**-24
            assert bool((err <= tol).all()), (name, float((err - tol).max()))
