"""The seed users' own keys (io/hf_config.py): their BitsAndBytesConfig / GPTQConfig code,
translated key for key, runs through from_pretrained and gives the same model as the
equivalent quantkit scheme; bnb keys passed straight to QuantkitConfig mean the same."""
from __future__ import annotations

import logging

import pytest
import torch
from tiny_tokenizer import make_tiny_tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTQConfig

import quantkit as qk
from quantkit.errors import SchemeError

TEXT = "The quick brown fox jumps over the lazy dog near the river bank. " * 60


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("float")
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    return d


def _logits(m):
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return m(ids).logits


def _same(a, b):
    assert a.quantkit.layers == b.quantkit.layers and a.quantkit.head == b.quantkit.head
    assert a.quantkit.config.to_dict() == b.quantkit.config.to_dict()
    assert torch.equal(_logits(a), _logits(b))


SEED_BNB = [
    (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
          bnb_4bit_compute_dtype=torch.bfloat16), "nf4-b64-dq", torch.bfloat16),
    (dict(load_in_8bit=True, llm_int8_threshold=5.0, llm_int8_skip_modules=["lm_head"]), "llm-int8-t5", torch.float32),
    (dict(load_in_4bit=True), "fp4-b64", torch.float32),  # bnb's own 4-bit default
]


@pytest.mark.parametrize("keys,scheme,dtype", SEED_BNB, ids=["nf4-dq-bf16", "int8-t5-skip-head", "4bit-default"])
@pytest.mark.parametrize("how", ["from_bnb", "keys"])
def test_bitsandbytes_seed_code_gives_the_equivalent_quantkit_model(float_dir, keys, scheme, dtype, how):
    config = qk.QuantkitConfig.from_bnb(BitsAndBytesConfig(**keys)) if how == "from_bnb" else qk.QuantkitConfig(**keys)
    got = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    want = qk.quantize(AutoModelForCausalLM.from_pretrained(float_dir, dtype=dtype), scheme, head="keep",
                       rules=[qk.Rule("lm_head", None)] if "llm_int8_skip_modules" in keys else (), progress=False)
    assert got.dtype == dtype and got.lm_head.weight.dtype == dtype  # the head stays in the compute dtype, as bnb keeps it
    _same(got, want)


def test_gptq_seed_code_gives_the_equivalent_quantkit_model(float_dir):
    text_file = float_dir / "calib.txt"
    text_file.write_text(TEXT)
    seed = GPTQConfig(bits=4, group_size=32, desc_act=False)  # the seed code's GPTQConfig, with a width this model has
    config = qk.QuantkitConfig.from_gptq(seed, dataset=str(text_file), calib_samples=4, calib_len=32)
    got = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config)
    want = qk.quantize(AutoModelForCausalLM.from_pretrained(float_dir), "int4-g32-sym",  # GPTQConfig's defaults:
                       method=qk.GPTQ(damp=0.1, act_order=True, static_groups=True), sequential=True,  # act_group_aware
                       calib=qk.text(str(text_file), "calib"), tokenizer=make_tiny_tokenizer(),
                       calib_samples=4, calib_len=32, progress=False)
    assert set(got.quantkit.methods.values()) == {"gptq"}
    _same(got, want)


def test_gptq_fields_translate_one_by_one():
    c = qk.QuantkitConfig.from_gptq(GPTQConfig(bits=3, group_size=-1, sym=False, desc_act=True, damp_percent=0.05,
                                               true_sequential=False, dataset=["some text"], model_seqlen=64))
    assert c.scheme == "int3" and c.sequential is False and c.calib_len == 64 and c.dataset == ["some text"]
    assert c.method_options == {"damp": 0.05, "act_order": True, "static_groups": False}
    c = qk.QuantkitConfig.from_gptq(GPTQConfig(bits=4, dataset=["x"]))  # act_group_aware: on by default
    assert c.scheme == "int4-g128-sym" and c.method_options == {"damp": 0.1, "act_order": True, "static_groups": True}
    cfg = c.quant_config()
    assert (cfg.method.damp, cfg.method.act_order, cfg.method.static_groups, cfg.sequential) == (0.1, True, True, True)
    c = qk.QuantkitConfig.from_gptq(GPTQConfig(bits=4, dataset=["x"], act_group_aware=False))
    assert c.method_options == {"damp": 0.1, "act_order": False, "static_groups": False}


@pytest.mark.parametrize("make,match", [
    (lambda: qk.QuantkitConfig.from_gptq(GPTQConfig(bits=4)), "needs calibration data"),
    (lambda: qk.QuantkitConfig.from_gptq(GPTQConfig(bits=4, dataset="c4")), "would be downloaded"),
    (lambda: qk.QuantkitConfig.from_gptq({"bits": 4, "dataset": ["x"], "modules_in_block_to_quantize": [["q_proj"]]}),
     "modules_in_block_to_quantize"),
    (lambda: qk.QuantkitConfig.from_gptq({"bits": 4, "dataset": ["x"], "block_name_to_quantize": "model.layers"}),
     "block_name_to_quantize"),
    (lambda: qk.QuantkitConfig.from_bnb(BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True)),
     "llm_int8_has_fp16_weight"),
])
def test_fields_quantkit_cannot_honour_are_refused_by_name(make, match):
    with pytest.raises(SchemeError, match=match):
        make()


def test_keys_that_change_nothing_here_say_so(caplog):
    with caplog.at_level(logging.INFO, logger="quantkit"):
        qk.QuantkitConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
        qk.QuantkitConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16)
    assert "changes nothing here" in caplog.text and "container dtype" in caplog.text


def test_a_skip_list_without_the_head_quantizes_the_head_as_bnb_would(caplog):
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        c = qk.QuantkitConfig(load_in_8bit=True, llm_int8_skip_modules=["down_proj"])
    assert c.head == "int8" and c.modules_to_not_convert == ["down_proj"] and "does not name lm_head" in caplog.text
