"""The architecture matrix for decoders, one row per family of tiny_models.DECODERS (dense and
mixture-of-experts alike):
- the model as quantkit holds it in fp32 gives transformers' logits, and the silent-garbage
  guard (evaluate/guard.py) passes on it: a family detail lost in a swap would be caught;
- int8 and int4-g32 quantize, save and reload to the very same outputs; int8's KL divergence
  to fp32 is a small fraction of int4 RTN's, so the bound means something;
- GPTQ runs on the blocks found in the model (no per-family list) and beats RTN at int4-g32 on
  held-out tokens.
"""
import pytest
import torch
from tiny_models import DECODERS, MOE_KINDS, ids, kld, tiny

import quantkit as qk
from quantkit.evaluate.guard import check_reference


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_family_round_trips_and_int8_is_close(kind, tmp_path):
    m = tiny(kind)
    x = ids(1)
    with torch.no_grad():
        ref = m(x).logits
    got_kld = {}
    for scheme in ("fp32", "int8", "int4-g32"):
        q = qk.quantize(m, scheme, head="fp32", progress=False)
        qk.save(q, tmp_path / scheme)
        back, _ = qk.load(tmp_path / scheme)
        assert type(back) is type(m)
        with torch.no_grad():
            got, again = q(x).logits, back(x).logits
        assert torch.equal(got, again), scheme  # the reload computes what the quantized model computed
        if scheme == "fp32":
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the model as quantkit holds it
        got_kld[scheme] = kld(got, ref)
    assert got_kld["int4-g32"] > 1e-3  # int4 visibly hurts on these weights
    assert got_kld["int8"] <= 0.05 * got_kld["int4-g32"], got_kld  # measured 0.2-1.6% of it
    if kind in MOE_KINDS:  # the experts are quantized: no fused float tensor is left
        assert not [n for n, p in q.named_parameters() if p.dim() == 3]


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_guard_passes_on_every_family(kind):
    res = check_reference(tiny(kind), head="bf16", ids=ids(3, (1, 16)))
    assert res.ok and res.diff_reference <= res.allowance


@pytest.mark.parametrize("kind", sorted(DECODERS))
def test_gptq_runs_on_the_blocks_found_and_beats_rtn(kind):
    m = tiny(kind)
    x = ids(1)
    with torch.no_grad():
        ref = m(x).logits
    calib = ids(2, (16, 32))
    rtn = qk.quantize(m, "int4-g32", head="fp32", progress=False)
    gptq = qk.quantize(m, "int4-g32", method="gptq", calib=calib, head="fp32", progress=False)
    assert set(gptq.quantkit.methods.values()) == {"gptq"}  # every layer, experts included, had its Hessian
    with torch.no_grad():
        k_rtn, k_gptq = kld(rtn(x).logits, ref), kld(gptq(x).logits, ref)
    assert k_gptq < k_rtn, (k_gptq, k_rtn)  # measured 0.46-0.91x of RTN's
