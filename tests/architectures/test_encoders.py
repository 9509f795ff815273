"""Encoders: a BERT-style model quantized to int8 saves, reloads as the very class it was (not
a causal-LM head built around it), and keeps its mean-pooled embeddings close to fp32's.
Tiny random models built offline; the weights are scaled up so that int4 visibly hurts and
the int8 bound means something."""
import pytest
import torch
from tiny_models import ENCODER_BASE, ENCODER_DECODERS, ENCODERS, tiny_encoder
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

import quantkit as qk
from quantkit.nn import QuantEmbedding

TINY = ENCODER_BASE


def _encoder(model_type, auto, **kw):
    return tiny_encoder(model_type, auto, **kw)


def _pooled(m, ids):
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = m(input_ids=ids, attention_mask=mask).last_hidden_state if not hasattr(m, "lm_head") and not hasattr(m, "cls") \
            else m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


@pytest.mark.parametrize("model_type", ENCODERS)
@pytest.mark.parametrize("auto", [AutoModel, AutoModelForMaskedLM], ids=["bare", "masked-lm"])
def test_int8_encoder_reloads_as_its_class_with_embeddings_close_to_fp32(model_type, auto, tmp_path):
    m = _encoder(model_type, auto)
    ids = torch.randint(3, TINY["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(1))
    ref = _pooled(m, ids)
    cos = {}
    for scheme in ("int8", "int4-g32"):
        q = qk.quantize(m, scheme, progress=False)
        qk.save(q, tmp_path / scheme)
        back, _ = qk.load(tmp_path / scheme)
        assert type(back) is type(m)  # BertModel stays BertModel, BertForMaskedLM keeps its head
        got = _pooled(back, ids)
        assert torch.equal(got, _pooled(q, ids))  # the reload computes what the quantized model computed
        cos[scheme] = _cos(got, ref)
    assert cos["int8"] >= 0.99
    assert 1 - cos["int4-g32"] > 3 * (1 - cos["int8"])  # int4 visibly hurts: the int8 bound is not trivially met


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_gptq_runs_on_the_blocks_found_and_the_guard_passes(model_type):
    from quantkit.evaluate.guard import check_reference

    m = _encoder(model_type, AutoModel)
    ids = torch.randint(3, TINY["vocab_size"], (4, 24), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(3, TINY["vocab_size"], (16, 32), generator=torch.Generator().manual_seed(2))
    ref = _pooled(m, ids)
    rtn = qk.quantize(m, "int4-g32", progress=False)
    gptq = qk.quantize(m, "int4-g32", method="gptq", calib=calib, progress=False)
    methods = gptq.quantkit.methods
    assert {v for n, v in methods.items() if n.startswith("encoder.layer.")} == {"gptq"}  # the blocks found
    assert {v for n, v in methods.items() if not n.startswith("encoder.layer.")} <= {"rtn"}  # the pooler, outside them
    assert _cos(_pooled(gptq, ids), ref) > _cos(_pooled(rtn, ids), ref)
    assert check_reference(m, head="bf16", ids=ids[:1, :16]).ok


@pytest.mark.parametrize("model_type", ENCODER_DECODERS)
def test_encoder_decoders_are_refused_by_calibrated_methods_by_name(model_type):
    from quantkit.errors import SourceError

    cfg = AutoConfig.for_model(model_type, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256)
    m = AutoModel.from_config(cfg)
    with pytest.raises(SourceError, match="one stack of blocks.*rtn"):
        qk.quantize(m, "int4-g32", method="gptq", calib=torch.randint(0, 256, (2, 8)), progress=False)


@pytest.mark.parametrize("auto", ["T5Model", "T5ForConditionalGeneration"])
def test_encoder_decoder_tables_stay_one_quantized_table(auto, tmp_path):
    """T5 ties encoder.embed_tokens and decoder.embed_tokens (and, with a head, lm_head) to
    `shared`: all of them must be the one quantized table, in memory and after reload (before,
    the encoder and decoder kept running on a float copy, and the reload was refused)."""
    import transformers

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("t5", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256)
    m = getattr(transformers, auto)(cfg).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    dec = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))

    def run(model):
        with torch.no_grad():
            o = model(input_ids=ids, decoder_input_ids=dec)
            return o.logits if hasattr(o, "logits") else o.last_hidden_state

    ref = run(m)
    q = qk.quantize(m, "int8", head="int8", progress=False)
    qk.save(q, tmp_path / "ck")
    back, _ = qk.load(tmp_path / "ck")
    assert type(back) is type(m)
    for model in (q, back):
        assert model.encoder.embed_tokens is model.shared and model.decoder.embed_tokens is model.shared
        assert isinstance(model.shared, QuantEmbedding) and model.shared.scheme.name == "int8"
    assert torch.equal(run(back), run(q))
    assert _cos(run(back).flatten(1), ref.flatten(1)) >= 0.99


def test_compare_measures_an_encoder_on_its_hidden_states(tmp_path):
    """`compare` on an encoder (any folder a user points it at) reports the mean-pooled
    embedding cosine and hidden NMSE against fp32, and says so; no perplexity, no generation."""
    from tiny_tokenizer import make_tiny_tokenizer

    from quantkit.evaluate.compare import compare

    m = _encoder("bert", AutoModel, vocab_size=300)  # the tokenizer's vocabulary
    m.save_pretrained(tmp_path / "bert")
    make_tiny_tokenizer().save_pretrained(tmp_path / "bert")
    text = "the quick brown fox jumps over the lazy dog. " * 120
    res = compare(str(tmp_path / "bert"), "fp32,int8,int4-g32", text=text, ctx=48, speed=False, progress=False)
    rows = {r["scheme"]: r for r in res["rows"]}
    assert res["meta"]["measure"].startswith("hidden-state similarity") and res["generations"] == {}
    assert rows["fp32"]["embedding_cosine"] == pytest.approx(1.0, abs=1e-6) and rows["fp32"]["hidden_nmse"] < 1e-10
    assert rows["int8"]["embedding_cosine_min"] >= 0.99 and "perplexity" not in rows["int8"]
    assert rows["int4-g32"]["hidden_nmse"] > 3 * rows["int8"]["hidden_nmse"]
