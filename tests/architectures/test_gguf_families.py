"""GGUF export for every family quantkit's exporter knows (io/gguf.ARCHS) among the matrix's:
the file loads through transformers' own GGUF loader (a peer's reader) to the very model (F32:
identical logits), and a quantized file's tensors load as the `gguf` package's own dequantization
of the bytes written; where llama.cpp's Python binding is installed (benchmarks/setup_llamacpp.sh),
llama.cpp runs every exported family to the float model's logits (Mixtral only there: transformers
reads its llama-with-experts file as a dense llama). The families the matrix has and the exporter
does not are listed in the README as GGUF-less (scripts/architectures_table.py)."""
import numpy as np
import pytest
import torch
from tiny_models import DECODERS, ENCODERS, tiny, tiny_encoder
from tiny_tokenizer import make_tiny_tokenizer

import quantkit as qk
from quantkit.io.gguf import ARCHS, export_gguf

gguf = pytest.importorskip("gguf")
# transformers' GGUF reader takes these from its config defaults, not from the file: Qwen3's head_dim
# (128), Qwen3-MoE's expert width (768), GPT-2's position table (1024 rows), Gemma's head_dim and
# query_pre_attn_scalar (256; llama.cpp scales by 1/sqrt(head_dim), so they must agree). llama.cpp
# always ties Gemma's head to its table and renormalizes Qwen3-MoE's top-k routing weights.
QWEN3 = dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1)
GEMMA = dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1, query_pre_attn_scalar=256,
             tie_word_embeddings=True)
OVERRIDES = {"qwen3": QWEN3, "qwen3_moe": dict(**QWEN3, moe_intermediate_size=768, norm_topk_prob=True),
             "gpt2": dict(n_positions=1024), "gemma2": GEMMA, "gemma3_text": GEMMA}
FAMILIES = sorted(k for k in DECODERS if k in ARCHS and ARCHS[k].hf_reads)
EXPORTED = sorted(k for k in DECODERS if k in ARCHS)
ATTN_OUT = ("self_attn.o_proj.weight", "attn.c_proj.weight", "self_attention.dense.weight")


def _model_and_tokenizer(kind):
    tok = make_tiny_tokenizer()
    tok.pad_token = tok.eos_token  # written as the padding id (phi3's config default, 32000, is past this vocabulary)
    return tiny(kind, vocab_size=len(tok), **{"tie_word_embeddings": False, **OVERRIDES.get(kind, {})}), tok


@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_export_loads_back_through_transformers(kind, tmp_path):
    m, tok = _model_and_tokenizer(kind)
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


@pytest.mark.parametrize("kind", EXPORTED)
def test_gguf_export_runs_in_llama_cpp(kind, tmp_path):
    """The peer itself: llama.cpp's Python binding loads the F32 file and computes the float
    model's logits (its own kernels: to 5e-3; a lost family detail moved them by 0.6 and more)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    m, tok = _model_and_tokenizer(kind)
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    export_gguf(m, tok, tmp_path / "m.gguf", "F32", tokenizer_pre="gpt-2", progress=False)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        want = m(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 5e-3, float(np.abs(got - want).max())


@pytest.mark.parametrize("kind", ENCODERS)
@pytest.mark.parametrize("auto", ["AutoModel", "AutoModelForMaskedLM"])
def test_encoder_gguf_runs_in_llama_cpp(kind, auto, tmp_path):
    """An encoder (bare, or with its masked-LM head, which the file leaves out) in llama.cpp's
    BERT runtime: the last hidden state of every token, to 2e-3 (measured 3-4e-4)."""
    import transformers

    llama_cpp = pytest.importorskip("llama_cpp")
    tok = make_tiny_tokenizer()
    m = tiny_encoder(kind, getattr(transformers, auto), vocab_size=len(tok))
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    export_gguf(m, tok, tmp_path / "m.gguf", "F32", tokenizer_pre="gpt-2", progress=False)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), embedding=True, pooling_type=0, n_ctx=64,
                          verbose=False, n_threads=2)
    llm.tokenize = lambda *a, **k: list(ids)  # these very ids, not llama.cpp's own tokenization of a text
    got = np.array(llm.embed("-", normalize=False))
    with torch.no_grad():
        want = m(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 2e-3, float(np.abs(got - want).max())


def test_a_family_the_exporter_does_not_know_is_refused_by_name(tmp_path):
    from quantkit.errors import SourceError

    tok = make_tiny_tokenizer()
    with pytest.raises(SourceError, match="GGUF export does not support model type 'gpt_oss'"):
        export_gguf(tiny("gpt_oss", vocab_size=len(tok)), tok, tmp_path / "g.gguf", "F32", tokenizer_pre="gpt-2",
                    progress=False)
