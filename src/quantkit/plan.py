"""Mixed precision: how much each layer's quantization hurts, and the best scheme per layer
under a size budget.

Sensitivity: for every quantizable Linear and every candidate scheme, the layer alone is
quantized (round to nearest) and the model's output is compared with the float model's on
calibration samples: the damage is the mean KL(P_float || P_quantized) over the scored
positions. The float model's inputs to each block are recorded once; a layer in block b is
measured by replaying block b-1's recorded output and running blocks b.. only.

The embedding table and output head (one tensor when tied) are one more unit, `HEAD`, whose
options are its storages (`HEAD_OPTIONS`: bf16 or int8): at 49152 x 576 it is a third of
SmolLM2's parameters, so storing it in int8 frees more bytes than any Linear.

Allocation: choosing one scheme per layer to minimise the summed damage under a byte budget
is a multiple-choice knapsack, solved exactly by dynamic programming over the budget in units
of `unit` bytes (each layer's size rounded *up* to whole units, so the plan never exceeds the
budget; the exact size is then computed from the plan). Summed per-layer KL is the model of
the total damage (additive to first order); the measured KL of the planned model is reported
next to it.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import blocks_of, family_of
from .errors import QuantkitError, SchemeError
from .formats import quantize, storage_bytes
from .nn import QuantLinear
from .modules import fused_parameters, head_modules, head_scheme, linear_weight, set_module
from .pipeline import QuantInfo, quantize_head
from .config import QuantConfig, Rule, make_config
from .scheme import Scheme, parse_scheme

log = logging.getLogger(__name__)
PLAN_FORMAT = "quantkit-plan/1"
DEFAULT_SCHEMES = "int8,int4-g128,int3-g128"
HEAD = "@head"  # plan unit: the embedding table and the output head (tied or not)
HEAD_OPTIONS = ("bf16", "int8")


# ----------------------------------------------------------------------------- sensitivity
class _Skip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(nn.Module):
    """Stands in for block b-1: returns what the float block returned for the current batch."""

    def __init__(self):
        super().__init__()
        self.out = None

    def forward(self, *args, **kwargs):
        return self.out


def _forward_with_hooks(model, ids, batch_size, hooks) -> None:
    """Run the float model over `ids` in batches; remove the given hook handles afterwards."""
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                model(input_ids=ids[i:i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def _record_block_outputs(model, blocks, ids, batch_size) -> list[list]:
    """outputs[b][batch] = what float block b returned on that calibration batch."""
    outs = [[] for _ in blocks]
    _forward_with_hooks(model, ids, batch_size,
                        [blk.register_forward_hook(lambda m, a, o, b=b: outs[b].append(o)) for b, blk in enumerate(blocks)])
    return outs


def _kl(ref_lp: torch.Tensor, logits: torch.Tensor) -> float:
    lp = torch.log_softmax(logits.float(), -1)
    return float((ref_lp.exp() * (ref_lp - lp)).sum(-1).sum())


def fitted_scheme(sc: Scheme, width: int) -> Scheme | None:
    """`sc` for a layer of this input width (the smaller-group fallback qk.quantize uses), or None."""
    return sc.fallback_for(width)


@dataclass
class Sensitivity:
    """Per-layer damage (mean KL, nats/token) and exact stored bytes, for each candidate scheme;
    `head` (storage -> damage) and `head_bytes` for the HEAD unit when it was measured."""

    schemes: list[str]
    layers: list[str]
    shapes: dict[str, tuple[int, int]]
    kld: dict[str, dict[str, float]]  # layer -> scheme -> mean KL when only that layer is quantized
    tokens: int = 0
    head: dict[str, float] = field(default_factory=dict)
    head_bytes: dict[str, int] = field(default_factory=dict)

    def units(self) -> list[str]:
        """What a plan chooses for: every layer, then HEAD when it was measured."""
        return self.layers + ([HEAD] if self.head else [])

    def options(self, unit: str) -> list[str]:
        """Candidates of one unit whose damage is finite (a scheme no group size fits is inf)."""
        if unit == HEAD:
            return list(self.head)
        return [s for s in self.schemes if math.isfinite(self.kld[unit][s])]

    def damage(self, unit: str, scheme: str) -> float:
        return self.head[scheme] if unit == HEAD else self.kld[unit][scheme]

    def bytes(self, unit: str, scheme: str) -> int:
        if unit == HEAD:
            return self.head_bytes[scheme]
        sc = fitted_scheme(parse_scheme(scheme), self.shapes[unit][1])
        return storage_bytes(sc, self.shapes[unit])

    def to_dict(self) -> dict:
        d = {"schemes": self.schemes, "tokens": self.tokens,
             "layers": {n: {"shape": list(self.shapes[n]), "kld": self.kld[n]} for n in self.layers}}
        if self.head:
            d["head"] = {"kld": self.head, "bytes": self.head_bytes}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        layers = list(d["layers"])
        head = d.get("head") or {}
        return cls(list(d["schemes"]), layers, {n: tuple(d["layers"][n]["shape"]) for n in layers},
                   {n: dict(d["layers"][n]["kld"]) for n in layers}, int(d.get("tokens", 0)),
                   {k: float(v) for k, v in head.get("kld", {}).items()},
                   {k: int(v) for k, v in head.get("bytes", {}).items()})


def head_bytes(model: nn.Module, storage: str) -> int:
    """Exact bytes of the embedding table and output head (once when tied) stored as `storage`."""
    emb_name, out_name, tied = head_modules(model)
    total = 0
    for name in [emb_name] + ([] if tied else [out_name]):
        if name is None:
            continue
        m = model.get_submodule(name)
        w = linear_weight(m) if linear_weight(m) is not None else m.weight
        total += storage_bytes(head_scheme(storage, w.dtype), tuple(w.shape))
    return total


def _measure_head(model, ids, batch_size, ref, options) -> dict[str, float]:
    """Damage of storing only the embedding/head as each option (a whole forward pass each)."""
    emb_name, out_name, tied = head_modules(model)
    if emb_name is None and out_name is None:
        return {}
    saved = {n: model.get_submodule(n) for n in (emb_name, out_name) if n}
    out = {}
    try:
        for opt in options:
            quantize_head(model, make_config("fp32", head=opt), QuantInfo(make_config("fp32")), emb_name, out_name, tied)
            total = 0.0
            with torch.no_grad():
                for k, i in enumerate(range(0, ids.shape[0], batch_size)):
                    total += _kl(ref[k], model(input_ids=ids[i:i + batch_size], use_cache=False).logits)
            out[opt] = total / ids.numel()
            for n, m in saved.items():
                set_module(model, n, m)
    finally:
        for n, m in saved.items():
            set_module(model, n, m)
    return out


def _refuse_experts(model: nn.Module) -> None:
    """Sensitivities are measured per Linear; a model with fused experts would get a plan that
    leaves its experts (most of its weights) out, so it is refused."""
    fused = sorted(fused_parameters(model))
    if fused:
        raise SchemeError(f"planning does not measure mixture-of-experts weights yet ({fused[0]} and "
                          f"{len(fused) - 1} more); quantize this model with one scheme (--scheme)")


def measure_sensitivity(model: nn.Module, calib: torch.Tensor, schemes, batch_size: int = 4,
                        progress: bool = True, head: bool = True) -> Sensitivity:
    """Damage of quantizing each Linear alone with each scheme (see the module docstring); with
    `head`, also of storing the embedding/head as each of HEAD_OPTIONS."""
    schemes = [parse_scheme(s) for s in (schemes.split(",") if isinstance(schemes, str) else schemes)]
    if not schemes:
        raise SchemeError("give at least one candidate scheme")
    _refuse_experts(model)
    fam = family_of(model)
    blocks = blocks_of(model, fam)
    ids = calib.to(torch.long)
    model.eval()
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=ids[i:i + batch_size], use_cache=False).logits.float(), -1)
               for i in range(0, ids.shape[0], batch_size)]
    outs = _record_block_outputs(model, blocks, ids, batch_size)
    prefix = fam.blocks
    layers = []
    for b, blk in enumerate(blocks):
        layers += [(b, f"{prefix}.{b}.{n}") for n, m in blk.named_modules() if linear_weight(m) is not None]
    sens = Sensitivity([s.name for s in schemes], [n for _, n in layers], {}, {}, tokens=int(ids.numel()))
    bar = tqdm(total=len(layers) * len(schemes), desc="sensitivity", unit="layer", disable=not progress)
    originals = list(blocks)
    try:
        for b, name in layers:
            mod = model.get_submodule(name)
            w = linear_weight(mod).detach().float()
            sens.shapes[name] = tuple(w.shape)
            sens.kld[name] = {}
            replay = _Replay() if b > 0 else None
            for i in range(b):  # blocks before b are skipped, block b-1 replays its float output
                blocks[i] = replay if i == b - 1 else _Skip()
            try:
                for sc in schemes:
                    fitted = fitted_scheme(sc, w.shape[1])
                    if fitted is None:
                        sens.kld[name][sc.name] = math.inf
                        bar.update(1)
                        continue
                    set_module(model, name, QuantLinear(quantize(w, fitted), getattr(mod, "bias", None), kernel="dequant"))
                    total = 0.0
                    with torch.no_grad():
                        for k, i in enumerate(range(0, ids.shape[0], batch_size)):
                            if replay is not None:
                                replay.out = outs[b - 1][k]
                            logits = model(input_ids=ids[i:i + batch_size], use_cache=False).logits
                            total += _kl(ref[k], logits)
                    sens.kld[name][sc.name] = total / ids.numel()
                    bar.update(1)
            finally:
                set_module(model, name, mod)
                for i in range(b):
                    blocks[i] = originals[i]
    finally:
        for i, blk in enumerate(originals):
            blocks[i] = blk
        bar.close()
    if head:
        sens.head = _measure_head(model, ids, batch_size, ref, HEAD_OPTIONS)
        sens.head_bytes = {o: head_bytes(model, o) for o in sens.head}
    return sens


# ----------------------------------------------------------------------------- budgets
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(b|kb|mb|gb|kib|mib|gib|bpw)\s*$", re.I)
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str, n_params: int) -> int:
    """Bytes from "70MB", "66.5MiB", "1.2GB" or "4.5bpw" (bits per parameter of the whole model)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise SchemeError(f"cannot read the budget {text!r}: write e.g. 70MB, 66.5MiB or 4.5bpw")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "bpw":
        return int(value * n_params / 8)
    return int(value * _UNITS[unit])


# ----------------------------------------------------------------------------- plans
@dataclass
class Plan:
    """One scheme per layer; `rules` are what `qk.quantize(..., rules=)` / `--plan` apply."""

    choice: dict[str, str]  # layer -> scheme name
    method: str = "rtn"
    head: str = "bf16"
    budget_bytes: int | None = None
    size_bytes: int = 0  # exact model.safetensors bytes of the planned model
    predicted_kld: float = 0.0
    measured: dict = field(default_factory=dict)

    def __post_init__(self):
        if HEAD in self.choice:  # the head's storage was planned
            self.head = self.choice[HEAD]

    def layer_choice(self) -> dict[str, str]:
        return {n: s for n, s in self.choice.items() if n != HEAD}

    def rules(self) -> tuple[Rule, ...]:
        return tuple(Rule(_literal(n), parse_scheme(s), self.method) for n, s in self.layer_choice().items())

    def config(self) -> QuantConfig:
        layers = list(self.layer_choice().values())
        return make_config(max(layers, key=layers.count), self.method, self.head, self.rules())

    def counts(self) -> dict[str, int]:
        """Layers per scheme (the head's storage is `head`)."""
        out: dict[str, int] = {}
        for s in self.layer_choice().values():
            out[s] = out.get(s, 0) + 1
        return out

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, "method": getattr(self.method, "name", self.method), "head": self.head,
                           "budget_bytes": self.budget_bytes, "size_bytes": self.size_bytes,
                           "predicted_kld": self.predicted_kld, "measured": self.measured,
                           "counts": self.counts(), "layers": self.layer_choice()}, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise QuantkitError(f"cannot read the plan {path}: {e}") from None
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT or not isinstance(d.get("layers"), dict):
            raise QuantkitError(f"{path} is not a quantkit plan (expected format {PLAN_FORMAT}); make one with quantkit plan")
        for s in set(d["layers"].values()):
            parse_scheme(s)
        return cls(dict(d["layers"]), d.get("method", "rtn"), d.get("head", "bf16"), d.get("budget_bytes"),
                   int(d.get("size_bytes", 0)), float(d.get("predicted_kld", 0.0)), d.get("measured", {}))


def _literal(name: str) -> str:
    """An fnmatch pattern that matches exactly `name`."""
    return re.sub(r"([*?\[\]])", r"[\1]", name)


def plan_size(model: nn.Module, choice: dict[str, str], head: str, method: str = "rtn") -> int:
    """Exact bytes of model.safetensors for the model quantized with this per-layer choice
    (`choice[HEAD]`, when present, overrides `head`)."""
    from .io.checkpoint import expected_weights_bytes

    return expected_weights_bytes(model, Plan(choice, method, head).config())


MAX_CELLS = 2_000_000  # DP capacity above which the unit is coarsened (then sizes are rounded up)


def dp_unit(sens: Sensitivity, room: int) -> int:
    """The byte unit of the DP: the gcd of every option's size (the DP is then exact), coarsened
    only if the budget would need more than MAX_CELLS cells."""
    g = 0
    for n in sens.units():
        for s in sens.options(n):
            g = math.gcd(g, sens.bytes(n, s))
    g = max(g, 1)
    if room // g > MAX_CELLS:
        g *= -(-room // g // MAX_CELLS)
        log.info("allocation in units of %d bytes (layer sizes rounded up)", g)
    return g


def allocate(sens: Sensitivity, budget: int, fixed: int, unit: int | None = None) -> dict[str, str] | None:
    """Scheme per layer minimising the summed KL with sum(bytes) <= budget - fixed: dynamic
    programming over the budget in units of `unit` bytes (default `dp_unit`: exact), sizes
    rounded up; None when even the smallest choices do not fit."""
    if budget - fixed < 0:
        return None
    unit = unit or dp_unit(sens, budget - fixed)
    cap = (budget - fixed) // unit
    if cap < 0:
        return None
    INF = float("inf")
    dp = torch.full((cap + 1,), INF, dtype=torch.float64)
    dp[0] = 0.0
    back = []
    units = sens.units()
    for layer in units:
        opts = [(s, -(-sens.bytes(layer, s) // unit), max(0.0, sens.damage(layer, s))) for s in sens.options(layer)]
        new = torch.full_like(dp, INF)
        arg = torch.full((cap + 1,), -1, dtype=torch.int16)
        for k, (_, c, d) in enumerate(opts):
            if c > cap:
                continue
            cand = torch.full_like(dp, INF)
            cand[c:] = dp[:cap + 1 - c] + d
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.tensor(k, dtype=torch.int16), arg)
        dp = new
        back.append((opts, arg))
    if not torch.isfinite(dp).any():
        return None
    j = int(torch.argmin(dp))
    choice = {}
    for layer, (opts, arg) in zip(reversed(units), reversed(back)):
        k = int(arg[j])
        s, c, _ = opts[k]
        choice[layer] = s
        j -= c
    return dict(reversed(list(choice.items())))


def predicted_kld(sens: Sensitivity, choice: dict[str, str]) -> float:
    return sum(sens.damage(n, s) for n, s in choice.items() if n in sens.kld or (n == HEAD and s in sens.head))


def with_head(sens: Sensitivity, head: str | None) -> Sensitivity:
    """`sens` whose HEAD unit plans the head (head None) or is pinned to `head`."""
    if head is None or not sens.head:
        return sens
    from dataclasses import replace

    if head in sens.head:
        return replace(sens, head={head: sens.head[head]}, head_bytes={head: sens.head_bytes[head]})
    return replace(sens, head={}, head_bytes={})


def smallest_size(model: nn.Module, sens: Sensitivity, head: str | None = None) -> int:
    """Exact bytes of the smallest plan (head None: planned when measured, else bf16)."""
    sens = with_head(sens, head)
    choice = {n: min(sens.options(n), key=lambda s: sens.bytes(n, s)) for n in sens.units()}
    return plan_size(model, choice, head or "bf16")


def plan_for_budget(model: nn.Module, sens: Sensitivity, budget: int, head: str | None = None, method: str = "rtn",
                    unit: int | None = None) -> Plan:
    """The least-damage plan whose exact checkpoint size is at most `budget` bytes; the head's
    storage is planned too when `sens` measured it and `head` is None, else it is `head` (bf16)."""
    sens = with_head(sens, head)
    smallest = smallest_size(model, sens, head)
    head = head or "bf16"
    first = {n: sens.options(n)[0] for n in sens.units()}
    fixed = plan_size(model, first, head) - sum(sens.bytes(n, s) for n, s in first.items())  # norms, header (+head)
    if budget < smallest:
        raise SchemeError(f"a budget of {budget:,} bytes is below the smallest size these schemes reach: "
                          f"{smallest:,} bytes ({smallest / 1e6:.2f} MB); raise the budget or add smaller schemes")
    target = budget
    step = unit or dp_unit(sens, max(budget - fixed, 1))
    for r in range(12):  # the safetensors header (a few KB) varies with the choice: tighten until it fits
        choice = allocate(sens, target, fixed, unit)
        if choice is None:
            break
        size = plan_size(model, choice, head, method)
        if size <= budget:
            return Plan(choice, method, head, budget, size, predicted_kld(sens, choice))
        target -= max(size - budget, step) * 2**r
    raise SchemeError(f"no plan fits {budget:,} bytes (smallest reachable: {smallest:,} bytes)")


def layer_names(model: nn.Module) -> list[str]:
    _, out_name, _ = head_modules(model)
    return [n for n, m in model.named_modules() if linear_weight(m) is not None and n != out_name]


# ----------------------------------------------------------------------------- accuracy targets
def measure_plan(model: nn.Module, plan: Plan, windows: torch.Tensor, reference, calib=None) -> dict:
    """Quantize with `plan` and measure KL / perplexity against `reference` (a ReferenceCache)."""
    from . import quantize as qk_quantize
    from .evaluate.quality import score

    qm = qk_quantize(model, plan.config(), calib=calib, progress=False)
    r = score(qm, windows, reference=reference, progress=False)
    return {"kld": r["kl_divergence"], "perplexity": r["perplexity"],
            "ppl_increase": r["perplexity"] / reference.perplexity - 1, "tokens": r["tokens"]}


def plan_for_target(model: nn.Module, sens: Sensitivity, windows: torch.Tensor, max_kld: float | None = None,
                    max_ppl_increase: float | None = None, head: str | None = None, method: str = "rtn", calib=None,
                    rounds: int = 6, progress: bool = True) -> Plan:
    """The smallest plan whose *measured* KL (or perplexity increase) on `windows` meets the
    target: search the budget for the smallest plan whose predicted KL meets a working target,
    measure it, and tighten the working target by the measured/predicted ratio until it holds."""
    from .evaluate.quality import ReferenceCache

    if (max_kld is None) == (max_ppl_increase is None):
        raise SchemeError("give exactly one accuracy target: max_kld or max_ppl_increase")
    if (max_kld is not None and max_kld <= 0) or (max_ppl_increase is not None and max_ppl_increase <= 0):
        raise SchemeError("the accuracy target must be positive")
    reference = ReferenceCache(model, windows, progress=False)
    sens = with_head(sens, head)
    lo = smallest_size(model, sens, head)
    hi = plan_size(model, {n: _largest(sens, n) for n in sens.units()}, head or "bf16")
    key, limit = ("kld", max_kld) if max_kld is not None else ("ppl_increase", max_ppl_increase)
    # working target on the predicted (summed) KL; a perplexity increase p is a mean log-loss
    # increase of log(1 + p), which the KL bounds to first order
    work = max_kld if max_kld is not None else math.log1p(max_ppl_increase)
    tried = []
    for _ in tqdm(range(rounds), desc="plan rounds", disable=not progress):
        plan = _smallest_within(model, sens, work, lo, hi, head, method)
        m = measure_plan(model, plan, windows, reference, calib)
        plan.measured = m
        tried.append(plan)
        if m[key] <= limit:
            return plan
        work = min(work, plan.predicted_kld) * min(0.9, max(0.25, limit / max(m[key], 1e-12)))
    best = tried[-1]
    raise SchemeError(f"no plan met {key} <= {limit} after {rounds} rounds (last: {key} {best.measured[key]:.4g} at "
                      f"{best.size_bytes:,} bytes); add a larger scheme (e.g. int8) or relax the target")


def _largest(sens: Sensitivity, unit: str) -> str:
    return max(sens.options(unit), key=lambda s: sens.bytes(unit, s))


def _smallest_within(model, sens, work, lo, hi, head, method) -> Plan:
    """Binary search on the budget for the smallest plan whose predicted KL is <= work."""
    best = plan_for_budget(model, sens, hi, head, method)
    if best.predicted_kld > work:
        return best
    a, b = lo, hi
    while b - a > max(1024, lo // 2000):
        mid = (a + b) // 2
        p = plan_for_budget(model, sens, mid, head, method)
        if p.predicted_kld <= work:
            best, b = p, mid
        else:
            a = mid
    return best


# ----------------------------------------------------------------------------- cheap proxy
def proxy_sensitivity(model: nn.Module, calib: torch.Tensor, schemes, batch_size: int = 4,
                      progress: bool = True, head: bool = True) -> Sensitivity:
    """A cheaper damage estimate: for each layer and scheme, the output error the quantized
    weight makes on the calibration inputs, tr(dW H dWᵀ) / 2 with H = 2/n Σ x xᵀ the layer's
    input Hessian (one float forward pass collects every H; no forward pass per layer). Same
    shape as `measure_sensitivity`'s result, in its own units (squared output error per row)."""
    from .algorithms.hessian import HessianAccumulator

    schemes = [parse_scheme(s) for s in (schemes.split(",") if isinstance(schemes, str) else schemes)]
    _refuse_experts(model)
    fam = family_of(model)
    blocks = blocks_of(model, fam)
    names = [(f"{fam.blocks}.{b}.{n}", m) for b, blk in enumerate(blocks) for n, m in blk.named_modules()
             if linear_weight(m) is not None]
    _, out_name, _ = head_modules(model)
    out_mod = model.get_submodule(out_name) if head and out_name and linear_weight(model.get_submodule(out_name)) is not None else None
    hooked = names + ([(HEAD, out_mod)] if out_mod is not None else [])
    acc = {n: HessianAccumulator() for n, _ in hooked}
    ids = calib.to(torch.long)
    _forward_with_hooks(model, ids, batch_size,
                        [m.register_forward_hook(lambda mod, args, out, n=n: acc[n].add(args[0].detach())) for n, m in hooked])
    sens = Sensitivity([sc.name for sc in schemes], [n for n, _ in names], {}, {}, tokens=int(ids.numel()))
    if out_mod is not None:  # the head's own output error (its embedding use is not counted)
        w = linear_weight(out_mod).detach().float()
        H = acc.pop(HEAD).hessian.float()
        for opt in HEAD_OPTIONS:
            dw = quantize(w, head_scheme(opt, linear_weight(out_mod).dtype)).dequantize() - w
            sens.head[opt] = float(((dw @ H) * dw).sum() / 2)
            sens.head_bytes[opt] = head_bytes(model, opt)
    for name, mod in tqdm(names, desc="proxy", unit="layer", disable=not progress):
        w = linear_weight(mod).detach().float()
        H = acc.pop(name).hessian.float()  # [in, in]
        sens.shapes[name] = tuple(w.shape)
        sens.kld[name] = {}
        for sc in schemes:
            fitted = fitted_scheme(sc, w.shape[1])
            if fitted is None:
                sens.kld[name][sc.name] = math.inf
                continue
            dw = quantize(w, fitted).dequantize() - w  # [out, in]
            sens.kld[name][sc.name] = float(((dw @ H) * dw).sum() / 2)
    return sens


def rank_correlation(a: Sensitivity, b: Sensitivity) -> float:
    """Spearman's rho between two sensitivities over every (layer, scheme) both measured."""
    pairs = [(a.kld[n][s], b.kld[n][s]) for n in a.layers if n in b.kld for s in a.schemes
             if s in b.kld[n] and math.isfinite(a.kld[n][s]) and math.isfinite(b.kld[n][s])]
    pairs += [(a.head[s], b.head[s]) for s in a.head if s in b.head]
    if len(pairs) < 3:
        raise QuantkitError("too few common measurements to correlate")
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))
