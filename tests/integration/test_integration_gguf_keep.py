"""SmolLM2's GGUF loaded without dequantizing (qk.load(..., dequantize=False)): the model keeps
llama.cpp's Q4_1 / Q8_0 bytes, runs them through quantkit's kernels, and gives the dequantized
load's logits."""
from __future__ import annotations

import pytest
import torch

import quantkit as qk
from quantkit.evaluate.size import memory_bytes
from quantkit.nn import QuantEmbedding, QuantLinear

pytestmark = pytest.mark.model


def _file_tensor_bytes(path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def test_kept_blocks_give_the_dequantized_logits_in_the_files_bytes(smollm2_path, wikitext_path):
    ref_model, tok = qk.load(smollm2_path)
    ids = tok(qk.text(wikitext_path)[:3000], return_tensors="pt").input_ids[:, :256]
    with torch.inference_mode():
        ref_full = ref_model(ids).logits
        ref_one = ref_model(ids[:, :1]).logits
    del ref_model
    model, _ = qk.load(smollm2_path, dequantize=False)
    kept = model.quantkit_gguf_kept
    assert kept.kept == {"Q4_1": 210, "Q8_0": 1} and not kept.left_float
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len({id(m) for m in layers}) == 211  # 7 x 30 projections + the tied head over the embedding's table
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    with torch.inference_mode():
        for ref, x in ((ref_full, ids), (ref_one, ids[:, :1])):  # many rows (GEMM side) and one (decode side)
            y = model(x).logits
            assert float((y - ref).abs().max() / ref.abs().max()) <= 1e-4
    assert memory_bytes(model) <= 1.05 * _file_tensor_bytes(smollm2_path)
