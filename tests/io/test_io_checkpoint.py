"""quantkit's checkpoint: save -> load gives identical logits, exact size estimates, atomic writes."""
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import quantkit as qk
from quantkit.io.atomic import MARKER
from quantkit.errors import QuantkitError, SourceError
from quantkit.io.checkpoint import FORMAT_VERSION, METADATA, WEIGHTS_FILE, expected_weights_bytes, safetensors_bytes
from quantkit.nn import QuantEmbedding, QuantLinear
from quantkit.config import make_config

hf_logging.set_verbosity_error()
VOCAB = 256
SCHEMES = ["fp32", "bf16", "int8", "int4-g32", "int3-g32", "nf4-dq", "fp8-e4m3", "llm-int8"]


def _llama(tied):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        tie_word_embeddings=tied)).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()


@pytest.fixture(scope="module")
def models():
    return {"llama-tied": _llama(True), "llama-untied": _llama(False), "gpt2": _gpt2()}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ["llama-tied", "llama-untied", "gpt2"])
def test_save_load_round_trip_is_exact(models, ids, arch, scheme, tmp_path):
    model = models[arch]
    q = qk.quantize(model, scheme, progress=False)
    out = qk.save(q, tmp_path / "ckpt")
    size = (out / WEIGHTS_FILE).stat().st_size
    # the size estimate from the *original* model, before anything was written, is exact
    assert expected_weights_bytes(model, make_config(scheme)) == size
    m2, tok = qk.load(out)
    assert tok is None
    assert torch.equal(_logits(m2, ids), _logits(q, ids))
    # same modules, same kernels, same stored parts
    for name, mod in q.named_modules():
        if isinstance(mod, QuantLinear):
            other = m2.get_submodule(name)
            assert isinstance(other, QuantLinear) and other.kernel is mod.kernel, name
            a, b = mod.quantized_weight(), other.quantized_weight()
            assert a.scheme == b.scheme and sorted(a.tensors) == sorted(b.tensors)
    assert m2.quantkit.layers == q.quantkit.layers and m2.quantkit.head == q.quantkit.head
    if q.quantkit.head["tied"]:
        assert m2.get_output_embeddings() is m2.get_input_embeddings().linear
    else:
        assert m2.get_output_embeddings() is not m2.get_input_embeddings().linear


@pytest.mark.parametrize("head", ["int8", "fp16", "keep"])
def test_size_estimate_and_round_trip_with_other_heads(models, ids, head, tmp_path):
    model = models["llama-untied"]
    cfg = make_config("int4-g32", head=head)
    q = qk.quantize(model, cfg, progress=False)
    qk.save(q, tmp_path / "c")
    assert expected_weights_bytes(model, cfg) == (tmp_path / "c" / WEIGHTS_FILE).stat().st_size
    m2, _ = qk.load(tmp_path / "c")
    assert torch.equal(_logits(m2, ids), _logits(q, ids))


def test_tied_table_is_stored_once(models, tmp_path):
    from safetensors import safe_open

    qk.save(qk.quantize(models["llama-tied"], "int8", progress=False), tmp_path / "t")
    qk.save(qk.quantize(models["llama-untied"], "int8", progress=False), tmp_path / "u")
    with safe_open(str(tmp_path / "t" / WEIGHTS_FILE), "pt") as f:
        tied = set(f.keys())
    with safe_open(str(tmp_path / "u" / WEIGHTS_FILE), "pt") as f:
        untied = set(f.keys())
        assert f.metadata() == METADATA
    assert "model.embed_tokens.weight" in tied and not any(k.startswith("lm_head") for k in tied)
    assert "lm_head.weight" in untied  # bf16 head of the untied model
    assert "model.layers.0.self_attn.q_proj.qweight" in tied and "model.layers.0.self_attn.q_proj.scale" in tied


def test_config_json_carries_the_quantization_config(models, tmp_path):
    q = qk.quantize(models["gpt2"], "int4-g32", progress=False)
    qk.save(q, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "quantkit" and qc["format_version"] == FORMAT_VERSION == 2
    want = {"scheme": "int4-g32", "method": {"name": "rtn", "options": {}}, "head": "bf16", "rules": [],
            "strict_groups": False, "transforms": []}
    assert {k: qc["config"][k] for k in want} == want
    assert qc["config"] == q.quantkit.config.to_dict()
    assert qc["layers"] == q.quantkit.layers and qc["head"]["tied"] is True
    assert cfg["model_type"] == "gpt2"


# ----------------------------------------------------------------------------- safetensors size
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32, torch.int64,
           torch.float64, torch.int16, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def _safetensors_cases(test):
    """Property test over random tensor specs (names, dtypes, shapes incl. empty ones), with or
    without metadata."""
    specs = st.dictionaries(st.text(alphabet="abcxyz._0123456789", min_size=1, max_size=12),
                            st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3)),
                            min_size=1, max_size=6)
    return settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])(
        given(specs=specs, with_meta=st.booleans())(test))


def _tensor(dtype, shape):
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=torch.bool)
    return torch.zeros(shape).to(dtype)


@_safetensors_cases
def test_safetensors_bytes_matches_save_file(tmp_path, specs, with_meta):
    tensors = {k: _tensor(dt, tuple(shape)) for k, (dt, shape) in specs.items()}
    meta = {"format": "quantkit", "format_version": "1", "note": "x" * len(specs)} if with_meta else None
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata=meta)
    est = safetensors_bytes({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, meta)
    assert est == path.stat().st_size


@_safetensors_cases
def test_safetensors_header_matches_save_file(tmp_path, specs, with_meta):
    from quantkit.io.checkpoint import _safetensors_header

    tensors = {k: _tensor(dt, tuple(shape)) for k, (dt, shape) in specs.items()}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata=METADATA if with_meta else None)
    header, _ = _safetensors_header({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()},
                                    METADATA if with_meta else None)
    data = path.read_bytes()
    assert int.from_bytes(data[:8], "little") == len(header) and data[8:8 + len(header)] == header


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("arch", ["llama-tied", "llama-untied", "gpt2"])
def test_save_writes_what_safetensors_writes(models, arch, scheme, tmp_path):
    """save() unpacks one module at a time (not the whole model at once); the file is byte for
    byte the one safetensors' save_file makes from every tensor together."""
    from quantkit.io.checkpoint import checkpoint_tensors

    q = qk.quantize(models[arch], scheme, progress=False)
    out = qk.save(q, tmp_path / "ckpt")
    save_file(checkpoint_tensors(q), str(tmp_path / "ref.safetensors"), metadata=METADATA)
    assert (out / WEIGHTS_FILE).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", WEIGHTS_FILE]  # no spill file left


# ----------------------------------------------------------------------------- failures
def test_save_replaces_an_existing_folder_only_on_success(models, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    q = qk.quantize(models["llama-tied"], "int8", progress=False)
    qk.save(q, out)
    (out / "old.txt").write_text("previous contents")
    before = sorted(p.name for p in out.iterdir())

    import quantkit.io.checkpoint as ckpt

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "_write_weights", boom)  # the weights' writer fails half way
    with pytest.raises(RuntimeError, match="disk full"):
        qk.save(q, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    assert sorted(p.name for p in out.iterdir()) == before
    monkeypatch.undo()

    qk.save(q, out)  # a previous quantkit checkpoint: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", WEIGHTS_FILE]


def test_save_refuses_a_folder_quantkit_did_not_write(models, tmp_path):
    from quantkit.errors import OutputError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    q = qk.quantize(models["llama-tied"], "int8", progress=False)
    with pytest.raises(OutputError, match="--overwrite"):
        qk.save(q, out)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    qk.save(q, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "config.json", WEIGHTS_FILE]


def test_save_never_writes_over_the_source(models, tmp_path):
    from quantkit.errors import OutputError

    q = qk.quantize(models["llama-tied"], "int8", progress=False)
    src = qk.save(q, tmp_path / "src")
    model, _ = qk.load(src)
    with pytest.raises(OutputError, match="source model"):
        qk.save(model, src, overwrite=True)


def test_truncated_weights_are_refused(models, tmp_path):
    q = qk.quantize(models["llama-tied"], "int4-g32", progress=False)
    out = qk.save(q, tmp_path / "c")
    path = out / WEIGHTS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(SourceError, match="truncated"):
        qk.load(out)
    path.write_bytes(data[:5])  # not even a header
    with pytest.raises(SourceError, match="not a valid safetensors file"):
        qk.load(out)
    path.unlink()
    with pytest.raises(SourceError, match="missing model.safetensors"):
        qk.load(out)


def test_saving_an_unquantized_model_is_refused(models, tmp_path):
    with pytest.raises(QuantkitError, match="not quantized by quantkit"):
        qk.save(models["llama-tied"], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_newer_format_version_is_refused(models, tmp_path):
    out = qk.save(qk.quantize(models["gpt2"], "int8", progress=False), tmp_path / "c")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="newer quantkit"):
        qk.load(out)


def test_tokenizer_is_saved_and_reloaded(models, tmp_path):
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(tmodels.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"],
                           trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    out = qk.save(qk.quantize(models["llama-tied"], "int8", progress=False), tmp_path / "c", tok)
    _, tok2 = qk.load(out)
    assert tok2 is not None
    assert tok2("the lazy fox").input_ids == tok("the lazy fox").input_ids
    assert expected_weights_bytes(models["llama-tied"], make_config("int8")) == os.path.getsize(out / WEIGHTS_FILE)
