"""transformers integration (io/hf.py): quantize-on-load equals qk.quantize, save_pretrained /
from_pretrained round trips (both ways with qk.save / qk.load), bitsandbytes-style shortcuts,
and clear refusals."""
from __future__ import annotations

import pytest
import torch

import quantkit as qk
from quantkit.errors import SchemeError

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def _model(tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def float_dir(request, tmp_path_factory):
    m = _model(request.param)
    d = tmp_path_factory.mktemp("float")
    m.save_pretrained(d)
    return m, d


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def _from_pretrained(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), **kw)


@pytest.mark.parametrize("scheme", ["int4-g32", "nf4-dq", "int8", "int3-g32-sym", "fp8-e4m3", "llm-int8"])
def test_quantize_on_load_equals_qk_quantize(float_dir, ids, scheme):
    model, d = float_dir
    hm = _from_pretrained(d, quantization_config=qk.QuantkitConfig(scheme=scheme))
    ref = qk.quantize(model, scheme, progress=False)
    assert hm.quantkit.layers == ref.quantkit.layers and hm.quantkit.head == ref.quantkit.head
    assert torch.equal(_logits(hm, ids), _logits(ref, ids))


@pytest.mark.parametrize("scheme", ["int4-g32", "nf4-dq"])
def test_save_pretrained_reloads_without_a_config_and_with_qk_load(float_dir, ids, scheme, tmp_path):
    model, d = float_dir
    hm = _from_pretrained(d, quantization_config=qk.QuantkitConfig(scheme=scheme, head="int8"))
    want = _logits(hm, ids)
    hm.save_pretrained(tmp_path / "hf")
    again = _from_pretrained(tmp_path / "hf")  # no quantization_config argument
    assert type(again.model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    assert torch.equal(_logits(again, ids), want)
    mine, _ = qk.load(tmp_path / "hf")
    assert torch.equal(_logits(mine, ids), want)
    # and a folder written by qk.save loads through transformers
    qk.save(qk.quantize(model, scheme, head="int8", progress=False), tmp_path / "qk")
    assert torch.equal(_logits(_from_pretrained(tmp_path / "qk"), ids), want)


def test_modules_to_not_convert_and_compute_dtype(float_dir, ids):
    model, d = float_dir
    hm = _from_pretrained(d, quantization_config=qk.QuantkitConfig(
        scheme="int4-g32", modules_to_not_convert=["*.mlp.down_proj"], compute_dtype="bfloat16"))
    assert type(hm.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert hm.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj" not in hm.quantkit.layers and len(hm.quantkit.layers) == 12
    assert torch.isfinite(_logits(hm, ids)).all()


@pytest.mark.parametrize("names", [["down_proj"], ["mlp.down_proj", "lm_head"], ["model.layers.1", "q_proj"]])
def test_modules_to_not_convert_takes_bare_names_as_bitsandbytes_does(float_dir, ids, names):
    """A bare name names every module ending in it, a parent the layers inside it (transformers'
    should_convert_module), and lm_head keeps the output head in its original precision."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    model, d = float_dir
    hm = _from_pretrained(d, quantization_config=qk.QuantkitConfig(scheme="int4-g32", head="int8",
                                                                   modules_to_not_convert=names))
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            kept = not should_convert_module(n, names)
            assert (type(hm.get_submodule(n)).__name__ == "Linear") == kept, n
            assert (n in hm.quantkit.layers) == (not kept), n
    assert hm.quantkit.head["scheme"] == ("fp32" if "lm_head" in names else "int8")
    ref = qk.quantize(model, "int4-g32", head="int8", rules=[qk.Rule(n, None) for n in names], progress=False)
    assert hm.quantkit.layers == ref.quantkit.layers and hm.quantkit.head == ref.quantkit.head
    assert torch.equal(_logits(hm, ids), _logits(ref, ids))


def test_modules_to_not_convert_that_names_nothing_is_refused(float_dir):
    _, d = float_dir
    with pytest.raises(SchemeError) as e:
        _from_pretrained(d, quantization_config=qk.QuantkitConfig(scheme="int4-g32", modules_to_not_convert=["dense_4h"]))
    assert "'dense_4h'" in str(e.value) and "model.layers.*.mlp.down_proj (2)" in str(e.value)


def test_bitsandbytes_keys_mean_what_bitsandbytes_means():
    """bnb's defaults, on purpose: load_in_4bit alone is fp4 without double quantization, and the
    embeddings/head stay in the compute dtype (head "keep")."""
    c = qk.QuantkitConfig(load_in_4bit=True)
    assert (c.scheme, c.head) == ("fp4-b64", "keep")
    assert qk.QuantkitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True).scheme == "nf4-b64-dq"
    c = qk.QuantkitConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16)
    assert c.compute_dtype == "float16"
    assert qk.QuantkitConfig(load_in_8bit=True).scheme == "llm-int8"
    assert qk.QuantkitConfig(load_in_8bit=True, llm_int8_threshold=4.0).scheme == "llm-int8-t4"


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="int5-g7"), "group size"),
    (dict(scheme="int4-g128", method="gptq"), "calibration"),
    (dict(scheme="w8a8-static-mse"), "calibration"),
    (dict(), "needs a scheme"),
    (dict(load_in_4bit=True, load_in_8bit=True), "one of"),
    (dict(load_in_8bit=True, llm_int8_threshold=0.0), "positive outlier threshold"),
    (dict(load_in_8bit=True, llm_int8_has_fp16_weight=True), "llm_int8_has_fp16_weight"),
    (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), "nf4 or fp4"),
    (dict(load_in_4bit=True, bnb_4bit_quant_storage="int4"), "bnb_4bit_quant_storage"),
    (dict(scheme="int4", compute_dtype="int8"), "compute_dtype"),
    (dict(scheme="int4", bogus=1), "unknown arguments"),
])
def test_bad_configs_are_refused_up_front(kwargs, match):
    with pytest.raises(SchemeError, match=match):
        qk.QuantkitConfig(**kwargs)

