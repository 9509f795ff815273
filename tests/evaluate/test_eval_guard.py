"""The guard against silent garbage (evaluate/guard.py): quantkit's float model must give the logits
of the model transformers built, within what its rounded tables explain; when not, one SourceError
that names the first module where the difference appears. Tiny random models, built offline, with
weights scaled up so the logits are peaked."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from quantkit.errors import QuantkitError, SourceError
from quantkit.evaluate import guard
from quantkit.evaluate.guard import check_float_model, check_reference, probe_ids
from quantkit.formats import quantize
from quantkit.nn import QuantEmbedding
from quantkit.pipeline import quantize_model
from quantkit.config import make_config
from quantkit.scheme import parse_scheme

hf_logging.set_verbosity_error()

VOCAB = 256
GEMMAS = ["gemma", "gemma2", "gemma3_text"]  # each scales its word embedding by sqrt(hidden) in a subclass
FLOAT_HEADS = ["bf16", "fp16", "fp32", "keep"]


@functools.lru_cache(maxsize=None)
def tiny(model_type: str = "llama", tied: bool = True):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                               tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5)  # peaked logits: max |logit| ~3 instead of ~0.6
    return model


def held(source, head="bf16"):
    """The float model as quantkit holds it: the fp32 scheme with `head` embeddings/head (a copy)."""
    return quantize_model(source, make_config("fp32", head=head), progress=False)


@pytest.fixture
def drop_embedding_scale(monkeypatch):
    """Break one family's embedding scale on purpose: QuantEmbedding built without Gemma's embed_scale,
    as quantkit did before it kept it."""
    real = QuantEmbedding.__init__

    def init(self, *a, embed_scale=None, **k):
        real(self, *a, **k)

    monkeypatch.setattr(QuantEmbedding, "__init__", init)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- it passes where quantkit is right


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("head", FLOAT_HEADS + ["int8"])
def test_llama_passes_with_every_head(head, tied):
    res = check_reference(tiny("llama", tied), head=head)
    assert res.ok and res.first is None and res.tokens == 16
    assert res.diff_reference <= res.allowance
    assert res.diff_source <= res.explained + res.allowance
    if head in ("fp32", "keep"):
        assert res.diff_reference == 0 and res.explained == 0  # nothing rounded: the same float function
    else:
        # the rounded tables moved the logits, and the held model as much; explained = max|reference - source|
        # is at most max|reference - held| + max|held - source| (triangle inequality, up to float rounding)
        assert 0 < res.explained <= (res.diff_reference + res.diff_source) * (1 + 1e-6)
        assert res.diff_reference < 0.1 * res.explained + res.allowance


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("head", ["bf16", "keep"])
def test_llama_passes_after_save_and_reload(head, tied):
    res = check_reference(tiny("llama", tied), head=head, roundtrip=True)
    assert res.ok


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("head", ["bf16", "fp32", "int8"])
@pytest.mark.parametrize("family", GEMMAS)
def test_gemma_family_passes_when_its_embedding_scale_is_kept(family, head, tied):
    """No false alarm on the scaled embedding (and Gemma 2/3's logit softcapping) once the scale is kept."""
    source = tiny(family, tied)
    res = check_float_model(source, held(source, head))
    assert res.ok and res.head == head


@pytest.mark.parametrize("family", GEMMAS)
def test_quantkit_holds_gemma(family):
    assert check_reference(tiny(family, True), head="bf16", roundtrip=True).ok


def test_a_pipeline_that_drops_the_scale_is_refused_at_the_embedding(drop_embedding_scale):
    with pytest.raises(SourceError, match=r"first differs at model\.embed_tokens \(QuantEmbedding vs "
                                          r"GemmaTextScaledWordEmbedding"):
        check_reference(tiny("gemma", True), head="bf16")


# ---------------------------------------------------------------- it names what breaks


@pytest.mark.parametrize("family", GEMMAS)
def test_a_dropped_embedding_scale_is_named(family):
    """Break one family's embedding scale on purpose: a QuantEmbedding put in without the scale."""
    source = tiny(family, False)
    model = held(source)
    emb = source.get_input_embeddings()
    model.model.embed_tokens = QuantEmbedding(quantize(emb.weight.detach(), parse_scheme("bf16")), emb.padding_idx)
    with pytest.raises(SourceError) as e:
        check_float_model(source, model)
    msg = str(e.value)
    assert f"first differs at model.embed_tokens (QuantEmbedding vs {type(emb).__name__})" in msg
    assert "does not reproduce the source" in msg and "\n" not in msg
    assert isinstance(e.value, QuantkitError)  # the CLI prints one `error:` line and exits 2


def test_a_scaled_embedding_output_is_named_with_the_numbers():
    source = tiny("llama", True)
    model = held(source)
    model.model.embed_tokens.register_forward_hook(lambda m, a, out: out * 2)
    res = check_float_model(source, model, raise_on_error=False)
    assert not res.ok and res.first == "model.embed_tokens"
    assert res.diff_reference > 10 * res.allowance
    with pytest.raises(SourceError, match=r"max \|Δlogit\| [0-9.]+ against the source with its tables rounded to "
                                          r"bf16 .* \(bf16 rounding explains [0-9.e-]+"):
        check_float_model(source, model)


def test_a_broken_middle_layer_is_named():
    source = tiny("llama", False)
    model = held(source)
    norm = model.model.layers[1].post_attention_layernorm
    norm.weight = nn.Parameter(torch.zeros_like(norm.weight))  # a new Parameter: the source keeps its own
    with pytest.raises(SourceError, match=r"first differs at model\.layers\.1\.post_attention_layernorm \(LlamaRMSNorm\)"):
        check_float_model(source, model)
    assert bool(source.model.layers[1].post_attention_layernorm.weight.ne(0).all())


def test_a_broken_reload_is_caught(monkeypatch):
    import quantkit.io.checkpoint as ckpt

    real = ckpt.load_checkpoint

    def reload_wrong(path, dtype=torch.float32):
        model, tok = real(path, dtype=dtype)
        model.model.layers[0].self_attn.o_proj.bias = nn.Parameter(torch.ones(model.config.hidden_size))
        return model, tok

    monkeypatch.setattr(ckpt, "load_checkpoint", reload_wrong)
    with pytest.raises(SourceError, match=r"after save -> load .* first differs at model\.layers\.0\.self_attn\.o_proj"):
        check_reference(tiny("llama", True), head="bf16", roundtrip=True)


def test_different_vocabularies_are_refused():
    source, other = tiny("llama", True), held(tiny("llama", True))
    other.lm_head = nn.Linear(64, VOCAB // 2, bias=False)
    with pytest.raises(SourceError, match="logits of shape"):
        check_float_model(source, other, head="fp32")


# ---------------------------------------------------------------- what it costs and touches


def test_check_reference_shares_the_weights_and_leaves_the_source_alone(monkeypatch):
    source = tiny("llama", True)
    ids = probe_ids(source)
    before = logits(source, ids)
    params = {n: p for n, p in source.named_parameters()}
    seen = {}
    real = guard.check_float_model

    def spy(src, model, *a, **k):
        seen["held"] = model
        return real(src, model, *a, **k)

    monkeypatch.setattr(guard, "check_float_model", spy)
    check_reference(source, head="bf16")
    q = seen["held"].model.layers[0].mlp.down_proj
    assert q.weight.data_ptr() == source.model.layers[0].mlp.down_proj.weight.data_ptr()  # no copy of the body
    assert seen["held"].get_input_embeddings().linear.weight.dtype == torch.bfloat16
    assert dict(source.named_parameters()) == params  # the very same Parameters, tie kept
    assert source.lm_head.weight is source.model.embed_tokens.weight
    assert not hasattr(source, "quantkit")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in source.modules())
    assert torch.equal(logits(source, ids), before)


def test_probe_ids_are_fixed():
    model = tiny("llama", True)
    a, b = probe_ids(model), probe_ids(model)
    assert a.shape == (1, 16) and torch.equal(a, b) and int(a.max()) < VOCAB

    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            class Out:
                input_ids = torch.tensor([[ord(c) % VOCAB for c in text]])
            return Out()

    ids = probe_ids(model, Tok())
    assert ids.tolist()[0] == [ord(c) % VOCAB for c in guard.PROBE_TEXT[:16]]


def test_unknown_head_storage_is_refused():
    with pytest.raises(ValueError, match="guard checks heads"):
        check_reference(tiny("llama", True), head="int4")


# ---------------------------------------------------------------- wired into evaluation


def test_evaluate_model_refuses_a_reference_quantkit_cannot_hold(drop_embedding_scale):
    from quantkit.evaluate.run import evaluate_model

    windows = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    source = tiny("gemma", True)
    qm = quantize_model(source, make_config("int8"), progress=False)
    with pytest.raises(SourceError, match=r"model\.embed_tokens"):
        evaluate_model(qm, None, windows=windows, reference=source, progress=False)
    res = evaluate_model(qm, None, windows=windows, reference=source, progress=False, guard=False)
    assert "kl_divergence" in res
    llama = tiny("llama", True)
    ok = evaluate_model(quantize_model(llama, make_config("int8"), progress=False), None, windows=windows,
                        reference=llama, progress=False)
    assert ok["top1_agreement"] > 0.5


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([guard.PROBE_TEXT] * 4, trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


@pytest.fixture
def saved(tmp_path):
    def save(family):
        folder = tmp_path / family
        tiny(family, True).save_pretrained(folder)
        _tokenizer().save_pretrained(folder)
        return folder
    return save


TEXT = " ".join([guard.PROBE_TEXT] * 20)


def test_compare_stops_before_measuring_on_a_broken_reference(saved, monkeypatch, drop_embedding_scale):
    from quantkit.evaluate import compare as cmp

    monkeypatch.setattr(cmp, "ReferenceCache", lambda *a, **k: pytest.fail("measured on a broken reference"))
    with pytest.raises(SourceError, match=r"first differs at model\.embed_tokens"):
        cmp.compare(str(saved("gemma")), "fp32,int8", text=TEXT, ctx=16, max_tokens=64, speed=False, progress=False)


def test_compare_checks_the_reloaded_fp32_row(saved, monkeypatch):
    import quantkit.io.checkpoint as ckpt
    from quantkit.evaluate import compare as cmp

    real = ckpt.load_checkpoint

    def reload_wrong(path, dtype=torch.float32):
        model, tok = real(path, dtype=dtype)
        if model.quantkit.config.scheme.name == "fp32":
            model.model.norm.weight = nn.Parameter(model.model.norm.weight * 3)
        return model, tok

    res = cmp.compare(str(saved("llama")), "fp32,int8", text=TEXT, ctx=16, max_tokens=64, speed=False, progress=False)
    assert [r["scheme"] for r in res["rows"]] == ["fp32", "int8"]
    assert res["rows"][0]["kl_divergence"] < 1e-6
    monkeypatch.setattr(ckpt, "load_checkpoint", reload_wrong)
    with pytest.raises(SourceError, match=r"the fp32 row \(quantized, saved and reloaded\).* first differs at "
                                          r"model\.norm"):
        cmp.compare(str(saved("llama")), "fp32,int8", text=TEXT, ctx=16, max_tokens=64, speed=False, progress=False)


def test_compare_without_an_fp32_row_checks_a_round_trip(saved, monkeypatch):
    from quantkit.evaluate import compare as cmp

    calls = []
    real = cmp.check_reference
    monkeypatch.setattr(cmp, "check_reference", lambda *a, **k: calls.append(k) or real(*a, **k))
    cmp.compare(str(saved("llama")), "int8,int4-g32", text=TEXT, ctx=16, max_tokens=64, speed=False, progress=False)
    assert [(c["head"], c["roundtrip"]) for c in calls] == [("bf16", True)]


@pytest.mark.model
def test_smollm2_as_quantkit_holds_it_reproduces_the_source(smollm2_path):
    import quantkit as qk

    model, tok = qk.load(smollm2_path)
    for head in ("bf16", "keep"):
        res = check_reference(model, head=head, tokenizer=tok)
        assert res.ok and res.max_logit > 10
