"""GGUF export: read back by the `gguf` package's reader and by transformers' GGUF loader (a peer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import quantkit as qk  # noqa: E402
from quantkit.errors import SchemeError, SourceError  # noqa: E402
from quantkit.io.ggml_mix import FTYPES, more_bits, tensor_type  # noqa: E402
from quantkit.io.gguf import _permute, export_gguf  # noqa: E402



@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _ids(tok):
    return torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])


def _reader_types(path):
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def test_f32_export_loads_back_with_identical_logits(model, tok, tmp_path):
    path = tmp_path / "m.gguf"
    s = export_gguf(model, tok, path, "F32", tokenizer_pre="gpt-2", progress=False)
    assert s.bytes == path.stat().st_size and s.types == {"F32": len(_reader_types(path))}
    m2, t2 = qk.load(path)  # transformers' GGUF loader undoes the q/k permutation
    assert t2.encode("the lazy dog") == tok.encode("the lazy dog")
    with torch.no_grad():
        assert torch.equal(model(_ids(tok)).logits, m2(_ids(tok)).logits)


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_legacy_tensors_are_the_gguf_reference_bytes(model, tok, tmp_path, ftype):
    path = tmp_path / f"m-{ftype}.gguf"
    export_gguf(model, tok, path, ftype, tokenizer_pre="gpt-2", progress=False)
    r = gguf.GGUFReader(path)
    tensors = {t.name: t for t in r.tensors}
    w = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type.name == ftype
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType[ftype]).view(np.uint8).reshape(-1)
    assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ref)
    m2, _ = qk.load(path)  # the loader dequantizes what we wrote: same values as the reference round trip
    deq = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType[ftype]),
                                 gguf.GGMLQuantizationType[ftype])
    assert np.array_equal(m2.model.layers[1].mlp.down_proj.weight.detach().numpy(), deq)
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    deq_q = gguf.quants.dequantize(gguf.quants.quantize(q, gguf.GGMLQuantizationType[ftype]),
                                   gguf.GGMLQuantizationType[ftype])
    assert np.array_equal(m2.model.layers[0].self_attn.q_proj.weight.detach().numpy(), deq_q)


@pytest.mark.parametrize("ftype", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_k_mix_files_load_in_transformers(model, tok, tmp_path, ftype):
    path = tmp_path / f"m-{ftype}.gguf"
    export_gguf(model, tok, path, ftype, tokenizer_pre="gpt-2", progress=False)
    types = _reader_types(path)
    # width 64 is no multiple of 256: llama.cpp's fallbacks apply to every 2-D tensor
    assert types["blk.0.attn_q.weight"] == {"Q2_K": "Q4_0", "Q3_K_M": "Q4_0", "Q4_K_M": "Q5_0",
                                            "Q5_K_M": "Q5_1", "Q6_K": "Q8_0"}[ftype]
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    m2, _ = qk.load(path)
    with torch.no_grad():
        a, b = model(_ids(tok)).logits, m2(_ids(tok)).logits
    assert torch.isfinite(b).all() and float((a - b).abs().max()) < 1.0


def test_permute_hand_worked():  # the inverse, transformers' loader, is checked by the F32 logits test
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)  # 4 heads of 8 rows
    p = _permute(w, 4)
    # within head 0, llama.cpp's order interleaves the two rotary halves: rows 0, 4, 1, 5, 2, 6, 3, 7
    assert p[:8, 0].tolist() == [w[i, 0].item() for i in (0, 4, 1, 5, 2, 6, 3, 7)]
    assert torch.equal(p.view(4, 8, 3)[1], _permute(w[8:16], 1))


@pytest.mark.parametrize("scheme,ftype", [("int8-g32-sym", "Q8_0"), ("int4-g32-sym", "Q4_0"),
                                          ("int4-g32-asym", "Q4_1"), ("int5-g32-asym", "Q5_1")])
def test_quantkit_grid_is_repacked_not_rounded_again(model, tok, tmp_path, scheme, ftype):
    qm = qk.quantize(model, scheme, progress=False)
    path = tmp_path / "r.gguf"
    s = export_gguf(qm, tok, path, ftype, tokenizer_pre="gpt-2", progress=False)
    assert len(s.repacked) == 14 and not s.requantized  # every Linear but the tied head
    m2, _ = qk.load(path)
    mine = qm.model.layers[1].self_attn.q_proj.dequantized_weight()
    theirs = m2.model.layers[1].self_attn.q_proj.weight.detach()
    if scheme.endswith("-sym"):
        assert torch.equal(mine, theirs)
    else:  # the offset -s·z is stored in float16 by the GGUF type
        assert float((mine - theirs).abs().max()) <= float(mine.abs().max()) * 2**-10


def test_off_grid_checkpoint_says_it_rounds_again(model, tok, tmp_path):
    qm = qk.quantize(model, "int4-g64", progress=False)
    s = export_gguf(qm, tok, tmp_path / "x.gguf", "Q4_0", tokenizer_pre="gpt-2", progress=False)
    assert not s.repacked and len(s.requantized) == 14
    assert any("dequantized and rounded again" in line for line in s.lines())


def test_tokenizer_fields(model, tok, tmp_path):
    path = tmp_path / "t.gguf"
    export_gguf(model, tok, path, "Q8_0", tokenizer_pre="gpt-2", progress=False)
    r = gguf.GGUFReader(path)
    f = r.fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    assert tokens == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert f["tokenizer.ggml.model"].contents() == "gpt2" and f["tokenizer.ggml.pre"].contents() == "gpt-2"
    types = f["tokenizer.ggml.token_type"].contents()
    assert types[tok.eos_token_id] == int(gguf.TokenType.CONTROL) and types[100] == int(gguf.TokenType.NORMAL)
    assert f["tokenizer.ggml.eos_token_id"].contents() == tok.eos_token_id
    assert f["general.file_type"].contents() == FTYPES["Q8_0"]
    assert f["llama.attention.head_count_kv"].contents() == 2


def test_errors(model, tok, tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=len(tok)))
    with pytest.raises(SourceError, match="does not support model type 't5'; supported: .*gemma2.*llama"):
        export_gguf(t5, tok, tmp_path / "g.gguf")
    with pytest.raises(SchemeError, match="unknown GGUF type"):
        export_gguf(model, tok, tmp_path / "a.gguf", "Q7_0")
    with pytest.raises(SourceError, match="tokenizer"):
        export_gguf(model, None, tmp_path / "a.gguf")
    with pytest.raises(SourceError, match="end in .gguf"):
        export_gguf(model, tok, tmp_path / "a.bin")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_unknown_pre_tokenizer_asks_for_it(model, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tk.train_from_iterator(["abc 123"], trainers.BpeTrainer(vocab_size=260,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t = PreTrainedTokenizerFast(tokenizer_object=tk)
    with pytest.raises(SourceError, match="--tokenizer-pre"):
        export_gguf(model, t, tmp_path / "a.gguf")


def test_mix_rules_follow_llama_cpp():
    n = 32
    assert [i for i in range(n) if more_bits(i, n)][:6] == [0, 1, 2, 3, 6, 9]
    shape = (4096, 4096)
    assert tensor_type("blk.0.attn_v.weight", shape, "Q4_K_M", n, True) == "Q6_K"
    assert tensor_type("blk.4.attn_v.weight", shape, "Q4_K_M", n, True) == "Q4_K"
    assert tensor_type("blk.5.ffn_down.weight", shape, "Q3_K_M", n, True) == "Q4_K"
    assert tensor_type("blk.1.ffn_down.weight", shape, "Q3_K_M", n, True) == "Q5_K"
    assert tensor_type("blk.1.attn_output.weight", shape, "Q3_K_M", n, True) == "Q4_K"
    assert tensor_type("output.weight", shape, "Q4_0", n, True) == "Q6_K"
    assert tensor_type("token_embd.weight", shape, "Q4_0", n, True) == "Q4_0"
    assert tensor_type("token_embd.weight", shape, "Q4_0", n, False) == "Q6_K"  # tied: treated as the head
    assert tensor_type("token_embd.weight", (49152, 576), "Q4_K_M", 30, False) == "Q8_0"
    assert tensor_type("blk.0.ffn_down.weight", (576, 1536), "Q4_K_M", 30, False) == "Q6_K"
    assert tensor_type("blk.3.ffn_up.weight", (1536, 576), "Q4_K_M", 30, False) == "Q5_0"
    assert tensor_type("blk.0.attn_norm.weight", (576,), "Q4_K_M", 30, False) == "F32"
    assert tensor_type("blk.3.ffn_down.weight", shape, "Q4_K_S", n, True) == "Q5_K"  # i < n/8
    assert tensor_type("blk.4.ffn_down.weight", shape, "Q4_K_S", n, True) == "Q4_K"
    assert tensor_type("blk.3.attn_v.weight", shape, "Q4_K_S", n, True) == "Q5_K"  # i < 4
    assert tensor_type("blk.9.attn_v.weight", shape, "Q4_K_S", 80, True, n_gqa=8) == "Q5_K"  # the 70B rule
    assert tensor_type("blk.9.attn_v.weight", shape, "Q4_K_S", 80, True, n_gqa=1) == "Q4_K"


@pytest.mark.model
def test_smollm2_export_tokenizer_matches_the_source_gguf(smol_gguf, tmp_path):
    model, tok = qk.load(smol_gguf)
    assert model.config.gguf_tokenizer_pre == "smollm"
    path = tmp_path / "smol-q8.gguf"
    export_gguf(model, tok, path, "Q8_0", progress=False)
    src, ours = gguf.GGUFReader(smol_gguf).fields, gguf.GGUFReader(path).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
                "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.context_length"):
        assert ours[key].contents() == src[key].contents(), key
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    w = model.model.layers[3].mlp.gate_proj.weight.detach().numpy()
    ref = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).view(np.uint8).reshape(-1)
    assert np.array_equal(np.asarray(tensors["blk.3.ffn_gate.weight"].data).view(np.uint8).reshape(-1), ref)


def test_gptq_solved_onto_the_gguf_grid_is_copied_into_the_file(tok, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.io.gguf import plan_types

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    types = plan_types(model, "Q4_K_M")
    assert types["model.layers.1.self_attn.v_proj"] == "Q6_K" and types["model.layers.0.self_attn.q_proj"] == "Q4_K"
    calib = torch.randint(0, len(tok), (8, 32), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "g.gguf"
    s = qk.export_gguf(model, tok, path, "Q4_K_M", method="gptq", calib=calib, tokenizer_pre="gpt-2",
                       progress=False)
    assert len(s.repacked) == 14 and not s.requantized
    got = _reader_types(path)
    for name, t in types.items():
        layer = name.split(".")[2]
        short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}[name.split(".", 3)[3]]
        assert got[f"blk.{layer}.{short}.weight"] == t
    m2, _ = qk.load(path)
    with torch.no_grad():
        a, b = model(calib[:1]).logits, m2(calib[:1]).logits
    assert float((a - b).abs().max()) < 1.0
    with pytest.raises(SchemeError, match="float file type"):
        qk.export_gguf(model, tok, tmp_path / "f.gguf", "F16", method="gptq", calib=calib, tokenizer_pre="gpt-2")
