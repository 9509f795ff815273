"""Mixture-of-experts: fused expert tensors quantize one expert at a time (nn/experts.py), are
counted in sizes and reports, calibrate on the tokens routed to each expert, and load through
transformers' quantize-on-load and from_pretrained like any other layer."""
import pytest
import torch
import torch.nn.functional as F
from tiny_models import MOE_KINDS, ids, tiny
from torch import nn

import quantkit as qk
from quantkit.config import Rule, make_config
from quantkit.errors import SchemeError
from quantkit.evaluate.inspect import inspect_model
from quantkit.io.checkpoint import expected_weights_bytes
from quantkit.nn import ExpertLinears, QuantLinear


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_quantized_size_matches_the_estimate_with_experts_quantized(kind, tmp_path):
    m = tiny(kind)
    est = expected_weights_bytes(m, make_config("int4-g32"))
    float_experts = expected_weights_bytes(m, make_config("int4-g32", rules=[Rule("*.experts.*", None)]))
    q = qk.quantize(m, "int4-g32", progress=False)
    qk.save(q, tmp_path / "q")
    assert (tmp_path / "q" / "model.safetensors").stat().st_size == est
    assert est < 0.6 * float_experts  # the experts are most of the weights, and they are quantized
    experts = inspect_model(q)["breakdown"]["experts"]
    assert experts["params"] == sum(p.numel() for n, p in m.named_parameters() if p.dim() == 3)
    assert "float32" not in experts["dtypes"] and "uint8" in experts["dtypes"]
    assert inspect_model(m)["breakdown"]["experts"]["dtypes"] == ["float32"]  # the float model's fused tensors


def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(monkeypatch):
    """The Hessian GPTQ gets for expert e of block 0 is 2/n·XᵀX over exactly the tokens the
    float model's router sends to e (computed here from the router's own top-k, independently)."""
    import quantkit.pipeline as pipeline

    m = tiny("qwen3_moe")
    calib = ids(2, (16, 32))
    experts = m.model.layers[0].mlp.experts
    seen_in = []
    hook = experts.register_forward_pre_hook(lambda mod, args: seen_in.append((args[0].detach(), args[1].detach())))
    with torch.no_grad():
        for i in range(0, 16, 8):
            m(input_ids=calib[i:i + 8], use_cache=False)
    hook.remove()
    h = torch.cat([a for a, _ in seen_in])  # [tokens, hidden]
    top = torch.cat([b for _, b in seen_in])  # [tokens, k]
    got = {}
    swap = pipeline.swap_quantized

    def spy(model, name, mod, scheme, method, stats, info):
        got[name] = stats
        swap(model, name, mod, scheme, method, stats, info)

    monkeypatch.setattr(pipeline, "swap_quantized", spy)
    qk.quantize(m, "int4-g32", method="gptq", calib=calib, progress=False)
    for e in range(4):
        x = h[(top == e).any(-1)].double()
        stats = got[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]
        assert stats["rows"] == x.shape[0] > 0
        torch.testing.assert_close(stats["hessian"], 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)


def test_experts_that_too_few_tokens_reach_fall_back_to_rtn_and_are_reported(tmp_path):
    m = tiny("mixtral")
    q = qk.quantize(m, "int4-g32", method="gptq", calib=ids(2, (2, 24)), progress=False)
    methods = q.quantkit.methods
    rtn = [n for n, v in methods.items() if v == "rtn"]
    assert rtn and all(".experts." in n for n in rtn)  # attention saw all 48 tokens; some experts fewer than 32
    assert any(v == "gptq" for n, v in methods.items() if ".experts." not in n)
    (key, count), = q.quantkit.fallbacks.items()
    assert key.startswith("gptq -> rtn (fewer than 32 calibration tokens") and count == len(rtn)
    qk.save(q, tmp_path / "q")
    back, _ = qk.load(tmp_path / "q")
    assert back.quantkit.fallbacks == q.quantkit.fallbacks  # saved with the checkpoint


def test_an_expert_weight_runs_its_layer_and_shows_its_dense_weight_elsewhere():
    w = torch.randn(3, 8, 5)  # [E, out, in]
    lx = ExpertLinears.split(w, transposed=False)
    wt = ExpertLinears.split(w.transpose(1, 2).contiguous(), transposed=True)  # stored [E, in, out]
    assert lx.shape == (3, 8, 5) and wt.shape == (3, 5, 8)
    assert lx.layer(1).weight.data_ptr() == w[1].data_ptr()  # views: nothing copied
    x = torch.randn(4, 5)
    calls = []
    lx.layer(2).register_forward_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(F.linear(x, lx[torch.tensor(2)]), x @ w[2].T)
    torch.testing.assert_close(x @ wt[2], x @ w[2].T)
    assert calls == [1]  # F.linear ran the expert's layer (so hooks and kernels see its tokens)
    torch.testing.assert_close(lx[1].t(), w[1].T)  # anything else: the dense weight
    torch.testing.assert_close(torch.mul(lx[0], 2.0), 2 * w[0])
    torch.testing.assert_close(lx[torch.tensor([2, 0])], w[[2, 0]])  # several at once: stacked


def test_transformers_batched_experts_give_the_eager_outputs():
    q = qk.quantize(tiny("mixtral"), "int8", progress=False)
    x = ids(1)
    with torch.no_grad():
        eager = q(x).logits
        q.config._experts_implementation = "batched_mm"  # indexes the experts with a tensor of ids
        batched = q(x).logits
    torch.testing.assert_close(batched, eager, rtol=1e-3, atol=1e-3)  # dense fp32 weights vs the int8 kernel


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_quantize_on_load_quantizes_the_experts_as_qk_quantize_does(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny(kind).save_pretrained(tmp_path / "float")  # transformers writes the legacy per-expert tensors
    on_load = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=qk.QuantkitConfig(scheme="int8"))
    direct = qk.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "float"), "int8", progress=False)
    assert on_load.quantkit.layers == direct.quantkit.layers
    assert all(isinstance(e, QuantLinear) for e in on_load.model.layers[0].mlp.experts.gate_up_proj.children())
    x = ids(1)
    with torch.no_grad():
        want = direct(x).logits
        assert torch.equal(on_load(x).logits, want)
    on_load.save_pretrained(tmp_path / "q")
    for back in (AutoModelForCausalLM.from_pretrained(tmp_path / "q"), qk.load(tmp_path / "q")[0]):
        with torch.no_grad():
            assert torch.equal(back(x).logits, want)


def test_experts_without_a_declared_layout_are_refused():
    class Experts(nn.Module):  # 3-D per-expert weights, but no use_experts_implementation layout
        def __init__(self):
            super().__init__()
            self.num_experts = 2
            self.w = nn.Parameter(torch.randn(2, 8, 8))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts, self.proj = Experts(), nn.Linear(8, 8)

    with pytest.raises(SchemeError, match=r"experts \(Experts\).*without declaring their layout"):
        qk.quantize(Model(), "int8", progress=False)
