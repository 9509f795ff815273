"""Quantization-aware training: prepare -> train -> convert.

`prepare_qat(model, scheme)` swaps every Linear inside the model (not the output head) for a
`FakeQuantLinear` of the same scheme the PTQ path takes (the same strings: "int4-g128",
"int3-g128", "nf4-dq", "w8a8-dynamic", ...); training then sees the quantized weights in the
forward pass (nn/fake_quant.py). `convert(model)` turns each FakeQuantLinear into the
QuantLinear that stores exactly the weights the forward pass used, and the embeddings/head
into `head` storage, so `qk.save` / `qk.evaluate` take it like any quantized model.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import replace

from torch import nn

from ..algorithms import RecordedMethod
from ..config import make_config
from ..errors import SchemeError
from ..modules import head_modules, iter_targets, set_module, split_experts
from ..nn import FakeQuantLinear, QuantLinear
from ..pipeline import QuantInfo, quantize_head, relative_error
from ..scheme import Scheme, parse_scheme

log = logging.getLogger(__name__)


def prepare_qat(model: nn.Module, scheme: "str | Scheme", lsq: bool = False, inplace: bool = False,
                strict_groups: bool = False) -> nn.Module:
    """A copy of `model` (unless `inplace`) whose Linears are fake-quantized with `scheme`.

    A layer whose input width the group size does not divide gets the largest smaller group
    that does (as in `qk.quantize`), unless `strict_groups`. Embeddings and head stay float
    and trainable; `lsq=True` also learns each group's scale (integer schemes).
    """
    sc = parse_scheme(scheme)
    if not inplace:
        model = copy.deepcopy(model)
    split_experts(model)
    targets = iter_targets(model, make_config(sc, head="keep", strict_groups=strict_groups))
    if not targets:
        raise SchemeError("this model has no Linear layers to train with quantization")
    layers = {t.name: FakeQuantLinear.from_linear(model.get_submodule(t.name), t.scheme, lsq) for t in targets}
    for name, fq in layers.items():
        set_module(model, name, fq)
    model.qat_scheme = sc
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def convert(model: nn.Module, head: str | None = None, kernel: str | None = None) -> nn.Module:
    """Replace every FakeQuantLinear of a prepared (and trained) model by its QuantLinear, in
    place, and store the embeddings/head as `head` ("bf16" default); returns the model with
    `.quantkit` info, ready for `qk.save` and `qk.evaluate`. `kernel` forces a kernel (e.g.
    "dequant", the float reference) instead of the fastest one for each layer."""
    fq_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not fq_layers:
        raise SchemeError("nothing to convert: the model has no fake-quantized layers (call prepare_qat first)")
    sc = getattr(model, "qat_scheme", fq_layers[0][1].scheme)
    cfg = replace(make_config(sc, head=head), method=RecordedMethod("qat"))
    info = QuantInfo(cfg)
    for name, fq in fq_layers:
        qw = fq.to_quantized()
        info.errors[name] = relative_error(fq.weight.detach().float(), qw)
        bias = None if fq.bias is None else fq.bias.detach()
        set_module(model, name, QuantLinear(qw, bias, kernel=kernel))
        info.layers[name], info.methods[name] = fq.scheme.name, "qat"
        if fq.scheme != sc:
            key = f"{sc.name} -> {fq.scheme.name} (input width {fq.in_features})"
            info.fallbacks[key] = info.fallbacks.get(key, 0) + 1
    emb_name, out_name, tied = head_modules(model)
    quantize_head(model, cfg, info, emb_name, out_name, tied)
    for p in model.parameters():
        p.requires_grad_(False)
    model.quantkit = info
    if hasattr(model, "qat_scheme"):
        del model.qat_scheme
    model.eval()
    return model
