"""Tiny random models (built from configs, no network) shared by the evaluate tests."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 256


def make_llama(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    return make_llama(tied=True)


@pytest.fixture(scope="session")
def tiny_llama_untied() -> LlamaForCausalLM:
    return make_llama(tied=False)


@pytest.fixture(scope="session")
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (3, 16), generator=g)
