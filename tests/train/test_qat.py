"""QAT on a whole (tiny) model: prepare -> train -> convert -> save -> load."""
from __future__ import annotations

import pytest
import torch

import quantkit as qk
from quantkit.errors import SchemeError
from quantkit.nn import FakeQuantLinear, QuantLinear
from quantkit.train import TrainConfig, convert, prepare_qat, train


def test_prepare_swaps_every_linear_but_the_head(tiny_llama):
    m = prepare_qat(tiny_llama, "int4-g32")
    fq = [n for n, l in m.named_modules() if isinstance(l, FakeQuantLinear)]
    assert len(fq) == 2 * 7 and "lm_head" not in fq
    assert all(p.requires_grad for p in m.parameters())
    assert not any(isinstance(l, FakeQuantLinear) for l in tiny_llama.modules())  # a copy by default


@pytest.mark.parametrize("scheme,lsq", [("int4-g32", False), ("int3-g32", True), ("nf4-b64-dq", False),
                                        ("w8a8-static-ema", False)])
def test_train_convert_save_load(tiny_llama, train_ids, tmp_path, scheme, lsq):
    torch.manual_seed(0)
    m = prepare_qat(tiny_llama, scheme, lsq=lsq)
    s = train(m, train_ids, TrainConfig(steps=6, batch_size=2, seq_len=32, lr=3e-3), progress=False)
    assert s["losses"][-1] < s["losses"][0]
    x = train_ids[:40][None]
    with torch.no_grad():
        fake = m(x).logits
        ref = convert(__import__("copy").deepcopy(m), head="keep", kernel="dequant" if "w8a8" not in scheme else None)(x).logits
    torch.testing.assert_close(ref, fake, rtol=0, atol=1e-4)
    c = convert(m)
    assert not any(isinstance(l, FakeQuantLinear) for l in c.modules())
    assert set(c.quantkit.methods.values()) == {"qat"} and len(c.quantkit.layers) == 14
    assert not any(p.requires_grad for p in c.parameters())
    qk.save(c, tmp_path / "m")
    again, _ = qk.load(tmp_path / "m")
    assert all(isinstance(again.get_submodule(n), QuantLinear) for n in c.quantkit.layers)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, c(x).logits, rtol=0, atol=0)


def test_qat_beats_rtn_on_what_it_was_trained_for(tiny_llama, train_ids):
    """On the learnable tiny task, QAT's int3 model fits the training text better than RTN's."""
    x = torch.stack([train_ids[i: i + 64] for i in range(0, 640, 64)])
    torch.manual_seed(0)
    m = prepare_qat(tiny_llama, "int3-g32")
    train(m, train_ids, TrainConfig(steps=30, batch_size=4, seq_len=64, lr=3e-3), progress=False)
    c = convert(m, head="keep")
    rtn = qk.quantize(tiny_llama, "int3-g32", head="keep", progress=False)
    with torch.no_grad():
        assert c(input_ids=x, labels=x).loss < 0.5 * rtn(input_ids=x, labels=x).loss


def test_group_fallback_and_refusals(tiny_llama):
    m = prepare_qat(tiny_llama, "int4-g128")  # width 64 and 128: the 64-wide layers fall back to g64
    schemes = {l.scheme.name for l in m.modules() if isinstance(l, FakeQuantLinear)}
    assert schemes == {"int4-g64", "int4-g128"}
    c = convert(m)
    assert c.quantkit.fallbacks
    with pytest.raises(SchemeError, match="does not divide"):
        prepare_qat(tiny_llama, "int4-g128", strict_groups=True)
    with pytest.raises(SchemeError, match="nothing to convert"):
        convert(tiny_llama)
