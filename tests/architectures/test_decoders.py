"""Decoder families, each as a tiny random model built offline from its config: the model as
quantkit holds it in fp32 gives transformers' logits exactly; int8 and int4-g32 quantize, save
and reload to the very same outputs; int8's KL divergence to fp32 is a small fraction of int4
RTN's, so the bound means something (the weights are scaled up: default inits give near-uniform
logits on which every quantizer looks perfect).

Mixture-of-experts families are not listed: their fused expert tensors still stay in float
(the Any-model issue), and a passing row would hide that."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import quantkit as qk

V = 256
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=V, max_position_embeddings=128, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma2": {}, "gemma3_text": {}, "phi3": {},
    "olmo2": {}, "granite": {}, "starcoder2": {},
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=V),
    "gpt_neox": {},
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=V),
}


def _model(kind):
    kw = FAMILIES[kind] if kind in ("gpt2", "falcon") else {**BASE, **FAMILIES[kind]}
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **kw)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return m


def _kld(logits, ref):
    return float(torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="batchmean"))


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_family_round_trips_and_int8_is_close(kind, tmp_path):
    m = _model(kind)
    ids = torch.randint(3, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
    kld = {}
    for scheme in ("fp32", "int8", "int4-g32"):
        q = qk.quantize(m, scheme, head="fp32", progress=False)
        qk.save(q, tmp_path / scheme)
        back, _ = qk.load(tmp_path / scheme)
        assert type(back) is type(m)
        with torch.no_grad():
            got, again = q(ids).logits, back(ids).logits
        assert torch.equal(got, again), scheme  # the reload computes what the quantized model computed
        if scheme == "fp32":
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the model as quantkit holds it
        kld[scheme] = _kld(got.flatten(0, 1), ref.flatten(0, 1))
    assert kld["int4-g32"] > 1e-3  # int4 visibly hurts on these weights
    assert kld["int8"] <= 0.05 * kld["int4-g32"], kld  # measured 0.5-1% of it
