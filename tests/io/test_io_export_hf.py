"""GPTQ and compressed-tensors exports (io/export_hf.py): packing against hand-worked words,
every stored tensor unpacked back to quantkit's own dequantized weights (the layouts as their
loaders document them), refusals; and, where the peer is installed, the peer's own loader in
transformers reproducing quantkit's logits."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import quantkit as qk
from quantkit.errors import SchemeError
from quantkit.io.export_hf import export_hf, export_scheme, model_name, pack_int32, unpack_int32

from export_reference import dequant_ct, dequant_gptq  # the layouts' slow readers, shared with the conformance test

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def test_packing_is_lsb_first_by_hand():
    # 8 4-bit codes 1..8 in one word: 0x87654321; along dim 0 the same word per column
    codes = torch.arange(1, 9).reshape(1, 8)
    assert pack_int32(codes, 4, dim=1).tolist() == [[0x87654321 - 2**32]]
    assert pack_int32(codes.t(), 4, dim=0).tolist() == [[0x87654321 - 2**32]]
    assert pack_int32(torch.tensor([[255, 0, 1, 128]]), 8, dim=1).tolist() == [[0x800100FF - 2**32]]
    c = torch.randint(0, 4, (32, 48))
    for dim in (0, 1):
        assert torch.equal(unpack_int32(pack_int32(c, 2, dim), 2, dim), c)


def _autogptq_3bit(col):
    """AutoGPTQ's 3-bit packer for one column of 32 codes, as its loop writes the 3 words: ten
    codes, one split over the word boundary, ten more, another split, ten more."""
    w = [0, 0, 0]
    i = 0
    for j in range(10):
        w[0] |= col[i + j] << (3 * j)
    i += 10
    w[0] |= (col[i] << 30) & 0xFFFFFFFF
    w[1] |= (col[i] >> 2) & 1
    i += 1
    for j in range(10):
        w[1] |= col[i + j] << (3 * j + 1)
    i += 10
    w[1] |= (col[i] << 31) & 0xFFFFFFFF
    w[2] |= (col[i] >> 1) & 3
    i += 1
    for j in range(10):
        w[2] |= col[i + j] << (3 * j + 2)
    return [v - 2**32 if v >= 2**31 else v for v in w]


def test_3bit_packing_is_autogptqs():
    c = torch.randint(0, 8, (64, 5), generator=torch.Generator().manual_seed(0))  # [in, out], packed along in
    words = pack_int32(c, 3, dim=0)
    assert words.shape == (6, 5)
    for o in range(5):
        for blk in range(2):
            assert words[3 * blk:3 * blk + 3, o].tolist() == _autogptq_3bit(c[32 * blk:32 * blk + 32, o].tolist())
    c = torch.randint(0, 8, (64, 96), generator=torch.Generator().manual_seed(1))
    for dim in (0, 1):
        assert torch.equal(unpack_int32(pack_int32(c, 3, dim), 3, dim), c)
    with pytest.raises(SchemeError, match="multiple of 32"):
        pack_int32(torch.zeros(1, 48, dtype=torch.int64), 3, dim=1)


def test_gptq_config_states_what_was_run(tiny, tmp_path):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    runs = [(dict(method="rtn"), False, False),
            (dict(method=qk.GPTQ(act_order=True), calib=calib, sequential=True), True, True),
            (dict(method=qk.GPTQ(act_order=False), calib=calib), False, False)]
    for i, (kw, desc_act, sequential) in enumerate(runs):
        qm = qk.quantize(tiny, "int4-g32-sym", progress=False, **kw)
        export_hf(qm, None, tmp_path / str(i), "gptq")
        for cfg in (json.loads((tmp_path / str(i) / "config.json").read_text())["quantization_config"],
                    json.loads((tmp_path / str(i) / "quantize_config.json").read_text())):
            assert (cfg["desc_act"], cfg["true_sequential"], cfg["sym"]) == (desc_act, sequential, True)


@pytest.mark.parametrize("fmt,scheme", [("gptq", "int4-g32-sym"), ("gptq", "int4-g32-asym"), ("gptq", "int8-sym"),
                                        ("gptq", "int2-g32-asym"), ("gptq", "int3-g32-sym"), ("gptq", "int3-g64-asym"),
                                        ("compressed-tensors", "int4-g32-sym"),
                                        ("compressed-tensors", "int4-g64-asym"), ("compressed-tensors", "int8-sym")])
def test_stored_tensors_dequantize_to_quantkits_weights(tiny, tmp_path, fmt, scheme):
    qm = qk.quantize(tiny, scheme, progress=False)
    s = export_hf(qm, None, tmp_path / "out", fmt)
    t = load_file(str(tmp_path / "out" / "model.safetensors"))
    sc = qk.parse_scheme(scheme)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    for name in qm.quantkit.layers:
        want = qm.get_submodule(name).dequantized_weight()
        if fmt == "gptq":
            got = dequant_gptq(t, name, sc.bits)
        else:
            g = want.shape[1] if sc.group_size < 0 else sc.group_size
            got = dequant_ct(t, name, sc.bits, sc.symmetric, g)
        assert torch.equal(got, want), name
    assert torch.equal(t["model.embed_tokens.weight"].float(), qm.model.embed_tokens.linear.dequantized_weight())
    assert "lm_head.weight" not in t and s.layers == 14
    if fmt == "gptq":
        assert cfg == {"bits": sc.bits, "group_size": sc.group_size if sc.group_size > 0 else -1, "desc_act": False,
                       "sym": sc.symmetric, "true_sequential": False, "checkpoint_format": "gptq", "quant_method": "gptq"}  # rtn
        assert json.loads((tmp_path / "out" / "quantize_config.json").read_text())["bits"] == sc.bits
    else:
        w = cfg["config_groups"]["group_0"]["weights"]
        assert (cfg["format"], w["num_bits"], w["symmetric"], cfg["ignore"]) == ("pack-quantized", sc.bits, sc.symmetric,
                                                                                 ["lm_head"])


def test_refusals(tiny, tmp_path):
    with pytest.raises(SchemeError, match="integer weight-only"):
        export_hf(qk.quantize(tiny, "nf4", progress=False), None, tmp_path / "a", "gptq")
    with pytest.raises(SchemeError, match="4, 8-bit"):
        export_hf(qk.quantize(tiny, "int2-g32", progress=False), None, tmp_path / "b", "compressed-tensors")
    mixed = qk.quantize(tiny, "int4-g32", rules=[qk.Rule("*.down_proj", qk.parse_scheme("int8"))], progress=False)
    with pytest.raises(SchemeError, match="one scheme"):
        export_hf(mixed, None, tmp_path / "c", "gptq")
    with pytest.raises(SchemeError, match="unknown export format"):
        export_hf(qk.quantize(tiny, "int4-g32", progress=False), None, tmp_path / "d", "awq")
    assert not any(p.name in "abcd" for p in tmp_path.iterdir())  # nothing half-written


def test_names(tiny):
    assert export_scheme(tiny) == "int4-g64-sym"  # widths 64 and 128
    assert model_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert model_name("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M"
    from quantkit.io.export_hf import default_folder

    assert default_folder("SmolLM2-135M-Instruct", "gptq", qk.parse_scheme("int4-g128"), 128) == \
        "SmolLM2-135M-Instruct-GPTQ-4bit-128g"


def _float_logits(qm, ids):
    """What the peer computes: quantkit's dequantized weights in a float32 model."""
    from quantkit.train.qlora import dequantized_model

    with torch.no_grad():
        return dequantized_model(qm)(ids).logits


def _peer_logits(path, ids, **kw):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return m(ids).logits


def test_compressed_tensors_loader_reproduces_quantkit(tiny, ids, tmp_path):
    pytest.importorskip("compressed_tensors")
    qm = qk.quantize(tiny, "int4-g32-sym", progress=False)
    export_hf(qm, None, tmp_path / "ct", "compressed-tensors")
    assert torch.allclose(_peer_logits(tmp_path / "ct", ids), _float_logits(qm, ids), atol=1e-5, rtol=0)


def test_gptq_loader_reproduces_quantkit(tiny, ids, tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import GPTQConfig

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "1")  # gptqmodel's torch kernel compiles C++ through inductor otherwise
    for scheme in ("int4-g32-sym", "int4-g32-asym"):
        qm = qk.quantize(tiny, scheme, progress=False)
        export_hf(qm, None, tmp_path / scheme, "gptq")
        want = _float_logits(qm, ids)
        got = _peer_logits(tmp_path / scheme, ids, quantization_config=GPTQConfig(bits=4, backend="gptq_torch"))
        assert torch.allclose(got, want, atol=2e-3, rtol=0), scheme
