"""QAT and QLoRA on the real SmolLM2-135M model: a few steps on WikiText's calibration part,
then the equivalences that must hold at full size (converted == fake-quantized; peft's
PeftModel over the dequantized base == our QLoRA model). Quality figures come from
`python benchmarks/training.py` (docs/benchmarks.md), not from this short run."""
from __future__ import annotations

import copy

import pytest
import torch

import quantkit as qk
from quantkit.data import tokenize
from quantkit.train import TrainConfig, convert, dequantized_model, prepare_qat, save_adapter, train

pytestmark = pytest.mark.model
CFG = TrainConfig(steps=2, batch_size=1, seq_len=64, lr=1e-3)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return qk.load(smollm2_path)


@pytest.fixture(scope="module")
def ids(smol, wikitext_path):
    return tokenize(smol[1], qk.text(wikitext_path, "calib")[:20000])


def test_qat_int4_converted_model_reproduces_the_trained_model(smol, ids):
    torch.manual_seed(0)
    m = prepare_qat(smol[0], "int4-g128")
    s = train(m, ids, CFG, progress=False)
    assert all(torch.isfinite(torch.tensor(s["losses"])))
    x = ids[:96][None]
    with torch.no_grad():
        fake = m(x).logits
        ref = convert(copy.deepcopy(m), head="keep", kernel="dequant")(x).logits
    assert (ref - fake).abs().max() < 1e-3


def test_qlora_adapter_loads_in_peft_and_reproduces_our_logits(smol, ids, tmp_path):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    m = qk.prepare_qlora(smol[0])
    s = train(m, ids, CFG, progress=False)
    assert s["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))
    save_adapter(m, tmp_path / "adapter", base_model="smollm2")
    theirs = peft.PeftModel.from_pretrained(dequantized_model(m), tmp_path / "adapter").eval()
    x = ids[:96][None]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, m.eval()(x).logits, rtol=0, atol=1e-3)
