"""A tiny random Llama (vocab 256) and token ids to train it on, for tests/train."""
from __future__ import annotations

import pytest
import torch

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="session")
def train_ids():
    """A repetitive id sequence (a learnable pattern) of 4096 tokens."""
    g = torch.Generator().manual_seed(1)
    motif = torch.randint(0, 256, (37,), generator=g)
    return motif.repeat(4096 // 37 + 1)[:4096]
