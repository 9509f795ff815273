"""Fixtures of the CLI tests: a tiny random Llama saved as a Hugging Face folder, a text, and
that model quantized by the CLI (module-scoped: built once per test file)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_support import VOCAB, TEXT, make_tokenizer
from quantkit.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random Llama (width 96) with its tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    assert len(tok) <= VOCAB
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "int4"
    assert main(["quantize", str(tiny), "--scheme", "int4-g32", "--out", str(out)]) == 0
    return out
