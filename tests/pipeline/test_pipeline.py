"""`quantkit.quantize` on tiny random models: swaps, copies, tied heads, fallbacks, rules, errors."""
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

import quantkit as qk
from quantkit.algorithms import METHODS
from quantkit.errors import SchemeError
from quantkit.nn import QuantEmbedding, QuantLinear
from quantkit.config import Rule
from quantkit.scheme import parse_scheme

hf_logging.set_verbosity_error()
VOCAB = 256


def make_llama(tied=True, hidden=96, heads=4, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                      tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def llama():
    return make_llama(tied=True)


@pytest.fixture(scope="module")
def llama_untied():
    return make_llama(tied=False)


@pytest.fixture(scope="module")
def gpt2():
    return make_gpt2()


MODELS = ["llama", "llama_untied", "gpt2"]


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _linear_names(model):
    """Names of nn.Linear / Conv1D modules, found independently of quantkit's own helper."""
    return {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", MODELS)
def test_int8_swaps_every_linear_and_leaves_the_original_untouched(name, request, ids):
    model = request.getfixturevalue(name)
    before = _snapshot(model)
    linears = _linear_names(model)
    assert linears, "the tiny model has Linear/Conv1D layers"
    q = qk.quantize(model, "int8", progress=False)
    assert q is not model
    # none left: every Linear / Conv1D became a QuantLinear (the head included)
    assert not _linear_names(q)
    for n in linears:
        assert isinstance(q.get_submodule(n), QuantLinear), n
    head_name = "lm_head"
    assert set(q.quantkit.layers) == linears - {head_name}
    assert set(q.quantkit.layers.values()) == {"int8"} and set(q.quantkit.methods.values()) == {"rtn"}
    assert isinstance(q.get_input_embeddings(), QuantEmbedding)
    # inplace=False: the original still has its float modules and the very same weights
    assert _linear_names(model) == linears and not hasattr(model, "quantkit")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    # int8 per channel + bf16 embeddings/head + bf16 activations: about 1% of the logits
    assert _rel(got, ref) < 5e-2
    assert not torch.equal(got, ref)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_tied_head_stays_tied(name, request):
    model = request.getfixturevalue(name)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    q = qk.quantize(model, "int4-g32", progress=False)
    emb = q.get_input_embeddings()
    assert isinstance(emb, QuantEmbedding)
    assert q.lm_head is emb.linear  # one table, two uses
    assert q.quantkit.head["tied"] is True
    assert q.quantkit.head["embedding"] == {"llama": "model.embed_tokens", "gpt2": "transformer.wte"}[name]


def test_untied_head_is_its_own_module(llama_untied):
    q = qk.quantize(llama_untied, "int8", progress=False)
    assert isinstance(q.lm_head, QuantLinear) and q.lm_head is not q.model.embed_tokens.linear
    assert q.quantkit.head["tied"] is False
    w = llama_untied.lm_head.weight.detach()
    torch.testing.assert_close(q.lm_head.dequantized_weight(), w.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_head_storage_default_bf16_and_int8(name, request, ids):
    model = request.getfixturevalue(name)
    table = model.get_input_embeddings().weight.detach()
    q16 = qk.quantize(model, "int8", progress=False)
    q8 = qk.quantize(model, "int8", head="int8", progress=False)
    e16, e8 = q16.get_input_embeddings(), q8.get_input_embeddings()
    assert q16.quantkit.head["scheme"] == "bf16" and e16.scheme.name == "bf16"
    w16 = e16.linear.buffers_dict()["weight"]  # the kernel's layout (made on first use)
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, table.to(torch.bfloat16))
    assert q8.quantkit.head["scheme"] == "int8" and e8.scheme.name == "int8"
    assert e8.linear.quantized_weight().tensors["qweight"].dtype == torch.int8
    held = e8.linear.buffers_dict()  # whichever kernel holds it: int8 codes, no float copy of the table
    assert all(t.dtype != torch.float32 or t.numel() < table.numel() for t in held.values())
    # int8 rows: |error| <= absmax/254 per element
    rows = e8(torch.arange(VOCAB))
    assert bool(((rows - table).abs().amax(1) <= table.abs().amax(1) / 254 * 1.001).all())
    assert q8.get_output_embeddings().scheme.name == "int8"
    with torch.no_grad():
        ref = model(ids).logits
        assert _rel(q8(ids).logits, ref) < 5e-2


def test_fp32_scheme_keeps_the_model_exact(llama, ids):
    q = qk.quantize(llama, "fp32", progress=False)
    assert q.quantkit.head["scheme"] == "fp32"
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers_are_quantized_with_transposed_weights(gpt2):
    q = qk.quantize(gpt2, "int8", progress=False)
    for n in ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"):
        conv, ql = gpt2.get_submodule(n), q.get_submodule(n)
        assert isinstance(conv, Conv1D) and isinstance(ql, QuantLinear)
        assert (ql.out_features, ql.in_features) == (conv.nf, conv.weight.shape[0])
        w = conv.weight.detach().t()  # Conv1D stores [in, out]
        # int8 symmetric per channel: every element within half a step of the original
        err = (ql.dequantized_weight() - w).abs().amax(1)
        assert bool((err <= w.abs().amax(1) / 254 * 1.001).all())
        x = torch.randn(2, 3, conv.weight.shape[0], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert _rel(ql(x), conv(x)) < 2e-2  # bias included


# ----------------------------------------------------------------------------- groups
def test_group_fallback_is_recorded(llama):
    q = qk.quantize(llama, "int4-g64", progress=False)
    # hidden 96: q/k/v/o/gate/up (input width 96) fall back to g32; down_proj (width 192) keeps g64
    assert q.quantkit.fallbacks == {"int4-g64 -> int4-g32 (input width 96)": 12}
    assert q.quantkit.layers["model.layers.0.self_attn.q_proj"] == "int4-g32"
    assert q.quantkit.layers["model.layers.1.mlp.up_proj"] == "int4-g32"
    assert q.quantkit.layers["model.layers.0.mlp.down_proj"] == "int4-g64"
    ql = q.get_submodule("model.layers.0.self_attn.q_proj")
    assert ql.scheme.group_size == 32 and ql.quantized_weight().tensors["scale"].shape == (96, 3)
    assert q.quantkit.config.scheme.name == "int4-g64"  # the request is kept as asked


def test_strict_groups_refuses_instead(llama):
    with pytest.raises(SchemeError, match=r"model\.layers\.0\.self_attn\.q_proj: group size 64 does not divide"):
        qk.quantize(llama, "int4-g64", strict_groups=True, progress=False)


def test_no_fitting_group_raises_with_the_layer_name():
    model = make_llama(hidden=100, heads=5, kv_heads=5)
    with pytest.raises(SchemeError, match=r"model\.layers\.0\.self_attn\.q_proj: no group size of 32 or more divides "
                                          r"its input width 100") as e:
        qk.quantize(model, "int4-g128", inplace=True, progress=False)
    assert "int4" in str(e.value)
    # every layer is validated before any is touched: inplace=True left the model as it was
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


# ----------------------------------------------------------------------------- rules and methods
def test_rule_none_keeps_mlp_layers_in_float(llama):
    q = qk.quantize(llama, "int4-g32", rules=[Rule("*mlp*", None)], progress=False)
    for n, m in llama.named_modules():
        if isinstance(m, nn.Linear) and n != "lm_head":
            got = q.get_submodule(n)
            if ".mlp." in n:
                assert type(got) is nn.Linear and torch.equal(got.weight, m.weight), n
                assert n not in q.quantkit.layers
            else:
                assert isinstance(got, QuantLinear) and q.quantkit.layers[n] == "int4-g32", n


def test_rules_first_match_wins(llama):
    rules = [Rule("*.down_proj", parse_scheme("int8")), Rule("*mlp*", parse_scheme("int3-g32")),
             Rule("*.down_proj", None)]
    q = qk.quantize(llama, "int4-g32", rules=rules, progress=False)
    layers = q.quantkit.layers
    assert layers["model.layers.0.mlp.down_proj"] == "int8"
    assert layers["model.layers.1.mlp.gate_proj"] == "int3-g32"
    assert layers["model.layers.1.self_attn.v_proj"] == "int4-g32"
    assert q.quantkit.config.rules == tuple(rules)


def test_llm_int8_method_builds_llm_int8_layers(llama, ids):
    q = qk.quantize(llama, "llm-int8", progress=False)
    assert q.quantkit.config.method.name == "llm-int8" and set(q.quantkit.methods.values()) == {"llm-int8"}
    assert all(m.run_stats is not None for n, m in q.named_modules()
               if isinstance(m, QuantLinear) and n in q.quantkit.layers)
    with torch.no_grad():
        assert _rel(q(ids).logits, llama(ids).logits) < 5e-2


def test_llm_int8_method_with_int4_scheme_is_refused(llama):
    with pytest.raises(SchemeError, match="method llm-int8 stores scheme llm-int8, not int4"):
        qk.quantize(llama, "int4", method="llm-int8", progress=False)
    with pytest.raises(SchemeError, match="method llm-int8 cannot produce scheme int4-g32"):
        qk.quantize(llama, "int8", rules=[Rule("*mlp*", parse_scheme("int4-g32"), "llm-int8")], progress=False)


def test_unknown_method_lists_the_valid_ones(llama):
    with pytest.raises(SchemeError, match=r"unknown method 'gptq-magic'; valid: .*llm-int8.*rtn") as e:
        qk.quantize(llama, "int4-g32", method="gptq-magic", progress=False)
    assert all(name in str(e.value) for name in METHODS)


def test_bad_head_storage_is_refused(llama):
    with pytest.raises(SchemeError, match="invalid head storage 'int4'"):
        qk.quantize(llama, "int8", head="int4", progress=False)
