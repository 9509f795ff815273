"""Mixed precision: sensitivity measured by replaying blocks equals quantizing the layer in
the whole model; the allocation is the true optimum (checked by brute force); budgets and
plan files are checked; plans apply through qk.quantize and the CLI."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

import quantkit as qk
from quantkit.errors import QuantkitError, SchemeError
from quantkit.plan import (Plan, Sensitivity, allocate, measure_sensitivity, parse_budget, plan_for_budget,
                           plan_for_target, plan_size, predicted_kld)
from quantkit.config import Rule, make_config
from quantkit.scheme import parse_scheme

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
SCHEMES = "int8,int4-g32,int2-g32"


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sens(tiny, ids):
    return measure_sensitivity(tiny, ids, SCHEMES, batch_size=2, progress=False)


def _kl_whole_model(model, qmodel, ids):
    with torch.no_grad():
        a = torch.log_softmax(model(ids).logits.float(), -1)
        b = torch.log_softmax(qmodel(ids).logits.float(), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.mark.parametrize("layer", ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj"])
def test_replayed_sensitivity_equals_quantizing_that_layer_in_the_whole_model(tiny, ids, sens, layer):
    cfg = make_config("fp32", rules=(Rule(layer, parse_scheme("int2-g32")),), head="keep")
    direct = _kl_whole_model(tiny, qk.quantize(tiny, cfg, progress=False), ids)
    # (qk.quantize runs the packed kernel on bf16 activations; sensitivity uses the float reference kernel)
    assert sens.kld[layer]["int2-g32"] == pytest.approx(direct, rel=1e-2, abs=1e-7)
    assert sens.kld[layer]["int2-g32"] > sens.kld[layer]["int4-g32"] > sens.kld[layer]["int8"] - 1e-7


def test_model_is_left_unchanged(tiny, ids):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    measure_sensitivity(tiny, ids, "int4-g32", batch_size=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in tiny.model.layers)


def test_allocation_is_the_brute_force_optimum():
    # 5 layers x 3 choices: every combination checked
    g = torch.Generator().manual_seed(0)
    schemes = ["int8", "int4-g32", "int2-g32"]
    shapes = {f"l{i}": (32 * (i + 1), 64) for i in range(5)}
    kld = {n: dict(zip(schemes, sorted(torch.rand(3, generator=g).tolist()))) for n in shapes}
    s = Sensitivity(schemes, list(shapes), shapes, kld)
    sizes = {n: {sc: s.bytes(n, sc) for sc in schemes} for n in shapes}
    total_min = sum(min(v.values()) for v in sizes.values())
    total_max = sum(max(v.values()) for v in sizes.values())
    for budget in torch.linspace(total_min, total_max, 9).long().tolist():
        best = min((sum(kld[n][c] for n, c in zip(shapes, combo)), combo)
                   for combo in itertools.product(schemes, repeat=5)
                   if sum(sizes[n][c] for n, c in zip(shapes, combo)) <= budget)
        choice = allocate(s, budget, 0)
        assert sum(sizes[n][c] for n, c in choice.items()) <= budget
        assert predicted_kld(s, choice) == pytest.approx(best[0])
    assert allocate(s, total_min - 1, 0) is None


def test_plan_at_the_uniform_size_is_no_worse_than_uniform(tiny, ids, sens):
    uniform = {n: "int4-g32" for n in sens.layers}
    size = plan_size(tiny, uniform, "bf16")
    plan = plan_for_budget(tiny, sens, size)
    assert plan.size_bytes <= size and plan.predicted_kld <= predicted_kld(sens, uniform) + 1e-12
    qm = qk.quantize(tiny, plan.config(), progress=False)  # the exact size is the size it saves
    from quantkit.evaluate.run import weights_bytes

    assert weights_bytes(qm) == plan.size_bytes
    assert {qm.quantkit.layers[n] for n in plan.layer_choice()} <= {"int8", "int4-g32", "int2-g32"}
    assert qm.quantkit.head["scheme"] == plan.head
    pinned = plan_for_budget(tiny, sens, size, head="bf16")  # planning the head too can only help
    assert pinned.head == "bf16" and plan.predicted_kld <= pinned.predicted_kld + 1e-12


def test_head_damage_equals_storing_only_the_head_so(tiny, ids, sens):
    from quantkit.plan import HEAD, head_bytes

    assert set(sens.head) == {"bf16", "int8"} and sens.head["int8"] > sens.head["bf16"] >= 0
    direct = _kl_whole_model(tiny, qk.quantize(tiny, make_config("fp32", head="int8"), progress=False), ids)
    assert sens.head["int8"] == pytest.approx(direct, rel=1e-2, abs=1e-7)
    assert sens.bytes(HEAD, "int8") == head_bytes(tiny, "int8") < head_bytes(tiny, "bf16")
    # one table when tied: 256 x 64 int8 codes + one scale per row
    assert head_bytes(tiny, "bf16") == 256 * 64 * 2


def test_budget_below_the_smallest_size_is_refused_with_that_size(tiny, sens):
    for head, planned_head in (("bf16", "bf16"), (None, "int8")):
        smallest = plan_size(tiny, {n: "int2-g32" for n in sens.layers}, planned_head)
        with pytest.raises(SchemeError, match=f"{smallest:,} bytes"):
            plan_for_budget(tiny, sens, smallest - 1, head=head)
        assert plan_for_budget(tiny, sens, smallest, head=head).size_bytes == smallest


def test_deterministic_for_a_seed(tiny, ids, sens):
    again = measure_sensitivity(tiny, ids, SCHEMES, batch_size=2, progress=False)
    assert again.kld == sens.kld and again.head == sens.head
    size = plan_size(tiny, {n: "int4-g32" for n in sens.layers}, "bf16")
    assert plan_for_budget(tiny, again, size).choice == plan_for_budget(tiny, sens, size).choice


def test_accuracy_target_is_met_when_measured(tiny, ids, sens):
    uniform_kld = {sc: _kl_whole_model(tiny, qk.quantize(tiny, sc, progress=False), ids) for sc in ("int8", "int4-g32")}
    target = (uniform_kld["int8"] + uniform_kld["int4-g32"]) / 2
    plan = plan_for_target(tiny, sens, ids, max_kld=target, progress=False)
    assert plan.measured["kld"] <= target
    assert plan.size_bytes < plan_size(tiny, {n: "int8" for n in sens.layers}, "bf16")
    with pytest.raises(SchemeError, match="exactly one"):
        plan_for_target(tiny, sens, ids, progress=False)


@pytest.mark.parametrize("text,expected", [("70MB", 70_000_000), ("1.5GiB", int(1.5 * 2**30)), ("4bpw", 500),
                                           ("8 bpw", 1000)])
def test_budgets(text, expected):
    assert parse_budget(text, 1000) == expected


def test_bad_budget_and_plan_files(tmp_path):
    with pytest.raises(SchemeError, match="70MB"):
        parse_budget("seventy", 10)
    (tmp_path / "p.json").write_text(json.dumps({"layers": {}}))
    with pytest.raises(QuantkitError, match="not a quantkit plan"):
        Plan.load(tmp_path / "p.json")


def test_a_plan_whose_layers_are_not_in_the_model_is_refused(tiny, tmp_path):
    names = [f"model.layers.{b}.mlp.down_proj" for b in range(3)]  # block 2: a deeper model's plan
    (tmp_path / "p.json").write_text(Plan({n: "int4-g32" for n in names}).to_json())
    plan = Plan.load(tmp_path / "p.json")
    for call in (lambda: qk.quantize(tiny, plan.config(), progress=False),
                 lambda: plan_size(tiny, plan.choice, "bf16")):
        with pytest.raises(SchemeError) as e:
            call()
        assert "'model.layers.2.mlp.down_proj' -> int4-g32" in str(e.value)
        assert "its layers are: model.layers.*.self_attn.q_proj (2)" in str(e.value)


def test_sensitivity_json_round_trip(sens):
    again = Sensitivity.from_dict(json.loads(json.dumps(sens.to_dict())))
    assert again.kld == sens.kld and again.shapes == sens.shapes
    assert again.head == sens.head and again.head_bytes == sens.head_bytes and again.units() == sens.units()



def test_hessian_proxy_ranks_layers_like_the_measured_damage(tiny, ids, sens):
    from quantkit.plan import proxy_sensitivity, rank_correlation

    proxy = proxy_sensitivity(tiny, ids, SCHEMES, batch_size=2, progress=False)
    assert proxy.layers == sens.layers
    n = sens.layers[3]
    assert proxy.kld[n]["int2-g32"] > proxy.kld[n]["int4-g32"] > proxy.kld[n]["int8"] >= 0
    assert rank_correlation(sens, proxy) > 0.3  # 0.39 on this random model (its q/k layers barely matter); see benchmarks for SmolLM2
    assert rank_correlation(sens, sens) == pytest.approx(1.0)


def test_every_budget_between_the_extremes_gets_a_plan_that_fits(tiny, sens):
    lo = plan_size(tiny, {n: "int2-g32" for n in sens.layers}, "bf16")
    hi = plan_size(tiny, {n: "int8" for n in sens.layers}, "bf16")
    for budget in torch.linspace(lo, hi, 13).long().tolist():  # the header's size varies with the choice
        plan = plan_for_budget(tiny, sens, budget)
        assert plan.size_bytes <= budget
