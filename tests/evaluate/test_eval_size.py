import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from quantkit.errors import SourceError
from quantkit.evaluate import disk_bytes, memory_bytes, module_breakdown, param_dtypes
from quantkit.evaluate.size import GROUPS

H, V, I, L = 64, 256, 128, 2  # hidden, vocab, intermediate, layers (see conftest)


def _unique_param_count(model):
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _plain_bytes(model):
    """Independent count: every distinct tensor object, numel * element size."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama_untied", "tiny_gpt2"])
def test_breakdown_sums_to_totals(name, request):
    model = request.getfixturevalue(name)
    parts = module_breakdown(model)
    assert list(parts) == list(GROUPS)
    assert sum(e["params"] for e in parts.values()) == _unique_param_count(model)
    assert sum(e["bytes"] for e in parts.values()) == memory_bytes(model) == _plain_bytes(model)
    assert sum(e["buffers"] for e in parts.values()) == sum(b.numel() for b in model.buffers())


def test_tied_head_counted_once(tiny_llama, tiny_llama_untied):
    assert memory_bytes(tiny_llama_untied) - memory_bytes(tiny_llama) == V * H * 4
    head = module_breakdown(tiny_llama)["head"]
    assert head["tied"] and head["bytes"] == 0 and head["params"] == 0 and head["dtypes"] == ["float32"]
    untied = module_breakdown(tiny_llama_untied)["head"]
    assert not untied["tied"] and untied["params"] == V * H and untied["bytes"] == V * H * 4


def test_llama_roles(tiny_llama):
    parts = module_breakdown(tiny_llama)
    kv = H // 4 * 2  # head_dim * kv heads
    assert parts["embeddings"]["params"] == V * H
    assert parts["attention"]["params"] == L * (2 * H * H + 2 * H * kv)
    assert parts["mlp"]["params"] == L * 3 * H * I
    assert parts["norms"]["params"] == (2 * L + 1) * H
    # rotary tables: inv_freq (and its original copy), head_dim / 2 entries each
    rotary = sum(b.numel() for b in tiny_llama.model.rotary_emb.buffers())
    assert parts["other"]["params"] == 0 and parts["other"]["buffers"] == rotary >= H // 4 // 2


def test_gpt2_roles(tiny_gpt2):
    parts = module_breakdown(tiny_gpt2)
    assert parts["embeddings"]["params"] == V * H + 1024 * H  # wte + wpe
    assert parts["attention"]["params"] == L * (H * 3 * H + 3 * H + H * H + H)  # c_attn + c_proj
    assert parts["mlp"]["params"] == L * (H * 4 * H + 4 * H + 4 * H * H + H)  # c_fc + c_proj
    assert parts["norms"]["params"] == (2 * L + 1) * 2 * H
    assert parts["head"]["tied"]


def test_half_precision_and_dtypes(tiny_llama):
    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    assert memory_bytes(half) == _plain_bytes(half)
    dtypes = param_dtypes(half)
    assert sum(dtypes.values()) == _unique_param_count(half) + sum(b.numel() for b in half.buffers())
    held = list(half.parameters()) + list(half.buffers())
    assert dtypes["bfloat16"] == sum(t.numel() for t in held if t.dtype == torch.bfloat16)
    assert set(dtypes) == {str(t.dtype).removeprefix("torch.") for t in held}
    assert module_breakdown(half)["mlp"]["dtypes"] == ["bfloat16"]


def test_views_share_storage():
    m = nn.Module()
    base = torch.zeros(10, 10)
    m.register_buffer("a", base[:5])
    m.register_buffer("b", base[5:])
    assert memory_bytes(m) == 400


def test_disk_bytes(tmp_path):
    save_file({"w": torch.zeros(100)}, tmp_path / "model.safetensors")
    (tmp_path / "extra.gguf").write_bytes(b"x" * 10)
    (tmp_path / "config.json").write_text("{}")
    weights = (tmp_path / "model.safetensors").stat().st_size
    assert disk_bytes(tmp_path) == weights + 10
    assert disk_bytes(tmp_path / "config.json") == 2
    with pytest.raises(SourceError):
        disk_bytes(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError):
        disk_bytes(empty)
