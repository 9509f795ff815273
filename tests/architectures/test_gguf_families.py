"""GGUF export for every family quantkit's exporter knows (io/gguf.ARCHS) among the matrix's:
the file loads through transformers' own GGUF loader (a peer's reader) to the very model (F32:
identical logits), and a quantized file's tensors load as the `gguf` package's own dequantization
of the bytes written. The families the matrix has and the exporter does not are listed in the
README as GGUF-less (scripts/architectures_table.py)."""
import numpy as np
import pytest
import torch
from tiny_models import DECODERS, tiny
from tiny_tokenizer import make_tiny_tokenizer

import quantkit as qk
from quantkit.io.gguf import ARCHS, export_gguf

gguf = pytest.importorskip("gguf")
# transformers' GGUF reader takes these from its config defaults, not from the file: Qwen3's head_dim
# (128), GPT-2's position table (1024 rows); llama.cpp always ties Gemma's head to its table
# and Qwen3-MoE's expert width (768); llama.cpp renormalizes Qwen3-MoE's top-k routing weights
QWEN3 = dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1)
OVERRIDES = {"qwen3": QWEN3, "qwen3_moe": dict(**QWEN3, moe_intermediate_size=768, norm_topk_prob=True),
             "gpt2": dict(n_positions=1024),
             "gemma2": dict(tie_word_embeddings=True), "gemma3_text": dict(tie_word_embeddings=True)}
FAMILIES = sorted(k for k in DECODERS if k in ARCHS)
ATTN_OUT = ("self_attn.o_proj.weight", "attn.c_proj.weight")


@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_export_loads_back_through_transformers(kind, tmp_path):
    tok = make_tiny_tokenizer()
    tok.pad_token = tok.eos_token  # written as the padding id (phi3's config default, 32000, is past this vocabulary)
    m = tiny(kind, vocab_size=len(tok), **{"tie_word_embeddings": False, **OVERRIDES.get(kind, {})})
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
    export_gguf(m, tok, tmp_path / "f32.gguf", "F32", tokenizer_pre="gpt-2", progress=False)
    back, _ = qk.load(tmp_path / "f32.gguf")
    with torch.no_grad():  # to fp32 rounding: the file holds norm epsilons as float32 (GPT-2's 1e-5 moves)
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=1e-5, atol=1e-5)
    export_gguf(m, tok, tmp_path / "q8.gguf", "Q8_0", tokenizer_pre="gpt-2", progress=False)
    back, _ = qk.load(tmp_path / "q8.gguf")
    got = dict(back.named_parameters())
    reader = gguf.GGUFReader(tmp_path / "q8.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_output.weight")
    name = next(n for n in got if n.endswith(ATTN_OUT) and ".1." in n)  # block 1's attention output, as transformers names it
    w = got[name].detach().numpy()
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape[::-1] if kind == "gpt2" else w.shape)
    assert t.tensor_type.name == "Q8_0"
    np.testing.assert_array_equal(w, want.T if kind == "gpt2" else want)  # GPT-2's Conv1D holds [in, out]


def test_a_family_the_exporter_does_not_know_is_refused_by_name(tmp_path):
    from quantkit.errors import SourceError

    tok = make_tiny_tokenizer()
    with pytest.raises(SourceError, match="GGUF export does not support model type 'olmo2'"):
        export_gguf(tiny("olmo2", vocab_size=len(tok)), tok, tmp_path / "g.gguf", "F32", tokenizer_pre="gpt-2",
                    progress=False)
