"""Activation quantization through the pipeline: static ranges from the observers, SmoothQuant,
checkpoints, fallbacks (tiny random models; the real model is in tests/integration)."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import quantkit as qk
from quantkit.errors import DataError, SchemeError
from quantkit.io.checkpoint import WEIGHTS_FILE, expected_weights_bytes
from quantkit.observers import make_observer
from quantkit.pipeline import needs_calibration
from quantkit.algorithms import SmoothQuant
from quantkit.config import make_config

VOCAB = 256


def _llama(outlier=True, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval()
    if outlier:  # an LLM-like outlier channel: feature 3 of every attention input is 40x the rest
        with torch.no_grad():
            for layer in m.model.layers:
                layer.input_layernorm.weight[3] = 40.0
    return m


def _gpt2():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()
    with torch.no_grad():
        for b in m.transformer.h:
            b.ln_1.weight[7] = 30.0
            b.ln_1.bias[7] = 2.0
    return m


def _ids(n=8, length=32, seed=1):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _err(model, q, ids):
    with torch.no_grad():
        return float((q(ids).logits - model(ids).logits).pow(2).mean())


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_smoothquant_alone_preserves_the_function(make):
    model = make()
    ids = _ids()
    q = qk.quantize(model, "fp32", calib=ids, transforms=[SmoothQuant(0.5)], progress=False)
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    norm = "model.layers.0.input_layernorm" if make is _llama else "transformer.h.0.ln_1"
    moved = q.get_submodule(norm).weight.detach()
    assert not torch.allclose(moved, model.get_submodule(norm).weight)  # something was actually migrated
    assert float(moved.abs().max() / moved.abs().median()) < 10  # the outlier channel is flattened


def test_smoothquant_rescues_per_tensor_static_activations():
    model, ids = _llama(), _ids()
    plain = qk.quantize(model, "w8a8-static-minmax", calib=ids, progress=False)
    smooth = qk.quantize(model, "w8a8-static-minmax", calib=ids, transforms=[SmoothQuant(0.5)], progress=False)
    assert _err(model, smooth, ids) < 0.5 * _err(model, plain, ids)


@pytest.mark.parametrize("scheme", ["w8a8-static-minmax", "w8a8-static-mse-asym", "w8a8-static-entropy"])
def test_static_range_is_the_observers_range_of_the_layer_input(scheme):
    model, ids = _llama(outlier=False), _ids()
    q = qk.quantize(model, scheme, calib=ids, progress=False)
    sc = q.quantkit.config.scheme
    # the first block's q_proj sees exactly what the float model feeds it (nothing before it is quantized)
    obs = make_observer(sc.observer, symmetric=sc.act_symmetric)
    h = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: obs.update(a[0]))
    with torch.no_grad():
        for i in range(0, ids.shape[0], 8):
            model(ids[i:i + 8])
    h.remove()
    s, z = obs.qparams()
    qw = q.model.layers[0].self_attn.q_proj.quantized_weight()
    assert torch.equal(qw.tensors["in_scale"], s.float().reshape(1))
    if z is not None:
        assert int(qw.tensors["in_zero"]) == int(z)


def test_static_checkpoint_round_trip_and_exact_size(tmp_path):
    model, ids = _llama(), _ids()
    cfg = make_config("w8a8-static-percentile-asym", transforms=[SmoothQuant(0.5)])
    q = qk.quantize(model, cfg, calib=ids, progress=False)
    out = qk.save(q, tmp_path / "ck")
    assert (out / WEIGHTS_FILE).stat().st_size == expected_weights_bytes(model, cfg)
    m2, _ = qk.load(out)
    assert m2.quantkit.config.transforms == (SmoothQuant(0.5),)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, q(ids).logits)


def test_dynamic_needs_no_calibration_and_static_does():
    assert not needs_calibration(make_config("w8a8-dynamic"))
    assert needs_calibration(make_config("w8a8-static-mse"))
    assert needs_calibration(make_config("int8", transforms=["smoothquant"]))
    model = _llama()
    q = qk.quantize(model, "w8a8-dynamic", progress=False)
    assert _err(model, q, _ids()) < 1e-3
    with pytest.raises(DataError, match="tokenizer"):
        qk.quantize(model, "w8a8-static-mse", progress=False)  # no calib ids, no tokenizer to make them


def test_static_with_gptq_weights():
    model, ids = _llama(outlier=False), _ids(16)
    q = qk.quantize(model, "w8a8-static-mse", method="gptq", calib=ids, progress=False)
    assert set(q.quantkit.methods.values()) == {"gptq"}
    assert "in_scale" in q.model.layers[1].mlp.down_proj.quantized_weight().tensors


def test_bad_alpha_and_scheme():
    with pytest.raises(SchemeError, match="alpha"):
        make_config("w8a8-static-mse", transforms=[{"name": "smoothquant", "options": {"alpha": 1.5}}])
    with pytest.raises(SchemeError, match="observer"):
        make_config("w8a8-static-kl")


def test_inputs_far_outside_the_static_range_are_clipped_counted_and_never_nan(caplog):
    """Calibrate on ordinary inputs, then make every Linear input 1e4x larger: every value beyond the
    frozen range saturates (counted per layer and reported by evaluate_model), no NaN/inf."""
    from quantkit.evaluate.run import evaluate_model
    from quantkit.nn import QuantLinear

    model = _llama(outlier=False)
    q = qk.quantize(model, "w8a8-static-minmax", calib=_ids(), progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear) and m.run_stats is not None]
    assert layers
    for m in layers:  # the calibration pass already ran the quantized blocks: start counting afresh
        m.run_stats.update(clipped=0, values=0)
    with torch.no_grad():
        for layer in q.model.layers:  # the norms feed q/k/v and gate/up: far outside their ranges
            layer.input_layernorm.weight.mul_(1e4)
            layer.post_attention_layernorm.weight.mul_(1e4)
        logits = q(_ids(2, 16, seed=5)).logits
    assert torch.isfinite(logits).all()
    clipped = sum(m.run_stats["clipped"] for m in layers)
    assert 0 < clipped <= sum(m.run_stats["values"] for m in layers)
    assert all(m.run_stats["clipped"] <= m.run_stats["values"] for m in layers)
    windows = _ids(2, 16, seed=6)
    with caplog.at_level("WARNING"):
        res = evaluate_model(q, None, windows=windows, progress=False)
    total = sum(m.run_stats["values"] for m in layers)
    assert 0 < res["act_clipped_values"] == sum(m.run_stats["clipped"] for m in layers) <= total
    assert 0 < res["act_clipped_fraction"] <= 1
    assert res["act_clipped_fraction"] == pytest.approx(res["act_clipped_values"] / total)
    assert "clipped at the range's bound" in caplog.text
    # counters were reset, then counted again: every input value of the windows' one forward each
    assert all(m.run_stats["values"] == windows.numel() * m.in_features for m in layers)


def test_float_channels_are_the_largest_calibrated_ones_and_leave_the_range():
    """-oN keeps the N input channels with the largest calibrated |x| in float, and the frozen
    range is the observer's over the other channels only."""
    model, ids = _llama(outlier=True), _ids()
    q = qk.quantize(model, "w8a8-static-minmax-o2", calib=ids, progress=False)
    seen = []
    h = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    x = torch.cat(seen).reshape(-1, 64)
    top = torch.sort(torch.sort(x.abs().amax(0), descending=True).indices[:2]).values
    qw = q.model.layers[0].self_attn.q_proj.quantized_weight()
    assert 3 in top.tolist()  # the planted outlier channel
    assert torch.equal(qw.tensors["in_outliers"], top.to(torch.int32))
    keep = torch.ones(64, dtype=torch.bool)
    keep[top] = False
    assert torch.allclose(qw.tensors["in_scale"], x[:, keep].abs().max().reshape(1) / 127)
    # and the float channels make the per-tensor static range usable: far less error than without
    plain = qk.quantize(model, "w8a8-static-minmax", calib=ids, progress=False)
    assert _err(model, q, ids) < 0.2 * _err(model, plain, ids)


@pytest.mark.parametrize("smooth", [None, "auto"])
def test_float_channels_checkpoint_round_trip_and_exact_size(tmp_path, smooth):
    model, ids = _llama(), _ids()
    cfg = make_config("w8a8-static-ema-asym-o4", transforms=() if smooth is None else [SmoothQuant(smooth)])
    q = qk.quantize(model, cfg, calib=ids, progress=False)
    out = qk.save(q, tmp_path / "ck")
    assert (out / WEIGHTS_FILE).stat().st_size == expected_weights_bytes(model, cfg)
    m2, _ = qk.load(out)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, q(ids).logits)


def test_float_channels_grammar():
    from quantkit.scheme import parse_scheme

    s = parse_scheme("w8a8-static-mse-asym-o16")
    assert (s.act_outliers, s.observer, s.act_symmetric) == (16, "mse", False)
    assert parse_scheme(s.name) == s and parse_scheme("w8a8-static-o8").observer == "mse"
    for bad, msg in (("w8a8-dynamic-o8", "outlier"), ("w8a8-static-mse-o0", "1 to"),
                     ("w8a8-static-mse-o5000", "1 to")):
        with pytest.raises(SchemeError, match=msg):
            parse_scheme(bad)
    with pytest.raises(SchemeError, match="only 64"):
        qk.quantize(_llama(), "w8a8-static-minmax-o64", calib=_ids(), progress=False)
