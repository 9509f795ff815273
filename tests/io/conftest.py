"""Fixtures for tests/io: a tiny random Llama saved as a Hugging Face folder, and the real GGUF path."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_tokenizer import make_tiny_tokenizer  # noqa: F401  (tests import it from here too)

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()


def _save(model, folder: Path, with_tokenizer: bool = True, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    if with_tokenizer:
        make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def _tiny_llama_dir(tiny_llama, tmp_path_factory) -> Path:
    return _save(tiny_llama, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def _tiny_llama_sharded_dir(tiny_llama, tmp_path_factory) -> Path:
    return _save(tiny_llama, tmp_path_factory.mktemp("tiny_llama_sharded"), max_shard_size="100KB")


@pytest.fixture
def tiny_llama_dir(_tiny_llama_dir, tmp_path) -> Path:
    """A fresh copy (tests may damage it): config.json, model.safetensors, tokenizer files."""
    return Path(shutil.copytree(_tiny_llama_dir, tmp_path / "tiny_llama"))


@pytest.fixture
def tiny_llama_sharded_dir(_tiny_llama_sharded_dir, tmp_path) -> Path:
    """A fresh copy of the tiny Llama saved in several safetensors shards with an index."""
    return Path(shutil.copytree(_tiny_llama_sharded_dir, tmp_path / "tiny_llama_sharded"))


@pytest.fixture
def smol_gguf(smollm2_path) -> Path:
    """The real SmolLM2 GGUF, from the shared cached fixture (tests/conftest.py)."""
    return smollm2_path
