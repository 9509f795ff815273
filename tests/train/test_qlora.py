"""QLoRA: a frozen NF4 base with trainable adapters; PEFT's layout read back by peft itself;
merging folds the adapters in and re-quantizes."""
from __future__ import annotations

import json

import pytest
import torch

import quantkit as qk
from quantkit.errors import SchemeError, SourceError
from quantkit.nn import LoRALinear, QuantLinear
from quantkit.train import TrainConfig, dequantized_model, load_adapter, merge, save_adapter, train


def _trained(tiny_llama, train_ids, **kw):
    torch.manual_seed(0)
    m = qk.prepare_qlora(tiny_llama, **kw)
    train(m, train_ids, TrainConfig(steps=4, batch_size=2, seq_len=32, lr=1e-2), progress=False)
    return m


def test_only_the_adapters_train_over_an_nf4_double_quantized_base(tiny_llama):
    m = qk.prepare_qlora(tiny_llama)
    lora = {n: l for n, l in m.named_modules() if isinstance(l, LoRALinear)}
    assert sorted({n.rsplit(".", 1)[-1] for n in lora}) == ["q_proj", "v_proj"] and len(lora) == 4
    assert all(isinstance(l.base, QuantLinear) and l.base.scheme.name == "nf4-b64-dq" for l in lora.values())
    assert all(l.r == 8 and l.scaling == 32 / 8 for l in lora.values())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in lora for ab in "AB"}
    n_expected = sum(8 * (l.in_features + l.out_features) for l in lora.values())
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == n_expected


def test_training_starts_from_the_quantized_base_exactly(tiny_llama):
    m = qk.prepare_qlora(tiny_llama)
    base = qk.quantize(tiny_llama, "nf4-b64-dq", head="keep", progress=False)
    x = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x).logits, base(x).logits, rtol=0, atol=0)


def test_training_lowers_the_loss_and_moves_only_the_adapters(tiny_llama, train_ids):
    torch.manual_seed(0)
    m = qk.prepare_qlora(tiny_llama)
    frozen = {n: t.clone() for n, t in m.state_dict().items() if "lora_" not in n}
    s = train(m, train_ids, TrainConfig(steps=8, batch_size=2, seq_len=32, lr=1e-2), progress=False)
    assert s["losses"][-1] < s["losses"][0]
    after = m.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())


def test_peft_loads_the_adapter_onto_the_dequantized_base_and_reproduces_our_logits(tiny_llama, train_ids, tmp_path):
    peft = pytest.importorskip("peft")
    m = _trained(tiny_llama, train_ids).eval()
    # lora_B starts at zero; 4 AdamW steps at lr <= 1e-2 (betas 0.9, 0.999, no weight decay) move each
    # weight by at most ~lr per step (|m_hat| / sqrt(v_hat) <= 1.007 over the first 4 steps)
    moved = max(float(l.lora_B.weight.detach().abs().max()) for l in m.modules() if isinstance(l, LoRALinear))
    assert 0 < moved <= 4 * 1e-2 * 1.01, moved
    save_adapter(m, tmp_path / "adapter", base_model="tiny")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 32
    theirs = peft.PeftModel.from_pretrained(dequantized_model(m), tmp_path / "adapter").eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ours = m(x).logits
        torch.testing.assert_close(theirs(x).logits, ours, rtol=0, atol=1e-5)
        # and the adapter is not a no-op: without it the logits differ
        assert (dequantized_model(m)(x).logits - ours).abs().max() > 1e-3


def test_load_adapter_round_trip_and_mismatch(tiny_llama, train_ids, tmp_path):
    m = _trained(tiny_llama, train_ids).eval()
    save_adapter(m, tmp_path / "a")
    fresh = load_adapter(qk.prepare_qlora(tiny_llama), tmp_path / "a").eval()
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, m(x).logits, rtol=0, atol=0)
    with pytest.raises(SourceError, match="does not match"):
        load_adapter(qk.prepare_qlora(tiny_llama, targets=("q_proj",)), tmp_path / "a")


def test_merge_folds_the_adapters_in_and_requantizes(tiny_llama, train_ids, tmp_path):
    m = _trained(tiny_llama, train_ids).eval()
    layers = {n: l for n, l in m.named_modules() if isinstance(l, LoRALinear)}
    expected = {n: l.base.dequantized_weight() + l.delta_weight().detach() for n, l in layers.items()}
    merged = merge(m)
    assert not any(isinstance(l, LoRALinear) for l in merged.modules())
    for n, w in expected.items():
        q = merged.get_submodule(n)
        assert isinstance(q, QuantLinear) and q.scheme.name == "nf4-b64-dq"
        ref = qk.quantize_tensor(w, "nf4-b64-dq").dequantize()
        torch.testing.assert_close(q.dequantized_weight(), ref, rtol=0, atol=0)
    qk.save(merged, tmp_path / "merged")
    again, _ = qk.load(tmp_path / "merged")
    for n in expected:  # the same stored weights ...
        torch.testing.assert_close(again.get_submodule(n).dequantized_weight(), merged.get_submodule(n).dequantized_weight(),
                                   rtol=0, atol=0)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():  # ... run by the kernel the reload picks (native where built): fp32 summation order
        torch.testing.assert_close(again(x).logits, merged(x).logits, rtol=1e-5, atol=1e-5)


def test_integer_bases_train_through_a_differentiable_kernel(tiny_llama, train_ids):
    torch.manual_seed(0)
    m = qk.prepare_qlora(tiny_llama, scheme="int4-g32")
    s = train(m, train_ids, TrainConfig(steps=2, batch_size=2, seq_len=16, lr=1e-2), progress=False)
    assert all(torch.isfinite(torch.tensor(s["losses"])))


def test_bf16_compute_dtype_trains(tiny_llama, train_ids):
    torch.manual_seed(0)
    m = qk.prepare_qlora(tiny_llama, compute_dtype="bf16")
    s = train(m, train_ids, TrainConfig(steps=2, batch_size=2, seq_len=16, lr=1e-2, grad_checkpointing=True), progress=False)
    assert all(torch.isfinite(torch.tensor(s["losses"])))
    assert m.model.norm.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kw,msg", [({"targets": ("nope",)}, "no Linear named nope"), ({"r": 0}, "r >= 1"),
                                    ({"compute_dtype": "fp8"}, "compute dtype")])
def test_bad_options_are_refused(tiny_llama, kw, msg):
    with pytest.raises(SchemeError, match=msg):
        qk.prepare_qlora(tiny_llama, **kw)


def test_merge_into_a_finer_scheme_keeps_more_of_the_update(tiny_llama, train_ids):
    m = _trained(tiny_llama, train_ids).eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        want = m(x).logits
        err_nf4 = (merge(__import__("copy").deepcopy(m))(x).logits - want).abs().mean()
        fine = merge(m, "int8")
        err_int8 = (fine(x).logits - want).abs().mean()
    assert {fine.quantkit.layers[n] for n, l in fine.named_modules() if n.endswith(("q_proj", "v_proj"))} == {"int8"}
    assert err_int8 < 0.5 * err_nf4
