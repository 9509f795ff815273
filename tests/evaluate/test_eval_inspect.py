"""`inspect_model` on float models (size under each scheme) and on quantized ones (what they store),
for every embeddings/head storage, tied and untied heads, in memory and reloaded from a checkpoint."""
import pytest
import torch

import quantkit as qk
from quantkit.evaluate.inspect import INSPECT_SCHEMES, inspect_model
from quantkit.io.checkpoint import load_checkpoint
from quantkit.nn import QuantEmbedding
from quantkit.config import HEAD_CHOICES

V, H = 256, 64


def _float_params(model):
    return sum(p.numel() for p in model.parameters())


def _distinct_bytes(model):
    """Independent count: every distinct storage behind the parameters and buffers."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_float_model_lists_every_scheme(tiny_llama):
    info = inspect_model(tiny_llama)
    assert info["quantized"] is None and set(info["sizes"]) == set(INSPECT_SCHEMES)
    assert info["parameters"] == _float_params(tiny_llama)


@pytest.mark.parametrize("head", HEAD_CHOICES)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantized_model_shows_what_it_stores(tied, head, tmp_path, request):
    model = request.getfixturevalue("tiny_llama" if tied else "tiny_llama_untied")
    q = qk.quantize(model, "int4-g32", head=head, progress=False)
    qk.save(q, tmp_path / "ck")
    on_disk = (tmp_path / "ck" / "model.safetensors").stat().st_size
    again, _ = load_checkpoint(tmp_path / "ck")
    stored_head = {"keep": "fp32"}.get(head, head)  # the tiny model is float32
    for m in (q, again):
        info = inspect_model(m)
        assert info["quantized"] == "int4-g32"
        assert info["parameters"] == _float_params(model)  # the weights it represents, not its packed bytes
        assert list(info["sizes"]) == ["int4-g32 (as stored)"]
        row = info["sizes"]["int4-g32 (as stored)"]
        assert row["bytes"] == on_disk and row["head"] == stored_head
        assert row["bits_per_param"] == pytest.approx(8 * on_disk / _float_params(model))
        assert info["memory_bytes"] == _distinct_bytes(m)
        parts = info["breakdown"]
        assert sum(e["bytes"] for e in parts.values()) == info["memory_bytes"]
        assert sum(e["params"] for e in parts.values()) == info["parameters"]
        assert parts["embeddings"]["params"] == V * H
        emb = m.model.embed_tokens
        assert isinstance(emb, QuantEmbedding)
        assert parts["embeddings"]["bytes"] == sum(b.untyped_storage().nbytes() for b in emb.linear.buffers())
        assert parts["head"]["tied"] == tied and parts["head"]["params"] == (0 if tied else V * H)
        assert parts["mlp"]["params"] == 2 * 3 * H * 128 and parts["attention"]["params"] == 2 * (2 * H * H + 2 * H * 32)
        assert "uint8" in info["dtypes"]  # int4 codes, packed two to a byte
        if head == "int8":
            assert info["dtypes"]["int8"] == V * H * (1 if tied else 2)
