"""GGUF export for every family quantkit's exporter knows (io/gguf.ARCHS) among the matrix's:
the file loads through transformers' own GGUF loader (a peer's reader) to the very model (F32:
identical logits), and a quantized file's tensors load as the `gguf` package's own dequantization
of the bytes written. The families the matrix has and the exporter does not are listed in the
README as GGUF-less (scripts/architectures_table.py)."""
import numpy as np
import pytest
import torch
from tiny_models import DECODERS, tiny
from tiny_tokenizer import make_tiny_tokenizer

import quantkit as qk
from quantkit.io.gguf import ARCHS, export_gguf

gguf = pytest.importorskip("gguf")
# transformers' GGUF reader takes Qwen3's head_dim from its config default (128), not from the file
OVERRIDES = {"qwen3": dict(head_dim=128, num_attention_heads=2, num_key_value_heads=1)}
FAMILIES = sorted(k for k in DECODERS if k in ARCHS)


@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_export_loads_back_through_transformers(kind, tmp_path):
    tok = make_tiny_tokenizer()
    m = tiny(kind, vocab_size=len(tok), tie_word_embeddings=False, **OVERRIDES.get(kind, {}))
    ids = torch.tensor([tok.encode("the quick brown fox jumps over the lazy dog")])
    export_gguf(m, tok, tmp_path / "f32.gguf", "F32", tokenizer_pre="gpt-2", progress=False)
    back, _ = qk.load(tmp_path / "f32.gguf")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)
    export_gguf(m, tok, tmp_path / "q8.gguf", "Q8_0", tokenizer_pre="gpt-2", progress=False)
    back, _ = qk.load(tmp_path / "q8.gguf")
    got = dict(back.named_parameters())
    reader = gguf.GGUFReader(tmp_path / "q8.gguf")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(m.model.layers[1].mlp.down_proj.weight.shape)
    assert t.tensor_type.name == "Q8_0"
    np.testing.assert_array_equal(got["model.layers.1.mlp.down_proj.weight"].detach().numpy(), want)


def test_a_family_the_exporter_does_not_know_is_refused_by_name(tmp_path):
    from quantkit.errors import SourceError

    tok = make_tiny_tokenizer()
    with pytest.raises(SourceError, match="GGUF export does not support model type 'gemma2'"):
        export_gguf(tiny("gemma2", vocab_size=len(tok)), tok, tmp_path / "g.gguf", "F32", tokenizer_pre="gpt-2",
                    progress=False)
