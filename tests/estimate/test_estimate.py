"""The run estimate probes the model without changing it; its size is exact. (How close its
time and memory come to a real run is checked on SmolLM2 in tests/integration/test_integration_hf.py.)"""
from __future__ import annotations

import time

import pytest
import torch

import quantkit as qk
from quantkit.estimate import estimate_quantize
from quantkit.config import make_config

from measure_support import high_water_bytes, resident_bytes


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("scheme,method", [("int4-g32", "rtn"), ("int4-g32", "gptq"), ("w8a8-static-minmax", "rtn")])
def test_estimate_leaves_the_model_as_it_was_and_gets_the_size_exactly(tiny, scheme, method, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    cfg = make_config(scheme, method)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    rss_before, start = resident_bytes(), time.perf_counter()
    est = estimate_quantize(tiny, cfg, ids, batch_size=2)
    wall, high_water = time.perf_counter() - start, high_water_bytes()
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert all(type(m).__name__ != "QuantLinear" for m in tiny.modules())
    assert len(tiny.model.layers) == 3
    qm = qk.quantize(tiny, cfg, calib=ids, progress=False)
    qk.save(qm, tmp_path / "q")
    assert est.size_bytes == (tmp_path / "q" / "model.safetensors").stat().st_size
    # The time is scaled from what the probe measured inside the call: per layer kind the median
    # sample times the count (every layer of this 3-block model is sampled, so at most twice their
    # sum), or blocks x half a two-block walk (1.5x it); the probe itself ran within the call.
    assert 0 < est.probe_seconds <= wall
    assert 0 < est.seconds <= 2 * wall
    # The peak starts from the process's high-water mark (at least what was resident before the
    # call) and adds at most one measured transient (itself below the high-water mark) and the
    # output's storage (a few hundred KB here).
    assert rss_before <= est.peak_rss_bytes <= 2 * high_water + 64 * 2**20


def test_calibrated_configs_need_the_ids(tiny):
    with pytest.raises(ValueError, match="calibration"):
        estimate_quantize(tiny, make_config("int4-g32", "gptq"))
