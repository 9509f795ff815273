"""--offload-dir: a float folder expanded from one source is never reused for another."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from quantkit.errors import SourceError
from quantkit.io import offload
from quantkit.io.offload import FINGERPRINT, float_folder, source_fingerprint

pytest.importorskip("gguf")


def _tiny(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=289,
                                        max_position_embeddings=128, tie_word_embeddings=True)).eval()


@pytest.fixture(scope="module")
def two_ggufs(tmp_path_factory, tiny_tokenizer):
    """Two different tiny models as float32 GGUF files (sources streaming must expand first)."""
    from quantkit.io.gguf import export_gguf

    folder = tmp_path_factory.mktemp("two")
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        model = _tiny(seed)
        export_gguf(model, tiny_tokenizer, folder / f"{name}.gguf", "F32", tokenizer_pre="gpt-2", progress=False)
        out[name] = (folder / f"{name}.gguf", model)
    return out


def _embedding(folder):
    return load_file(folder / "model.safetensors")["model.embed_tokens.weight"]


def test_a_folder_from_another_model_is_expanded_again(two_ggufs, tmp_path, monkeypatch):
    (a, ma), (b, mb) = two_ggufs["a"], two_ggufs["b"]
    off = tmp_path / "off"
    folder = float_folder(a, off)
    assert torch.equal(_embedding(folder), ma.model.embed_tokens.weight)
    assert json.loads((folder / FINGERPRINT).read_text()) == source_fingerprint(a, "float32")

    expansions = []
    real = offload._expand_to_folder
    monkeypatch.setattr(offload, "_expand_to_folder",
                        lambda *args, **kw: (expansions.append(args[0]), real(*args, **kw)))
    assert float_folder(a, off) == folder and expansions == []  # same source: reused as it is
    assert float_folder(b, off) == folder and expansions == [str(b)]  # another model: expanded again
    assert torch.equal(_embedding(folder), mb.model.embed_tokens.weight)
    assert not torch.equal(ma.model.embed_tokens.weight, mb.model.embed_tokens.weight)
    assert sorted(p.name for p in off.iterdir()) == ["float"]  # only that folder was replaced


def test_fingerprint_sees_a_changed_file_with_the_same_size_and_mtime(two_ggufs, tmp_path):
    a, b = two_ggufs["a"][0], two_ggufs["b"][0]
    src = tmp_path / "m.gguf"
    src.write_bytes(a.read_bytes())
    st = src.stat()
    before = source_fingerprint(src, "float32")
    src.write_bytes(b.read_bytes())  # another model in the same place (same size: same shapes)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = source_fingerprint(src, "float32")
    assert before["files"][0]["size"] == after["files"][0]["size"]
    assert before["files"][0]["mtime_ns"] == after["files"][0]["mtime_ns"]
    assert before != after and before["path"] == after["path"] == str(src.resolve())
    assert source_fingerprint(src, "bfloat16") != after  # another dtype is another float folder


def test_fingerprint_of_a_folder_lists_its_weight_files(tiny_llama_dir):
    fp = source_fingerprint(tiny_llama_dir, "float32")
    names = [f["name"] for f in fp["files"]]
    assert names == ["model.safetensors", "config.json"] and fp["kind"] == "hf_dir"
    assert fp["files"][0]["size"] == (tiny_llama_dir / "model.safetensors").stat().st_size


@pytest.mark.parametrize("what", ["folder", "file"])
def test_a_float_folder_quantkit_did_not_write_is_refused(two_ggufs, tmp_path, what):
    off = tmp_path / "off"
    (off / "float").mkdir(parents=True)
    mine = off / "float" / ("config.json" if what == "folder" else "notes.txt")
    mine.write_text("{}")
    with pytest.raises(SourceError, match=r"float exists but was not written by quantkit.*another --offload-dir"):
        float_folder(two_ggufs["a"][0], off)
    assert mine.read_text() == "{}"  # untouched


def test_pickle_only_source_is_refused_before_expanding(tiny_llama_dir, tmp_path):
    torch.save(load_file(tiny_llama_dir / "model.safetensors"), tiny_llama_dir / "pytorch_model.bin")
    (tiny_llama_dir / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="--allow-pickle"):
        float_folder(tiny_llama_dir, tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_streaming_refuses_nan_and_unexpected_tensors(tiny_llama_dir, tmp_path):
    from safetensors.torch import save_file

    from quantkit.io.offload import open_streaming

    sd = load_file(tiny_llama_dir / "model.safetensors")
    sd["model.layers.1.input_layernorm.weight"][0] = float("nan")
    save_file(sd, str(tiny_llama_dir / "model.safetensors"), metadata={"format": "pt"})
    model, _, loader = open_streaming(tiny_llama_dir, tmp_path / "off")
    loader.load_into(model.model.layers[0], "model.layers.0.")
    with pytest.raises(SourceError, match=r"tensor model\.layers\.1\.input_layernorm\.weight holds NaN"):
        loader.load_into(model.model.layers[1], "model.layers.1.")
    sd["model.layers.1.input_layernorm.weight"][0] = 1.0
    sd["model.layers.1.mlp.extra"] = torch.zeros(2)
    save_file(sd, str(tiny_llama_dir / "model.safetensors"), metadata={"format": "pt"})
    model, _, loader = open_streaming(tiny_llama_dir, tmp_path / "off")
    with pytest.raises(SourceError, match=r"no place for \(model\.layers\.1\.mlp\.extra\)"):
        loader.load_into(model.model.layers[1], "model.layers.1.")
