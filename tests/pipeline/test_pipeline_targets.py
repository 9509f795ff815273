"""Resolving a config against a model before anything is touched: bare rule names (as
transformers / bitsandbytes match them), rules naming the output head, rules that name nothing,
and models that are already quantized."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import quantkit as qk
from quantkit.errors import QuantkitError, SchemeError
from quantkit.io.checkpoint import expected_weights_bytes, load_checkpoint
from quantkit.nn import QuantEmbedding, QuantLinear
from quantkit.modules import head_modules
from quantkit.pipeline import quantize_model
from quantkit.config import HEAD_CHOICES, Rule, make_config

hf_logging.set_verbosity_error()
VOCAB, H = 256, 64


def make_llama(tied=True, layers=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, intermediate_size=2 * H, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def llama(request):
    return make_llama(request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(m, ids):
    with torch.no_grad():
        return m(ids).logits


def _kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}


# ----------------------------------------------------------------------------- bare names
def test_a_bare_name_keeps_every_layer_ending_in_it(llama):
    q = qk.quantize(llama, "int4-g32", rules=[Rule("down_proj", None)], progress=False)
    downs = [n for n, _ in llama.named_modules() if n.endswith(".down_proj")]
    assert len(downs) == 2
    for n in downs:
        assert type(q.get_submodule(n)) is nn.Linear and n not in q.quantkit.layers
        assert torch.equal(q.get_submodule(n).weight, llama.get_submodule(n).weight)
    assert len(q.quantkit.layers) == 12


def test_suffix_and_parent_names(llama):
    q = qk.quantize(llama, "int4-g32", rules=[Rule("mlp.up_proj", "int8"), Rule("model.layers.1", None)],
                    progress=False)
    assert q.quantkit.layers["model.layers.0.mlp.up_proj"] == "int8"
    assert q.quantkit.layers["model.layers.0.self_attn.q_proj"] == "int4-g32"
    # the parent rule keeps block 1, except its up_proj: the first matching rule wins
    assert [n for n in q.quantkit.layers if n.startswith("model.layers.1.")] == ["model.layers.1.mlp.up_proj"]
    assert type(q.get_submodule("model.layers.1.mlp.down_proj")) is nn.Linear
    assert type(q.get_submodule("model.layers.0.mlp.down_proj")) is QuantLinear


# ----------------------------------------------------------------------------- names that match nothing
@pytest.mark.parametrize("pattern", ["down_prj", "model.layers.7.mlp.down_proj", "*.experts.*", "layers.1.mlp.down"])
def test_a_rule_that_names_nothing_is_refused_listing_the_layers(llama, pattern):
    before = _kinds(llama)
    with pytest.raises(SchemeError) as e:
        qk.quantize(llama, "int4-g32", rules=[Rule("*.q_proj", "int8"), Rule(pattern, None)], inplace=True,
                    progress=False)
    msg = str(e.value)
    assert repr(pattern) in msg and "matches no layer" in msg
    assert "model.layers.*.mlp.down_proj (2)" in msg and "model.layers.*.self_attn.q_proj (2)" in msg
    assert "lm_head" in msg and "\n" not in msg
    assert _kinds(llama) == before and not hasattr(llama, "quantkit")  # nothing was touched, even in place


def test_the_name_list_is_shortened():
    torch.manual_seed(0)
    big = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=12, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=64)).eval()
    with pytest.raises(SchemeError) as e:
        qk.quantize(big, "int8", rules=[Rule("nope", None)], progress=False)
    assert "(12)" in str(e.value) and "layers.11" not in str(e.value) and len(str(e.value)) < 600


def test_expected_size_checks_rules_too(llama):
    with pytest.raises(SchemeError, match="matches no layer"):
        expected_weights_bytes(llama, make_config("int8", rules=[Rule("gate", None)]))


def test_a_plan_for_another_model_is_refused(llama, tmp_path):
    from quantkit.plan import Plan

    plan = Plan({f"model.layers.{b}.mlp.down_proj": "int4-g32" for b in range(4)}, head="bf16")  # a 4-block model
    with pytest.raises(SchemeError) as e:
        qk.quantize(llama, plan.config(), progress=False)
    assert "model.layers.2.mlp.down_proj" in str(e.value) and "model.layers.*.self_attn.k_proj (2)" in str(e.value)
    ok = Plan({f"model.layers.{b}.mlp.down_proj": "int4-g32" for b in range(2)}, head="bf16")
    q = qk.quantize(llama, ok.config(), progress=False)
    assert q.quantkit.layers["model.layers.1.mlp.down_proj"] == "int4-g32"


# ----------------------------------------------------------------------------- rules naming the head
def test_a_rule_can_keep_the_head_in_its_original_precision(llama, ids, tmp_path):
    q = qk.quantize(llama, "int4-g32", head="int8", rules=[Rule("lm_head", None)], progress=False)
    assert q.quantkit.head["scheme"] == "fp32"  # the tiny model is float32
    head = q.get_submodule("lm_head")
    assert torch.equal(head.dequantized_weight(), llama.lm_head.weight)  # stored exactly
    assert isinstance(q.model.embed_tokens, QuantEmbedding)
    qk.save(q, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").stat().st_size == expected_weights_bytes(
        llama, make_config("int4-g32", head="int8", rules=[Rule("lm_head", None)]))
    again, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(_logits(again, ids), _logits(q, ids))


def test_a_rule_can_store_the_head_as_a_head_storage(llama):
    q = qk.quantize(llama, "int4-g32", rules=[Rule("lm_head", "int8")], progress=False)
    assert q.quantkit.head["scheme"] == "int8"


def test_a_rule_giving_the_head_a_layer_scheme_is_refused(llama):
    with pytest.raises(SchemeError, match="names only lm_head, which is stored as bf16, fp16, fp32 or int8"):
        qk.quantize(llama, "int8", rules=[Rule("lm_head", "int4-g32")], progress=False)


# ----------------------------------------------------------------------------- already quantized
@pytest.mark.parametrize("head", HEAD_CHOICES)
def test_head_modules_on_quantized_models(llama, head, tmp_path):
    want = head_modules(llama)
    tied = llama.config.tie_word_embeddings
    assert want == ("model.embed_tokens", "lm_head", tied)
    q = qk.quantize(llama, "int4-g32", head=head, progress=False)
    assert head_modules(q) == want
    qk.save(q, tmp_path / "ck")
    again, _ = load_checkpoint(tmp_path / "ck")
    assert head_modules(again) == want


@pytest.mark.parametrize("source", ["in memory", "checkpoint", "modules only"])
def test_quantizing_a_quantized_model_is_refused(llama, source, tmp_path):
    q = qk.quantize(llama, "int8", progress=False)
    if source == "checkpoint":
        qk.save(q, tmp_path / "ck")
        q, _ = load_checkpoint(tmp_path / "ck")
    elif source == "modules only":
        del q.quantkit  # QuantLinear modules alone say so too
    for call in (lambda: qk.quantize(q, "int4-g32", progress=False),
                 lambda: quantize_model(q, make_config("int4-g32"), progress=False),
                 lambda: expected_weights_bytes(q, make_config("int4"))):
        with pytest.raises(QuantkitError, match=r"already quantized \(scheme int8.*; quantize the float model instead"):
            call()
