"""Conformance: every registered method x every registered scheme kind, end to end on a tiny Llama.

For each compatible (method, scheme): quantize -> save -> load gives identical logits, the size
estimate made from the float model equals the written file, and the dequantized weights stay
within an error bound derived from the scheme's grid; a method that uses calibration data
must also beat RTN of the same scheme on what it minimises, the layer's output error on the
calibration inputs. The cases are generated from
`quantkit.algorithms.METHODS` and `quantkit.formats.FORMATS` at collection time, so a new
method or format is tested without a new test (a new format kind must add a representative to
`REPRESENTATIVES`, which `test_every_format_kind_has_a_representative` enforces).
"""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import quantkit as qk
from quantkit.algorithms import METHODS, method_of
from quantkit.errors import SchemeError
from quantkit.formats import FORMATS
from quantkit.io.checkpoint import WEIGHTS_FILE, expected_weights_bytes
from quantkit.nn import QuantLinear
from quantkit.config import make_config
from quantkit.scheme import Scheme, parse_scheme

hf_logging.set_verbosity_error()

# one representative scheme string per kind and bit width
REPRESENTATIVES = {
    "float": ["fp32", "bf16", "fp16"],
    "int": [f"int{b}" for b in range(2, 9)] + [f"int{b}-g32" for b in range(2, 9)]
    + ["w8a8-dynamic", "w8a8-static-minmax", "w8a8-static-mse-asym"],  # int8 weights + int8 activations
    "nf4": ["nf4", "nf4-dq"],
    "fp4": ["fp4", "fp4-dq"],
    "fp8": ["fp8-e4m3", "fp8-e5m2"],
    "llm-int8": ["llm-int8"],
    # GGUF block types with blocks of 32 (the K-quants need widths of 256: tests/algorithms, tests/io)
    "ggml": ["gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-iq4_nl"],
}
SCHEMES = [s for kind in sorted(FORMATS) for s in REPRESENTATIVES.get(kind, [])]
CASES = [pytest.param(m, s, id=f"{m}-{s}") for m in sorted(METHODS) for s in SCHEMES]

# Relative weight error bounds ||W - deq(W)||_F / ||W||_F for Gaussian weights (the tiny
# Llama's Linears are N(0, 0.02)). Rounding to a grid of step s leaves an error spread over
# [-s/2, s/2], RMS s/sqrt(12). Rows/groups of <= 128 Gaussian values have absmax < 4 sigma
# (a wider row is rare and only one of hundreds), so:
#   int b, symmetric: s = absmax/(2^(b-1)-1) <= 4 sigma/qmax      -> bound 4/(sqrt(12) qmax)
#   int b, affine:    s = (max-min)/(2^b-1) <= 8 sigma/(2^b-1)    -> bound 8/(sqrt(12)(2^b-1))
#   nf4 / fp4 (16 levels on [-1, 1] x absmax): mean level spacing 2/15 (nf4), 2/14 (fp4; "-0" is
#     not a level) times absmax <= 4 sigma                       -> bound spacing*4/sqrt(12)
#   GGML block types: as the integers (symmetric ones have 2^(b-1) steps on the larger side),
#     IQ4_NL as nf4
#   floats round to nearest with m mantissa bits: |error| <= 2^-(m+1) |w| for every element
#     (bf16 m=7, fp16 m=10, fp8 e4m3 m=3, e5m2 m=2; fp8 is scaled into its normal range)
# These are expected-value bounds with a margin of about 1.5x over what RTN reaches here.
# Methods that use data (GPTQ-like: `needs` is not empty) trade weight error for output error;
# they get 1.5x more room.
SQRT12 = math.sqrt(12)
MANTISSA = {"fp32": 23, "bf16": 7, "fp16": 10, "e4m3": 3, "e5m2": 2}


def weight_error_bound(s: Scheme) -> float:
    if s.kind == "float":
        return 2.0 ** -(MANTISSA[s.fp_format] + 1) if s.fp_format != "fp32" else 1e-7
    if s.kind == "fp8":
        return 2.0 ** -(MANTISSA[s.fp_format] + 1)
    if s.kind in ("int", "llm-int8"):
        if s.symmetric:
            return 4 / (SQRT12 * (2 ** (s.bits - 1) - 1))
        return 8 / (SQRT12 * (2**s.bits - 1))
    if s.kind == "nf4" or s.fp_format == "IQ4_NL":  # IQ4_NL: 16 levels over [-127, 113]/127, spacing ~2/15
        return (2 / 15) * 4 / SQRT12
    if s.kind == "ggml":  # symmetric GGML types use 2^(b-1) steps per side (Q4_0: -8..7), affine ones 2^b-1
        return 4 / (SQRT12 * 2 ** (s.bits - 1)) if s.symmetric else 8 / (SQRT12 * (2**s.bits - 1))
    if s.kind == "fp4":
        return (2 / 14) * 4 / SQRT12
    raise AssertionError(f"no error bound for scheme kind {s.kind!r}: add one here")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))


def test_every_format_kind_has_a_representative():
    missing = sorted(set(FORMATS) - set(REPRESENTATIVES))
    assert not missing, f"add representative schemes for the new format kind(s) {missing} to REPRESENTATIVES"
    for kind, names in REPRESENTATIVES.items():
        assert all(parse_scheme(n).kind == kind for n in names), kind
        weight_error_bound(parse_scheme(names[0]))  # a bound exists for it


def test_the_bounds_are_not_trivial():
    # a bound >= 1 would pass for an all-zero weight; the coarsest here (int2 affine) is 0.77
    assert max(weight_error_bound(parse_scheme(s)) for s in SCHEMES) < 0.8


@pytest.mark.parametrize("method,scheme", CASES)
def test_method_scheme_end_to_end(model, ids, calib, method, scheme, tmp_path):
    alg = method_of(method)
    sc = parse_scheme(scheme)
    try:
        alg.check(sc)
    except SchemeError as e:
        pytest.skip(f"incompatible: {e}")
    try:
        cfg = make_config(sc, method)
    except SchemeError as e:
        pytest.skip(f"refused at the boundary: {e}")

    q = qk.quantize(model, cfg, progress=False, calib=calib if alg.needs or sc.needs else None)
    assert set(q.quantkit.methods.values()) == {method}
    assert set(q.quantkit.layers.values()) == {sc.name}  # width 64/128: no group fallback

    out = qk.save(q, tmp_path / "ckpt")
    assert expected_weights_bytes(model, cfg) == (out / WEIGHTS_FILE).stat().st_size
    m2, _ = qk.load(out)
    with torch.no_grad():
        assert torch.equal(m2(ids).logits, q(ids).logits)

    bound = weight_error_bound(sc) * (1.5 if alg.needs else 1.0)
    for name in q.quantkit.layers:
        w = model.get_submodule(name).weight.detach().float()
        mod = m2.get_submodule(name)
        assert isinstance(mod, QuantLinear) and mod.scheme == sc
        rel = float((mod.dequantized_weight() - w).norm() / w.norm())
        assert rel < bound, f"{name}: relative weight error {rel:.4f} >= {bound:.4f}"
        assert rel == pytest.approx(q.quantkit.errors[name], rel=1e-4, abs=1e-7)  # what was reported
    if alg.needs:
        check_output_error_below_rtn(model, q, calib, sc)


def check_output_error_below_rtn(model, q, calib, sc):
    """The first block's q/k/v read the same input in the float, the calibrated and the RTN
    model (the norm of the embedding, both kept in float): on those calibration inputs X the
    calibrated layer's ||X Wᵀ - X Ŵᵀ|| must be below RTN's (a method that returned RTN fails)."""
    rtn = qk.quantize(model, make_config(sc, "rtn"), progress=False, calib=calib if sc.needs else None)
    seen = {}
    layer = model.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, a, o: seen.setdefault("x", a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib)
    hook.remove()
    x = seen["x"]
    for rel in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{rel}"
        w = model.get_submodule(name).weight.detach().float()
        err = {k: float((x @ (m.get_submodule(name).dequantized_weight() - w).T).norm()) for k, m in (("calibrated", q), ("rtn", rtn))}
        assert err["calibrated"] < err["rtn"], f"{name}: output error {err}"

