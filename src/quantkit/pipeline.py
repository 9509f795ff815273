"""Quantize a model: resolve each layer's scheme and method (modules.iter_targets), run the
block transforms and methods, swap in QuantLinear; the embedding table and head last.

Data-free methods (RTN, LLM.int8) need no activations, so the walk is a plain loop over the
Linear layers of any transformers model (no per-architecture code). When a method, scheme or
transform needs calibration data, `calibrate.block_statistics` walks the model's blocks and
yields each Linear's statistics; this module quantizes and swaps each one as it comes.
"""
from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms import method_of
from .calibrate import block_statistics, min_hessian_rows
from .config import QuantConfig
from .errors import SchemeError
from .formats import QuantizedWeight, quantize
from .formats.integer import with_act_range
from .memory import file_backed, release_file_pages
from .modules import (fallbacks, head_modules, head_scheme, head_storage, iter_targets, linear_weight, set_module,
                      split_experts, tied_embeddings)
from .nn import QuantEmbedding, QuantLinear
from .scheme import PER_TENSOR, Scheme, parse_scheme

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


def validate_config(cfg: QuantConfig) -> None:
    """Every method of `cfg` can store its scheme (make_config checks this too; a config built
    by hand is checked here, before long work)."""
    cfg.method.check(cfg.scheme)
    for rule in cfg.rules:
        if rule.scheme is not None:
            rule.method.check(rule.scheme)


def needs_calibration(cfg: QuantConfig) -> bool:
    """True when the config needs calibration data: a method that gathers statistics (gptq),
    a scheme that freezes activation ranges (w8a8-static-*), or a block transform (SmoothQuant)."""
    schemes = [cfg.scheme] + [r.scheme for r in cfg.rules if r.scheme is not None]
    return bool(cfg.transforms) or any(m.needs for m in cfg.methods()) or any(s.needs for s in schemes)


def record_fallbacks(info: QuantInfo, targets) -> None:
    """Count (and log) the layers whose group size fell back."""
    info.fallbacks.update(fallbacks(targets))
    for key, count in info.fallbacks.items():
        log.warning("%d layers: %s, because the group size does not divide the width "
                    "(strict_groups=True refuses instead)", count, key)


def quantize_model(model: nn.Module, cfg: QuantConfig, inplace: bool = False, progress: bool = True,
                   calib: torch.Tensor | None = None, batch_size: int = 8, loader=None) -> nn.Module:
    """Quantize every Linear of `model` under `cfg`; returns the model with `.quantkit` info.

    Methods that need statistics (GPTQ) take `calib` token ids [N, L] and run block by block
    (see `calibrate.py`); data-free methods walk the Linears directly. `loader` (from
    io.offload.open_streaming) materializes each block's float weights only when it is reached,
    for calibrated and data-free methods alike.
    """
    validate_config(cfg)
    calibrated = needs_calibration(cfg)
    targets = iter_targets(model, cfg)  # the model, every layer and every rule checked before any is touched
    if not targets:
        raise SchemeError("this model has no Linear layers to quantize")
    if not inplace and loader is None:
        model = copy.deepcopy(model)
    if loader is None:
        split_experts(model)  # fused experts become a layer each (streamed blocks split as they load)
    info = QuantInfo(cfg)
    emb_name, out_name, tied = head_modules(model)
    record_fallbacks(info, targets)
    plans = {t.name: (t.scheme, t.method) for t in targets}
    done: set[str] = set()
    if calibrated:
        if calib is None:
            raise SchemeError(f"method {cfg.method.name} needs calibration data: pass calib token ids (--calib PATH)")
        done = quantize_calibrated(model, plans, calib, cfg, info, batch_size=batch_size, progress=progress,
                                   loader=loader)
    elif loader is not None:
        done = quantize_streamed(model, plans, cfg, info, loader, progress=progress)
    rest = [t for t in targets if t.name not in done and t.scheme is not None]
    for t in tqdm(rest, desc=f"quantize {cfg.scheme.name} ({cfg.method.name})",
                  disable=not progress or not rest, unit="layer"):
        scheme, method = t.scheme, t.method
        if method.needs:  # outside the known blocks: no statistics were gathered
            log.warning("%s is outside the model's blocks; quantized with rtn instead of %s", t.name, method.name)
            method = method_of("rtn")
        if scheme.needs:  # a static activation range needs calibration inputs; none reach this layer
            log.warning("%s is outside the model's blocks; its activations are quantized per token at run "
                        "time (w8a8-dynamic) instead of %s", t.name, scheme.name)
            scheme = parse_scheme("w8a8-dynamic")
        swap_quantized(model, t.name, model.get_submodule(t.name), scheme, method, {}, info)
    quantize_head(model, cfg, info, emb_name, out_name, tied, from_file=loader is not None)
    model.quantkit = info
    return model


def quantize_calibrated(model: nn.Module, plans: dict, calib: torch.Tensor, cfg: QuantConfig, info: QuantInfo,
                        batch_size: int = 8, progress: bool = True, loader=None) -> set[str]:
    """Quantize the Linears of `plans` (name -> (scheme, method)) that lie inside the model's
    blocks, each from the statistics calibration yields for it; returns their names."""
    done: set[str] = set()
    for name, stats in block_statistics(model, plans, calib, cfg, batch_size=batch_size, progress=progress,
                                        loader=loader):
        scheme, method = plans[name]
        if "hessian" in method.needs and "hessian" not in stats:  # an expert too few tokens were routed to
            key = f"{method.name} -> rtn (fewer than {min_hessian_rows(model.get_submodule(name).in_features)} " \
                  "calibration tokens reached the layer)"
            info.fallbacks[key] = info.fallbacks.get(key, 0) + 1
            log.info("%s: %d calibration tokens reached it; quantized with rtn instead of %s",
                     name, stats.get("rows", 0), method.name)
            method = method_of("rtn")
        swap_quantized(model, name, model.get_submodule(name), scheme, method, stats, info)
        done.add(name)
        del stats
    for key, count in info.fallbacks.items():
        if " -> rtn (" in key:
            log.warning("%d layers: %s", count, key)
    return done


def quantize_streamed(model: nn.Module, plans: dict, cfg: QuantConfig, info: QuantInfo, loader,
                      progress: bool = True) -> set[str]:
    """Data-free methods on a streamed model (io.offload.open_streaming): each block's float
    weights are read from disk when the block is reached, its layers quantized (the same
    `swap_quantized` as in memory, so the bytes are the same), and the float block let go before
    the next is read. Returns the names quantized."""
    from .arch import blocks_of, family_of
    from .memory import trim_heap

    fam = family_of(model)
    blocks = blocks_of(model, fam)
    done: set[str] = set()
    for bi in tqdm(range(len(blocks)), desc=f"{cfg.method.name} {cfg.scheme.name} blocks", unit="block",
                   disable=not progress):
        prefix = f"{fam.blocks}.{bi}."
        loader.load_into(blocks[bi], prefix)
        split_experts(blocks[bi])
        names = [prefix + n for n, _ in blocks[bi].named_modules() if prefix + n in plans]
        for name in names:
            scheme, method = plans[name]
            if scheme is not None:
                swap_quantized(model, name, model.get_submodule(name), scheme, method, {}, info)
                done.add(name)
        trim_heap()
    return done


def swap_quantized(model, name, mod, scheme, method, stats, info: QuantInfo) -> None:
    """Run `method` on one layer's weight and put a QuantLinear in its place."""
    w = linear_weight(mod).detach().float()
    qw = method.quantize(w, scheme, stats)
    if "act_range" in stats:  # static activation scheme: freeze the observed input range with the weight
        qw = with_act_range(qw, *stats["act_range"])
    info.errors[name] = relative_error(w, qw)
    set_module(model, name, QuantLinear(qw, getattr(mod, "bias", None)))
    info.layers[name], info.methods[name] = scheme.name, method.name


def relative_error(w: torch.Tensor, qw: QuantizedWeight) -> float:
    return float((w - qw.dequantize()).norm() / w.norm().clamp(min=1e-12))


def quantize_head(model, cfg: QuantConfig, info: QuantInfo, emb_name, out_name, tied, from_file=False) -> None:
    """Store the embedding table and output head as `head_storage` says (`cfg.head`, 16-bit by
    default, unless a rule names them). `from_file`:
    a streamed model's table/head may still be views of the memory-mapped float file."""
    emb = model.get_submodule(emb_name) if emb_name else None
    out = model.get_submodule(out_name) if out_name else None
    ref = emb if emb is not None else out
    if ref is None:
        return
    scheme = head_scheme(head_storage(cfg, emb_name, out_name), ref.weight.dtype)
    info.head = {"embedding": emb_name, "head": out_name, "tied": tied, "scheme": scheme.name}
    if emb is not None and isinstance(emb, nn.Embedding):
        qe = QuantEmbedding(quantize_table(emb.weight.detach().float(), scheme, from_file), emb.padding_idx,
                            out_dtype=emb.weight.dtype if emb.weight.is_floating_point() else torch.float32,
                            embed_scale=getattr(emb, "embed_scale", None))
        aliases = tied_embeddings(model, emb)
        set_module(model, emb_name, qe)
        for a in aliases:  # the same table under other names: one QuantEmbedding for all
            set_module(model, a, qe)
        if tied and out is not None:
            set_module(model, out_name, qe.linear)  # one table, two uses
            return
    if out is not None and linear_weight(out) is not None:
        w = linear_weight(out).detach().float()
        set_module(model, out_name, QuantLinear(quantize_table(w, scheme, from_file), getattr(out, "bias", None)))


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
