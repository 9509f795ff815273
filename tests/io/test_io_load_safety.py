"""Loads that transformers would complete with made-up weights are refused (io/validate.py).

A tensor missing from the weight files, renamed in a GGUF or of the wrong shape; a GGUF that
lacks the metadata saying how big the model is (transformers would build a default 7B Llama);
a model bigger than the memory left; NaN weights; pickle-only weights. Cases that a
regression could turn into a 27 GB allocation run in a child process under an address-space
limit (RLIMIT_AS), so the worst a regression does is fail its own test.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantkit.errors import SourceError
from quantkit.io import validate
from quantkit.io.load import load

gguf = pytest.importorskip("gguf")

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 255]])
LIMIT = 6 << 30  # address space of the child processes below


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _rewrite_weights(folder, edit):
    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------- Hugging Face folders


def test_missing_tensor_is_refused_with_its_name(tiny_llama_dir):
    _rewrite_weights(tiny_llama_dir, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(SourceError, match=r"1 missing \(model\.layers\.1\.mlp\.up_proj\.weight\)"):
        load(tiny_llama_dir)


def test_unexpected_tensor_is_refused_with_its_name(tiny_llama_dir):
    _rewrite_weights(tiny_llama_dir, lambda sd: sd.update({"model.layers.0.extra.weight": torch.zeros(3)}))
    with pytest.raises(SourceError, match=r"1 unexpected \(model\.layers\.0\.extra\.weight\)"):
        load(tiny_llama_dir)


def test_renamed_tensor_names_both_sides(tiny_llama_dir):
    def rename(sd):
        sd["model.layers.0.self_attn.q_projX.weight"] = sd.pop("model.layers.0.self_attn.q_proj.weight")

    _rewrite_weights(tiny_llama_dir, rename)
    with pytest.raises(SourceError) as e:
        load(tiny_llama_dir)
    msg = str(e.value)
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "q_projX" in msg and "random values" in msg
    assert "\n" not in msg


def test_many_missing_tensors_are_counted(tiny_llama_dir):
    def drop(sd):
        for k in [k for k in sd if k.startswith("model.layers.1.")]:
            sd.pop(k)

    _rewrite_weights(tiny_llama_dir, drop)
    with pytest.raises(SourceError, match=r"9 missing \(.* and 6 more\)"):
        load(tiny_llama_dir)


def test_wrong_shape_is_refused(tiny_llama_dir):
    _rewrite_weights(tiny_llama_dir, lambda sd: sd.update({"model.norm.weight": torch.ones(32)}))
    with pytest.raises(SourceError, match=r"wrong shape \(model\.norm\.weight \[32\] in the file, \[64\] in the model"):
        load(tiny_llama_dir)


def test_tied_head_may_be_absent(tmp_path, tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                         tie_word_embeddings=True)).eval()
    model.save_pretrained(tmp_path / "tied")
    assert not any(k.startswith("lm_head") for k in load_file(tmp_path / "tied" / "model.safetensors"))
    m2, _ = load(tmp_path / "tied")
    torch.testing.assert_close(_logits(m2), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_weights_are_refused(tiny_llama_dir, value):
    def poison(sd):
        sd["model.layers.1.post_attention_layernorm.weight"][7] = value

    _rewrite_weights(tiny_llama_dir, poison)
    with pytest.raises(SourceError, match=r"tensor model\.layers\.1\.post_attention_layernorm\.weight holds NaN or Inf"):
        load(tiny_llama_dir)


def test_check_finite_chunks_and_float8():
    t = torch.zeros(100)
    t[97] = float("nan")
    with pytest.raises(SourceError, match="tensor w holds NaN"):
        validate.check_finite([("ok", torch.zeros(5)), ("w", t)], "here", chunk=8)
    f8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    with pytest.raises(SourceError, match="tensor q holds NaN"):
        validate.check_finite([("q", f8)], "here")
    validate.check_finite([("i", torch.arange(4)), ("m", torch.empty(3, device="meta"))], "here")  # not float / meta


def test_broken_tokenizer_json_is_named(tiny_llama_dir):
    (tiny_llama_dir / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(SourceError, match=r"tokenizer\.json is not valid JSON"):
        load(tiny_llama_dir)


def test_model_bigger_than_memory_is_refused(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(validate, "available_memory", lambda: 1000)
    with pytest.raises(SourceError, match=r"needs about .* and this machine has 0\.0 GB available; .*--offload-dir"):
        load(tiny_llama_dir)


def test_memory_need_counts_the_parameters(tiny_llama, tiny_llama_dir, monkeypatch):
    n = sum(p.numel() for p in tiny_llama.parameters())
    seen = {}
    monkeypatch.setattr(validate, "check_fits", lambda params, per, where, hint=None: seen.update(params=params, per=per))
    load(tiny_llama_dir, dtype=torch.bfloat16)
    assert seen == {"params": n, "per": 2}


# ---------------------------------------------------------------- pickle weights


def test_pickle_weights_need_opting_in(tiny_llama, tiny_llama_dir):
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), tiny_llama_dir / "pytorch_model.bin")
    (tiny_llama_dir / "model.safetensors").unlink()
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*convert them to safetensors.*--allow-pickle"):
        load(tiny_llama_dir)
    model, _ = load(tiny_llama_dir, allow_pickle=True)  # weights-only unpickler
    torch.testing.assert_close(_logits(model), _logits(tiny_llama), rtol=0, atol=0)


# ---------------------------------------------------------------- GGUF


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_tokenizer):
    """A float32 GGUF of a tiny random Llama (quantkit's exporter), and that model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkit.io.gguf import export_gguf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tiny_tokenizer),
                                         max_position_embeddings=128, tie_word_embeddings=True)).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf(model, tiny_tokenizer, path, "F32", tokenizer_pre="gpt-2", progress=False)
    return path, model


def rewrite_gguf(src, out, rename=None, drop=(), extra=None, fields=None, skip_fields=(), poison=None):
    """A copy of the GGUF `src` with tensors renamed / dropped / added and metadata replaced."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(out), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k in skip_fields or k in (fields or {}):
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            w.add_key_value(k, f.contents(), f.types[0])
    for k, v in (fields or {}).items():
        w.add_uint32(k, v)
    for t in r.tensors:
        if t.name in drop:
            continue
        data = np.array(t.data)
        if t.name == poison:
            data.reshape(-1)[3] = np.nan
        w.add_tensor((rename or {}).get(t.name, t.name), data, raw_dtype=t.tensor_type)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_clean_gguf_loads(tiny_gguf):
    path, model = tiny_gguf
    m2, _ = load(path)
    ids = torch.tensor([[1, 5, 9, 20, 17]])
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, model(ids).logits)


def test_gguf_renamed_tensor_is_refused_with_its_name(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf[0], tmp_path / "r.gguf", rename={"blk.0.ffn_up.weight": "blk.0.ffn_upx.weight"})
    with pytest.raises(SourceError, match=r"tensors blk\.0\.ffn_upx\.weight are not llama tensors"):
        load(bad)


def test_gguf_dropped_tensor_is_refused(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf[0], tmp_path / "d.gguf", drop={"blk.1.attn_norm.weight"})
    with pytest.raises(SourceError, match=r"1 missing \(model\.layers\.1\.input_layernorm\.weight "
                                          r"\(blk\.1\.attn_norm\.weight\)\)"):
        load(bad)


def test_gguf_block_without_attention_is_refused(tiny_gguf, tmp_path):
    drop = {f"blk.1.attn_{k}.weight" for k in ("q", "k", "v", "output")}
    bad = rewrite_gguf(tiny_gguf[0], tmp_path / "a.gguf", drop=drop)
    with pytest.raises(SourceError, match=r"tensors missing for a llama model of 2 blocks: blk\.1\.attn_\*"):
        load(bad)


def test_gguf_tensor_beyond_block_count_is_refused(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf[0], tmp_path / "b.gguf", extra={"blk.2.attn_norm.weight": np.ones(64, np.float32)})
    with pytest.raises(SourceError, match=r"blk\.2\.attn_norm\.weight lie beyond llama\.block_count = 2"):
        load(bad)


def test_gguf_nan_is_refused(tiny_gguf, tmp_path):
    bad = rewrite_gguf(tiny_gguf[0], tmp_path / "n.gguf", poison="blk.0.ffn_down.weight")
    with pytest.raises(SourceError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight holds NaN"):
        load(bad)


def test_gguf_bigger_than_memory_is_refused(tiny_gguf, monkeypatch):
    monkeypatch.setattr(validate, "available_memory", lambda: 1000)
    with pytest.raises(SourceError, match=r"needs about .* available; a GGUF is dequantized whole.*--offload-dir"):
        load(tiny_gguf[0])


# ---------------------------------------------------------------- under an address-space limit

_CHILD = r"""
import json, resource, sys
from quantkit.errors import SourceError
from quantkit.io.load import load
from quantkit.io.validate import available_memory
out = {"available": available_memory()}
for path in sys.argv[1:]:
    try:
        load(path)
        out[path] = "loaded"
    except SourceError as e:
        out[path] = "SourceError: " + str(e)
    except BaseException as e:
        out[path] = type(e).__name__ + ": " + str(e).splitlines()[0]
print(json.dumps(out))
"""


def _limit():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def test_gguf_without_size_metadata_never_builds_a_default_model(tiny_gguf, tiny_llama_dir, tmp_path):
    """transformers builds a default 7B Llama (27 GB in float32) for these: each must be refused
    from its metadata, before anything is allocated (the child could not allocate it anyway)."""
    bare = tmp_path / "bare.gguf"
    w = gguf.GGUFWriter(str(bare), "llama")
    w.add_name("tiny")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert bare.stat().st_size < 200
    no_width = rewrite_gguf(tiny_gguf[0], tmp_path / "w.gguf", skip_fields={"llama.embedding_length"})
    big_meta = rewrite_gguf(tiny_gguf[0], tmp_path / "m.gguf", fields={"llama.embedding_length": 4096})
    more_blocks = rewrite_gguf(tiny_gguf[0], tmp_path / "k.gguf", fields={"llama.block_count": 32})
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())  # an HF folder whose config says 7B
    cfg.pop("head_dim", None)  # Llama-2-7B's shape: 6.74B parameters
    cfg.update(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)
    (tiny_llama_dir / "config.json").write_text(json.dumps(cfg))
    cases = [bare, no_width, big_meta, more_blocks, tiny_llama_dir]
    r = subprocess.run([sys.executable, "-c", _CHILD, *map(str, cases)], capture_output=True, text=True,
                       timeout=600, preexec_fn=_limit)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < got["available"] < LIMIT  # the limit counts as the memory this process has
    want = {bare: "has no valid llama.block_count", no_width: "has no valid llama.embedding_length",
            big_meta: "llama.embedding_length is 4096", more_blocks: "tensors missing for a llama model of 32 blocks",
            tiny_llama_dir: "needs about 27.0 GB (6.74B parameters x 4 bytes)"}
    for path, fragment in want.items():
        assert got[str(path)].startswith("SourceError: ") and fragment in got[str(path)], (path, got[str(path)])
    assert "--offload-dir" in got[str(tiny_llama_dir)]


@pytest.mark.model
def test_real_smollm2_passes_every_check(smol_gguf):
    from quantkit.io.load import validate_gguf

    assert validate_gguf(smol_gguf) == "llama"
    r = gguf.GGUFReader(smol_gguf)
    fields = {k: r.fields[k].contents() for k in ("llama.block_count", "llama.embedding_length")}
    tensors = [(t.name, tuple(int(d) for d in t.shape), int(t.n_elements)) for t in r.tensors]
    assert fields == {"llama.block_count": 30, "llama.embedding_length": 576}
    assert validate.check_gguf_structure(smol_gguf, "llama", fields, tensors) == 134515008  # SmolLM2-135M, tied
