"""Model surgery: the one walk over a model's quantizable layers and the scheme each resolves
to, the embedding table and output head, tied tensors, and setting submodules.

Everything that quantizes, estimates, trains or loads a model goes through `iter_targets`
(rules, group fallbacks, the head's storage), so the answer to "which layers, stored how"
is computed in one place. `cfg` below is a config.QuantConfig (read here, never built).
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from typing import NamedTuple

import torch
from torch import nn

from .errors import QuantkitError, SchemeError
from .nn import QuantEmbedding, QuantLinear
from .nn.experts import ExpertLinears
from .nn.weights import linear_weight
from .scheme import Scheme, parse_scheme

log = logging.getLogger(__name__)

__all__ = ["linear_weight", "set_module", "layer_module", "fused_experts", "split_experts", "fused_parameters", "set_activations", "head_modules", "tied_embeddings", "quantized_summary", "check_float", "head_storage",
           "head_scheme", "check_rules", "quantizable_layers", "Target", "iter_targets", "resolve_layer",
           "tensor_key", "unique_tensors", "fallbacks", "HEAD_STORAGES"]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` of `model`."""
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


def tied_embeddings(model: nn.Module, emb: nn.Module) -> list[str]:
    """Names of the other embedding modules that hold `emb`'s very table (T5's
    encoder/decoder.embed_tokens share `shared`): a swapped table must replace them too, or
    they keep (and run on) the float copy."""
    w = getattr(emb, "weight", None)
    if w is None:
        return []
    return [n for n, m in model.named_modules() if m is not emb and isinstance(m, nn.Embedding) and m.weight is w]


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


def set_activations(model: nn.Module, mode: str = "int8") -> tuple[int, int]:
    """Run every quantized Linear of `model` with activation mode `mode`: "int8" quantizes each
    layer's input per block to int8 and multiplies in integers at decode (the explicit,
    approximate speed option of quantkit's native kernels; prefill-sized calls stay exact),
    "int8-all" does so for every call (perplexity then measures the decode numerics), "exact"
    (the default of every layer) goes back.
    Returns (layers that run `mode`, quantized layers in all); layers whose kernel or layout has
    no int8 path (fp8, torch-ops kernels, groups not a multiple of 32) stay exact, said in one log line."""
    layers = {id(m): m for m in model.modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise QuantkitError("the model has no quantized layers: set_activations applies to a quantized model")
    ran = {i: m.set_activations(mode) for i, m in layers.items()}
    done = sum(ran.values())
    if done < len(layers):
        kept = Counter(f"{m.scheme.name} ({m.kernel.name})" for i, m in layers.items() if not ran[i])
        log.info("activations %s: %d of %d layers; exact: %s", mode, done, len(layers),
                 ", ".join(f"{k} x {n}" for k, n in kept.most_common()))
    return done, len(layers)


def check_float(model: nn.Module) -> None:
    """Refuse a model that is already quantized: its Linears are gone, there is nothing to quantize."""
    stored = quantized_summary(model)
    if stored is not None:
        head = getattr(getattr(model, "quantkit", None), "head", None) or {}
        extra = f", embeddings/head {head['scheme']}" if head.get("scheme") else ""
        raise QuantkitError(f"this model is already quantized (scheme {stored}{extra}); quantize the float model "
                            "instead (load the original, not the quantized checkpoint)")


HEAD_STORAGES = ("bf16", "fp16", "fp32", "int8")  # schemes a rule may give the embedding table / output head


def head_storage(cfg, emb_name: str | None, out_name: str | None) -> str:
    """How the embedding table and output head are stored (one storage for both, as `cfg.head`):
    the first rule naming either of them with scheme None keeps them in their original
    precision ("keep"), with bf16/fp16/fp32/int8 stores them so (rules with other schemes do not
    apply to them; `check_rules` refuses one that names nothing else); else `cfg.head`."""
    names = [n for n in (out_name, emb_name) if n]
    for r in cfg.rules:
        if any(r.matches(n) for n in names) and (r.scheme is None or r.scheme.name in HEAD_STORAGES):
            return "keep" if r.scheme is None else r.scheme.name
    return cfg.head


def head_scheme(head: str, dtype: torch.dtype) -> Scheme:
    """The scheme a head storage ("keep", "bf16", "int8", ...) stores a table of `dtype` in."""
    if head == "keep":
        return parse_scheme({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"))
    return parse_scheme(head)


def _name_summary(names: list[str], limit: int = 16) -> str:
    """Names with block indices folded ("model.layers.*.mlp.down_proj (30)"), at most `limit` shown."""
    groups = Counter(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names)
    items = [p if c == 1 else f"{p} ({c})" for p, c in groups.items()]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_rules(cfg, layers: list[str], emb_name: str | None, out_name: str | None) -> None:
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


def _fused(mod: nn.Module) -> list[str]:
    """Names of `mod`'s own 3-D parameters that hold one weight per expert ([E, ., .] with E
    its `num_experts`): transformers' fused experts (Mixtral, Qwen3-MoE, gpt-oss, DeepSeek)."""
    e = getattr(mod, "num_experts", None)
    if not isinstance(e, int) or isinstance(mod, ExpertLinears):
        return []
    return [n for n, p in mod.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == e]


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module, list[str], bool]]:
    """(module name, module, fused parameter names, transposed) of every experts module whose
    experts are still fused 3-D parameters. `transposed` is the layout transformers' experts
    decorator declares ([E, in, out], multiplied as x @ W[e]); a module that declares none is
    refused: quantizing a weight read the wrong way round would be silently wrong."""
    return [(name, mod, params, _transposed(name, mod, params))
            for name, mod in model.named_modules() if (params := _fused(mod))]


def _transposed(name: str, mod: nn.Module, params: list[str]) -> bool:
    if not hasattr(mod, "is_transposed"):
        raise SchemeError(f"{name} ({type(mod).__name__}) stores its experts as 3-D tensors "
                          f"({', '.join(params)}) without declaring their layout (transformers' "
                          "use_experts_implementation); quantkit cannot quantize this mixture-of-experts yet")
    return bool(mod.is_transposed)


def _expert_shape(p: torch.Tensor, transposed: bool) -> tuple[int, int]:
    return (int(p.shape[2]), int(p.shape[1])) if transposed else (int(p.shape[1]), int(p.shape[2]))


def split_experts(model: nn.Module) -> int:
    """Replace every fused expert parameter by an `ExpertLinears` (one layer per expert, on views
    of the fused tensor: no copy), so that experts are quantized, calibrated and saved as layers
    named `<experts>.<param>.<e>`; the experts then run through the family's eager forward (the
    grouped implementations read the fused tensor whole). Returns the parameters split."""
    done = 0
    for name, mod, params, transposed in fused_experts(model):
        for p in params:
            w = getattr(mod, p)
            delattr(mod, p)
            setattr(mod, p, ExpertLinears.split(w.detach(), transposed))
            done += 1
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "_experts_implementation", "eager") not in (None, "eager"):
            cfg._experts_implementation = "eager"
    return done


def fused_parameters(model: nn.Module) -> set[str]:
    """State-dict names of the fused expert parameters not yet split (`<experts>.gate_up_proj`)."""
    return {f"{n}.{p}" for n, _, params, _ in fused_experts(model) for p in params}


def layer_module(model: nn.Module, name: str) -> nn.Module:
    """The module of a layer `quantizable_layers` names: the submodule itself, or for an expert
    of a parameter still fused (`<experts>.<param>.<e>`) an nn.Linear on a view of its slice
    (nothing is copied and `model` is left as it is)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        owner, _, rest = name.rpartition(".")
        parent, _, param = owner.rpartition(".")
        mod = model.get_submodule(parent)
        if param not in _fused(mod) or not rest.isdigit():
            raise
        w = getattr(mod, param).detach()
        return ExpertLinears.split(w[int(rest):int(rest) + 1], _transposed(parent, mod, [param])).layer(0)


def quantizable_layers(model: nn.Module) -> list[tuple[str, tuple[int, int]]]:
    """(name, [out, in]) of every Linear / Conv1D the pipeline quantizes (the output head is the
    head's, see `head_storage`), and of every expert of a fused experts parameter
    (`<experts>.<param>.<e>`, as `split_experts` names them). Names and shapes only: streamed
    blocks' weights must be freeable."""
    _, out_name, _ = head_modules(model)
    layers = []
    for n, m in model.named_modules():
        if linear_weight(m) is not None and n != out_name:
            layers.append((n, tuple(linear_weight(m).shape)))
        params = _fused(m)
        for p in params:
            w, transposed = getattr(m, p), _transposed(n, m, params)
            layers += [(f"{n}.{p}.{e}", _expert_shape(w, transposed)) for e in range(w.shape[0])]
    return layers


class Target(NamedTuple):
    """One quantizable layer as a config resolves it."""

    name: str
    shape: tuple[int, int]  # [out, in]
    scheme: "Scheme | None"  # stored (after a group fallback); None = kept in float
    method: object  # the algorithms.Method that chooses its values
    asked: "Scheme | None"  # the scheme the rule or default asked for


def resolve_layer(name: str, shape: tuple[int, int], cfg) -> tuple[Scheme | None, object, Scheme | None]:
    """(scheme stored, method, scheme asked) for one layer: first matching rule, else the default."""
    scheme, method = cfg.scheme, cfg.method
    rule = next((r for r in cfg.rules if r.matches(name)), None)
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


def iter_targets(model: nn.Module, cfg, layers: "list[tuple[str, tuple[int, int]]] | None" = None) -> list[Target]:
    """The one resolution of a config against a model, before anything is touched: refuses a
    quantized model and rules that name nothing, then a Target per layer of `layers` (default
    `quantizable_layers(model)`), each scheme validated for its shape once, here."""
    check_float(model)
    layers = quantizable_layers(model) if layers is None else layers
    emb_name, out_name, _ = head_modules(model)
    check_rules(cfg, [n for n, _ in layers], emb_name, out_name)
    return [Target(n, shape, *resolve_layer(n, shape, cfg)) for n, shape in layers]


def fallbacks(targets: list[Target]) -> dict[str, int]:
    """{"int4-g128 -> int4-g64 (input width 576)": count} of the targets whose group fell back."""
    out: dict[str, int] = {}
    for t in targets:
        if t.scheme is not None and t.scheme != t.asked:
            key = f"{t.asked.name} -> {t.scheme.name} (input width {t.shape[1]})"
            out[key] = out.get(key, 0) + 1
    return out


def tensor_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are the same memory viewed the same way (tied weights)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def unique_tensors(items) -> dict[str, torch.Tensor]:
    """{name: tensor} of (name, tensor) pairs, each tied tensor kept once (under its first name)."""
    seen, out = set(), {}
    for k, t in items:
        key = tensor_key(t)
        if key not in seen:
            seen.add(key)
            out[k] = t
    return out
