import json
import logging
import os
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from quantkit.errors import SourceError
from quantkit.io.load import load, resolve, source_bytes_on_disk

IDS = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 255]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------- Hugging Face folders


def test_hf_dir_loads_identical_logits(tiny_llama, tiny_llama_dir):
    src = resolve(tiny_llama_dir)
    assert src.kind == "hf_dir" and src.path == tiny_llama_dir
    model, tok = load(tiny_llama_dir)
    assert not model.training and model.config.use_cache is True
    assert next(model.parameters()).dtype == torch.float32
    assert tok is not None and tok("the fox", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(_logits(model), _logits(tiny_llama), rtol=0, atol=0)


def test_sharded_dir_loads_identical_logits(tiny_llama, tiny_llama_sharded_dir):
    assert len(list(tiny_llama_sharded_dir.glob("*.safetensors"))) > 1
    model, _ = load(str(tiny_llama_sharded_dir))
    torch.testing.assert_close(_logits(model), _logits(tiny_llama), rtol=0, atol=0)
    total = sum(f.stat().st_size for f in tiny_llama_sharded_dir.glob("*.safetensors"))
    assert source_bytes_on_disk(tiny_llama_sharded_dir) == total


def test_bf16_dtype(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_single_safetensors_file_uses_its_folder(tiny_llama, tiny_llama_dir):
    src = resolve(tiny_llama_dir / "model.safetensors")
    assert src.kind == "safetensors_file" and src.path == tiny_llama_dir
    model, _ = load(tiny_llama_dir / "model.safetensors")
    torch.testing.assert_close(_logits(model), _logits(tiny_llama), rtol=0, atol=0)


def test_single_safetensors_without_config(tiny_llama_dir, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(tiny_llama_dir / "model.safetensors", lone / "w.safetensors")
    with pytest.raises(SourceError, match="config.json is needed next to it"):
        load(lone / "w.safetensors")


def test_truncated_shard(tiny_llama_sharded_dir):
    shard = sorted(tiny_llama_sharded_dir.glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match=f"{shard.name} is truncated"):
        load(tiny_llama_sharded_dir)


def test_missing_shard(tiny_llama_sharded_dir):
    sorted(tiny_llama_sharded_dir.glob("*.safetensors"))[0].unlink()
    with pytest.raises(SourceError, match="missing shard"):
        load(tiny_llama_sharded_dir)


def test_garbage_safetensors(tiny_llama_dir):
    (tiny_llama_dir / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(SourceError, match="truncated or not a valid safetensors"):
        load(tiny_llama_dir)


def test_unsupported_model_type(tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["model_type"] = "not_a_real_arch"
    (tiny_llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="causal LM"):
        load(tiny_llama_dir)


def test_folder_without_config(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        load(tmp_path)


def test_encoder_without_tokenizer(tmp_path, caplog):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    with caplog.at_level(logging.WARNING, logger="quantkit"):
        model, tok = load(tmp_path / "bert")
    assert type(model).__name__ == "BertModel" and tok is None
    assert "no tokenizer" in caplog.text


def test_quantkit_dir_dispatches_to_checkpoint(tiny_llama_dir, monkeypatch):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "quantkit"}
    (tiny_llama_dir / "config.json").write_text(json.dumps(cfg))
    seen = {}

    def load_checkpoint(path, dtype):
        seen.update(path=path, dtype=dtype)
        return torch.nn.Linear(2, 2).train(), "tok"

    fake = types.ModuleType("quantkit.io.checkpoint")
    fake.load_checkpoint = load_checkpoint
    monkeypatch.setitem(sys.modules, "quantkit.io.checkpoint", fake)
    assert resolve(tiny_llama_dir).kind == "quantkit_dir"
    model, tok = load(tiny_llama_dir, dtype=torch.float16)
    assert seen == {"path": tiny_llama_dir, "dtype": torch.float16}
    assert tok == "tok" and not model.training


# ---------------------------------------------------------------- missing paths and hub ids


def test_missing_paths(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        load(tmp_path / "nope.gguf")
    with pytest.raises(SourceError, match="no such file or folder"):
        load(str(tmp_path / "a" / "b" / "c"))


def test_hub_id_failure_is_source_error(monkeypatch):
    import transformers

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    assert resolve("someone/some-model").kind == "hub"
    with pytest.raises(SourceError, match=r"could not load hub id someone/some-model \(offline\?"):
        load("someone/some-model")


# ---------------------------------------------------------------- GGUF


def test_gguf_truncated(smol_gguf, tmp_path):
    half = tmp_path / "half.gguf"
    with open(smol_gguf, "rb") as f:
        half.write_bytes(f.read(smol_gguf.stat().st_size // 2))
    with pytest.raises(SourceError, match="truncated or not a valid GGUF file"):
        load(half)


@pytest.mark.parametrize("version", [b"", b"\x03\x00\x00\x00"])
def test_gguf_random_bytes_with_magic(tmp_path, version):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + version + np.random.default_rng(0).bytes(4096))
    with pytest.raises(SourceError, match="truncated or not a valid GGUF file"):
        load(bad)


def test_gguf_without_magic(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(np.random.default_rng(1).bytes(1024))
    with pytest.raises(SourceError, match="not a GGUF file"):
        load(bad)


def test_gguf_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "notanarch")
    w.add_tensor("x.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert source_bytes_on_disk(path) == path.stat().st_size
    with pytest.raises(SourceError, match="'notanarch'"):
        load(path)


def test_alias_goes_through_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    fake = tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 100)  # cached but damaged: no network needed
    src = resolve("smollm2")
    assert src.kind == "alias" and src.path == fake
    assert source_bytes_on_disk("smollm2") == 108
    with pytest.raises(SourceError, match="truncated or not a valid GGUF"):
        load("smollm2")


@pytest.mark.model
def test_real_smollm2_gguf(smol_gguf):
    model, tok = load(smol_gguf)
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        nxt = model(**enc).logits[0, -1].argmax()
    assert tok.decode(nxt) == " Paris"
