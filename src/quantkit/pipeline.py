"""Walk a model, choose each layer's scheme, run the algorithm on it, swap in QuantLinear.

Data-free methods (RTN, LLM.int8) need no activations, so the walk is a plain loop over the
Linear layers of any transformers model (no per-architecture code). Calibrated methods hand
the layers inside the model's blocks to `calibrate.quantize_blocks`, which feeds calibration
activations block by block.
"""
from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import algorithms
from .errors import QuantkitError, SchemeError
from .formats import QuantizedWeight, quantize
from .formats.integer import with_act_range
from .nn import QuantEmbedding, QuantLinear
from .scheme import PER_TENSOR, QuantConfig, Rule, Scheme, parse_scheme

log = logging.getLogger(__name__)


@dataclass
class QuantInfo:
    """What was done to a model; saved with the checkpoint and shown in reports."""

    config: QuantConfig
    layers: dict[str, str] = field(default_factory=dict)  # layer name -> scheme name actually stored
    methods: dict[str, str] = field(default_factory=dict)  # layer name -> method
    errors: dict[str, float] = field(default_factory=dict)  # layer name -> relative weight error
    head: dict = field(default_factory=dict)  # {"embedding": name, "head": name, "tied": bool, "scheme": str}
    fallbacks: dict[str, int] = field(default_factory=dict)  # "int4-g128 -> int4-g64 (width 576)" -> count


def linear_weight(mod: nn.Module) -> torch.Tensor | None:
    """The [out, in] weight of an nn.Linear or transformers' Conv1D ([in, out]); else None."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.weight.t()
    return None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _getter(model: nn.Module, attr: str) -> nn.Module | None:
    fn = getattr(model, attr, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError):
        return None


def head_modules(model: nn.Module) -> tuple[str | None, str | None, bool]:
    """Qualified names of the input embedding and output head, and whether they are tied.

    Works on float and quantized models alike: a quantized tied head is the QuantLinear its
    QuantEmbedding holds (`emb.linear`), reachable under two names; the shorter one is the head's."""
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if id(m) not in names or n.count(".") < names[id(m)].count("."):
            names[id(m)] = n
    emb, out = _getter(model, "get_input_embeddings"), _getter(model, "get_output_embeddings")
    emb_name = names.get(id(emb)) if emb is not None else None
    out_name = names.get(id(out)) if out is not None else None
    tied = emb is not None and out is not None and (
        out is getattr(emb, "linear", None)
        or (getattr(emb, "weight", None) is not None and emb.weight is getattr(out, "weight", None)))
    return emb_name, out_name, tied


def quantized_summary(model: nn.Module) -> str | None:
    """The schemes a quantized model stores ("int8", "int4-g128 x 180, int8 x 30"), or None for a
    float model (no `.quantkit` and no quantized modules)."""
    info = getattr(model, "quantkit", None)
    if info is not None:
        counts = Counter(info.layers.values())
    else:
        inner = {id(m.linear) for m in model.modules() if isinstance(m, QuantEmbedding)}
        counts = Counter(m.scheme.name for m in model.modules() if isinstance(m, QuantLinear) and id(m) not in inner)
        if not counts and not inner:
            return None
    if len(counts) <= 1:
        return next(iter(counts), "none")
    return ", ".join(f"{s} x {n}" for s, n in counts.most_common())


def check_float(model: nn.Module) -> None:
    """Refuse a model that is already quantized: its Linears are gone, there is nothing to quantize."""
    stored = quantized_summary(model)
    if stored is not None:
        head = getattr(getattr(model, "quantkit", None), "head", None) or {}
        extra = f", embeddings/head {head['scheme']}" if head.get("scheme") else ""
        raise QuantkitError(f"this model is already quantized (scheme {stored}{extra}); quantize the float model "
                            "instead (load the original, not the quantized checkpoint)")


def first_rule(name: str, rules: "tuple[Rule, ...]") -> Rule | None:
    return next((r for r in rules if r.matches(name)), None)


HEAD_STORAGES = ("bf16", "fp16", "fp32", "int8")  # schemes a rule may give the embedding table / output head


def head_storage(cfg: QuantConfig, emb_name: str | None, out_name: str | None) -> str:
    """How the embedding table and output head are stored (one storage for both, as `cfg.head`):
    the first rule naming either of them with scheme None keeps them in their original
    precision ("keep"), with bf16/fp16/fp32/int8 stores them so (rules with other schemes do not
    apply to them; `check_rules` refuses one that names nothing else); else `cfg.head`."""
    names = [n for n in (out_name, emb_name) if n]
    for r in cfg.rules:
        if any(r.matches(n) for n in names) and (r.scheme is None or r.scheme.name in HEAD_STORAGES):
            return "keep" if r.scheme is None else r.scheme.name
    return cfg.head


def _name_summary(names: list[str], limit: int = 16) -> str:
    """Names with block indices folded ("model.layers.*.mlp.down_proj (30)"), at most `limit` shown."""
    groups = Counter(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names)
    items = [p if c == 1 else f"{p} ({c})" for p, c in groups.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_rules(cfg: QuantConfig, layers: list[str], emb_name: str | None, out_name: str | None) -> None:
    """Refuse a rule that names nothing in the model (a typo or another model's plan would
    otherwise be ignored and its layers quantized silently). `layers`: the quantizable Linears."""
    heads = [n for n in (out_name, emb_name) if n]
    for r in cfg.rules:
        if any(r.matches(n) for n in layers):
            continue
        named = [n for n in heads if r.matches(n)]
        if named and (r.scheme is None or r.scheme.name in HEAD_STORAGES):
            continue
        target = "keep" if r.scheme is None else r.scheme.name
        if named:
            raise SchemeError(f"rule {r.pattern!r} -> {target} names only {named[0]}, which is stored as bf16, fp16, "
                              f"fp32 or int8 (head=...), or kept in its original precision (a rule with scheme None)")
        raise SchemeError(f"rule {r.pattern!r} -> {target} (from rules= or a plan) matches no layer of this model; "
                          f"its layers are: "
                          f"{_name_summary(layers + heads)} (a bare name such as down_proj names every layer ending in it)")


def quantizable_layers(model: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """(name, [out, in]) of every Linear / Conv1D the pipeline quantizes (the output head is the
    head's, see `head_storage`). Names and shapes only: streamed blocks' weights must be freeable."""
    _, out_name, _ = head_modules(model)
    return [(n, tuple(linear_weight(m).shape)) for n, m in model.named_modules()
            if linear_weight(m) is not None and n != out_name]


def resolve_targets(model: nn.Module, cfg: QuantConfig, layers: "list[tuple[str, tuple[int, int]]] | None" = None
                    ) -> list[tuple[str, tuple[int, int], Scheme | None, str, Scheme | None]]:
    """The one resolution of a config against a model, before anything is touched: refuses a
    quantized model and rules that name nothing, then (name, shape, scheme stored, method,
    scheme asked) per layer of `layers` (default `quantizable_layers(model)`)."""
    check_float(model)
    layers = quantizable_layers(model) if layers is None else layers
    emb_name, out_name, _ = head_modules(model)
    check_rules(cfg, [n for n, _ in layers], emb_name, out_name)
    return [(n, shape, *resolve_layer(n, shape, cfg)) for n, shape in layers]


def record_fallbacks(info: QuantInfo, resolved) -> None:
    """Count (and log) the layers whose group size fell back, from `resolve_targets`' result."""
    for _, shape, scheme, _, asked in resolved:
        if scheme is not None and scheme != asked:
            key = f"{asked.name} -> {scheme.name} (input width {shape[1]})"
            info.fallbacks[key] = info.fallbacks.get(key, 0) + 1
    for key, count in info.fallbacks.items():
        log.warning("%d layers: %s, because the group size does not divide the width "
                    "(strict_groups=True refuses instead)", count, key)


def resolve_layer(name: str, shape: tuple[int, int], cfg: QuantConfig) -> tuple[Scheme | None, str, Scheme | None]:
    """(scheme stored, method, scheme asked) for one layer: first matching rule, else the default."""
    scheme, method = cfg.scheme, cfg.method
    rule = first_rule(name, cfg.rules)
    if rule is not None:
        scheme, method = rule.scheme, rule.method
    if scheme is None:
        return None, method, None
    fitted = scheme if cfg.strict_groups else scheme.fallback_for(shape[1])
    if fitted is None:
        raise SchemeError(
            f"{name}: no group size of 32 or more divides its input width {shape[1]} "
            f"(asked {scheme.name}); use a per-channel scheme such as int{scheme.bits}"
        )
    fitted.validate_for(shape, name)
    return fitted, method, scheme


def _head_scheme(head: str, dtype: torch.dtype) -> Scheme | None:
    if head == "keep":
        return parse_scheme({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"))
    return parse_scheme(head)


def validate_config(cfg: QuantConfig) -> None:
    """Checks that need the algorithm registry (scheme.py cannot see it): run before long work."""
    algorithms.get(cfg.method).check(cfg.scheme)
    for rule in cfg.rules:
        if rule.scheme is not None:
            algorithms.get(rule.method).check(rule.scheme)


def needs_calibration(cfg: QuantConfig) -> bool:
    """True when the config needs calibration data: a method that gathers statistics (gptq),
    a scheme that freezes activation ranges (w8a8-static-*), or SmoothQuant."""
    methods = {cfg.method} | {r.method for r in cfg.rules if r.scheme is not None}
    schemes = [cfg.scheme] + [r.scheme for r in cfg.rules if r.scheme is not None]
    return cfg.smooth is not None or any(algorithms.get(m).needs for m in methods) or any(s.needs for s in schemes)


def quantize_model(model: nn.Module, cfg: QuantConfig, inplace: bool = False, progress: bool = True,
                   calib: torch.Tensor | None = None, batch_size: int = 8, loader=None) -> nn.Module:
    """Quantize every Linear of `model` under `cfg`; returns the model with `.quantkit` info.

    Methods that need statistics (GPTQ) take `calib` token ids [N, L] and run block by block
    (see `calibrate.py`); data-free methods walk the Linears directly. `loader` (from
    io.offload.open_streaming) materializes each block's float weights only when it is reached.
    """
    validate_config(cfg)
    if loader is not None and not needs_calibration(cfg):
        raise SchemeError("streaming from disk (offload) is for calibrated methods such as gptq; "
                          "rtn needs no streaming: load the model and quantize it")
    resolved = resolve_targets(model, cfg)  # the model, every layer and every rule checked before any is touched
    if not resolved:
        raise SchemeError("this model has no Linear layers to quantize")
    for _, _, scheme, method, _ in resolved:
        if scheme is not None:
            algorithms.get(method).check(scheme)
    if not inplace and loader is None:
        model = copy.deepcopy(model)
    info = QuantInfo(cfg)
    emb_name, out_name, tied = head_modules(model)
    record_fallbacks(info, resolved)
    plans = [(name, scheme, method) for name, _, scheme, method, _ in resolved]
    if needs_calibration(cfg):
        from .calibrate import quantize_blocks

        if calib is None:
            raise SchemeError(f"method {cfg.method} needs calibration data: pass calib token ids (--calib PATH)")
        done = quantize_blocks(model, {n: (sc, m) for n, sc, m in plans}, calib, cfg, info,
                               batch_size=batch_size, progress=progress, loader=loader)
        plans = [p for p in plans if p[0] not in done]
    for name, scheme, method in tqdm(plans, desc=f"quantize {cfg.scheme.name} ({cfg.method})",
                                     disable=not progress or not plans, unit="layer"):
        if scheme is None:
            continue
        mod = model.get_submodule(name)
        if algorithms.get(method).needs:  # outside the known blocks: no statistics were gathered
            log.warning("%s is outside the model's blocks; quantized with rtn instead of %s", name, method)
            method = "rtn"
        if scheme.needs:  # a static activation range needs calibration inputs; none reach this layer
            log.warning("%s is outside the model's blocks; its activations are quantized per token at run "
                        "time (w8a8-dynamic) instead of %s", name, scheme.name)
            scheme = parse_scheme("w8a8-dynamic")
        swap_quantized(model, name, mod, scheme, method, {}, info)
    _quantize_head(model, cfg, info, emb_name, out_name, tied, from_file=loader is not None)
    model.quantkit = info
    return model


def swap_quantized(model, name, mod, scheme, method, stats, info: QuantInfo) -> None:
    """Run `method` on one layer's weight and put a QuantLinear in its place."""
    w = linear_weight(mod).detach().float()
    qw = algorithms.get(method).fn(w, scheme, stats)
    if "act_range" in stats:  # static activation scheme: freeze the observed input range with the weight
        qw = with_act_range(qw, *stats["act_range"])
    info.errors[name] = relative_error(w, qw)
    _set_module(model, name, QuantLinear(qw, getattr(mod, "bias", None)))
    info.layers[name], info.methods[name] = scheme.name, method


def relative_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    return float((w - qw.dequantize()).norm() / w.norm().clamp(min=1e-12))


def _quantize_head(model, cfg: QuantConfig, info: QuantInfo, emb_name, out_name, tied, from_file=False) -> None:
    """Store the embedding table and output head as `head_storage` says (`cfg.head`, 16-bit by
    default, unless a rule names them). `from_file`:
    a streamed model's table/head may still be views of the memory-mapped float file."""
    emb = model.get_submodule(emb_name) if emb_name else None
    out = model.get_submodule(out_name) if out_name else None
    ref = emb if emb is not None else out
    if ref is None:
        return
    scheme = _head_scheme(head_storage(cfg, emb_name, out_name), ref.weight.dtype)
    info.head = {"embedding": emb_name, "head": out_name, "tied": tied, "scheme": scheme.name}
    if emb is not None and isinstance(emb, nn.Embedding):
        qe = QuantEmbedding(quantize_table(emb.weight.detach().float(), scheme, from_file), emb.padding_idx,
                            out_dtype=emb.weight.dtype if emb.weight.is_floating_point() else torch.float32,
                            embed_scale=getattr(emb, "embed_scale", None))
        _set_module(model, emb_name, qe)
        if tied and out is not None:
            _set_module(model, out_name, qe.linear)  # one table, two uses
            return
    if out is not None and linear_weight(out) is not None:
        w = linear_weight(out).detach().float()
        _set_module(model, out_name, QuantLinear(quantize_table(w, scheme, from_file), getattr(out, "bias", None)))


TABLE_CHUNK_ROWS = 4096  # rows of a memory-mapped table read (and dropped again) at a time


def _rows_independent(scheme: Scheme) -> bool:
    """Does each output row's stored form depend on that row alone (so rows can go in chunks)?"""
    return scheme.kind in ("float", "fp8") or (scheme.kind == "int" and scheme.group_size != PER_TENSOR
                                               and not scheme.needs)


def quantize_table(w: torch.Tensor, scheme: Scheme, from_file: bool = False,
                   rows: "int | None" = None) -> QuantizedWeight:
    """`quantize(w, scheme)`, byte for byte. With `from_file`, a `w` that is a view of a
    memory-mapped file (a streamed model's embedding table or head, see io.offload, which never
    writes to it) goes `rows` rows at a time, each chunk's file pages dropped from the resident
    set once it is quantized, so the float table is never resident whole beside its quantized
    copy (`rows` defaults to TABLE_CHUNK_ROWS). Not for tensors the caller may have written to:
    dropping the pages of a private file mapping also drops writes to them."""
    from .memory import file_backed, release_file_pages

    n, rows = int(w.shape[0]), rows or TABLE_CHUNK_ROWS
    if (not from_file or n <= rows or not _rows_independent(scheme) or not w.is_contiguous()
            or not file_backed([w])[0]):
        return quantize(w, scheme)
    out: dict[str, torch.Tensor] = {}
    for i in range(0, n, rows):
        chunk = w[i:i + rows]
        part = quantize(chunk, scheme)
        release_file_pages(chunk)
        if any(t.dim() == 0 or t.shape[0] != chunk.shape[0] for t in part.tensors.values()):
            return quantize(w, scheme)  # a part not stored row by row: quantize the table whole
        for k, t in part.tensors.items():
            if k not in out:
                out[k] = torch.empty((n, *t.shape[1:]), dtype=t.dtype)
            out[k][i:i + chunk.shape[0]] = t
    return QuantizedWeight(scheme, (n, int(w.shape[1])), out)


def summarize(info: QuantInfo) -> dict:
    """Counts of stored schemes (for logs and reports)."""
    return dict(Counter(info.layers.values()))
