"""Refuse a quantkit checkpoint that was damaged or edited, before any tensor is assigned.

`load_checkpoint` (io/checkpoint.py) trusts nothing in the folder:
- `read_config(path)`: config.json parses and holds a JSON object;
- `validate_quantization_config(qc, path)`: format_version, config, layers, methods, head,
  errors and fallbacks have the types `save` writes and every scheme string parses; returns
  the QuantInfo they describe;
- `validate_contents(model, info, header, path)`: against the model built (empty) from
  config.json, every quantized layer and the head name a module of the right kind, and each
  stored tensor has the names, dtypes and shapes that quantizing a weight of that shape with
  the layer's scheme produces (`layout.stored_parts`); the other stored tensors are
  parameters or buffers of the model with their shapes. Nothing is missing, nothing is extra.
Each raises SourceError with one line saying what is wrong and what to do.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import QuantkitError, SourceError
from ..modules import head_modules, linear_weight
from ..pipeline import QuantInfo
from ..config import QuantConfig
from ..scheme import parse_scheme
from .layout import FORMAT_VERSION, stored_parts, stored_shape
from .validate import one_line

_AGAIN = "save the checkpoint again with quantkit"
_ST_NAME = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
            torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
            torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}  # safetensors' names
_FLOAT_NAMES = {n for d, n in _ST_NAME.items() if d.is_floating_point}


def _bad(path, what: str) -> SourceError:
    return SourceError(f"{path}: {what}; {_AGAIN}")


def read_config(path: Path) -> dict:
    f = path / "config.json"
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{f} is not valid JSON: {one_line(e)}; {_AGAIN}") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{f} must hold a JSON object; {_AGAIN}")
    return raw


def _dict_of_str(qc: dict, key: str, path: Path, values=(str,)) -> dict:
    d = qc.get(key, {})
    if d is None:
        d = {}
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d) or \
            not all(isinstance(v, values) and not isinstance(v, bool) for v in d.values()):
        kinds = " or ".join(t.__name__ for t in values)
        raise _bad(path, f"quantization_config.{key} must map names to {kinds} values (found {type(d).__name__})")
    return d


def _scheme(text, path: Path, where: str):
    if not isinstance(text, str):
        raise _bad(path, f"{where} has scheme {text!r}, not a scheme string")
    try:
        return parse_scheme(text)
    except QuantkitError as e:
        raise _bad(path, f"{where} has an invalid scheme {text!r} ({one_line(e)})") from None


def validate_quantization_config(qc, path) -> QuantInfo:
    """The QuantInfo a saved `quantization_config` describes, or SourceError if it is damaged."""
    if not isinstance(qc, dict):
        raise _bad(path, "quantization_config is not a JSON object")
    v = qc.get("format_version")
    if "format_version" not in qc:
        raise _bad(path, "quantization_config has no format_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _bad(path, f"quantization_config.format_version must be a positive integer (found {v!r})")
    if v > FORMAT_VERSION:
        raise SourceError(f"{path}: written by a newer quantkit (format {v}); upgrade quantkit")
    cfg = qc.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("scheme"), str):
        raise _bad(path, "quantization_config.config must be an object with a scheme string")
    try:
        config = QuantConfig.from_dict(cfg)  # the method is a record (qat, qlora-merge...): not re-validated
    except (QuantkitError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise _bad(path, f"quantization_config.config is invalid ({one_line(e)})") from None
    layers = _dict_of_str(qc, "layers", path)
    for name, scheme in layers.items():
        _scheme(scheme, path, f"layer {name}")
    head = qc.get("head", {}) or {}
    if not isinstance(head, dict):
        raise _bad(path, f"quantization_config.head must be an object (found {type(head).__name__})")
    if head:
        _scheme(head.get("scheme"), path, "the head")
        for key in ("embedding", "head"):
            if head.get(key) is not None and not isinstance(head[key], str):
                raise _bad(path, f"quantization_config.head.{key} must be a module name or null (found {head[key]!r})")
        if not isinstance(head.get("tied", False), bool):
            raise _bad(path, f"quantization_config.head.tied must be true or false (found {head['tied']!r})")
    return QuantInfo(config, layers=dict(layers), methods=dict(_dict_of_str(qc, "methods", path)),
                     head=dict(head), errors=dict(_dict_of_str(qc, "errors", path, (int, float))),
                     fallbacks=dict(_dict_of_str(qc, "fallbacks", path, (int,))))


def _module(model: nn.Module, name: str, path: Path, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise _bad(path, f"{what} {name!r} is not a module of this {type(model).__name__}") from None


def _check_parts(header: dict, prefix: str, shape, scheme, path: Path) -> set[str]:
    """Names of the stored parts of one quantized module, checked against its scheme."""
    try:
        want = stored_parts(shape, scheme)
    except QuantkitError as e:
        raise _bad(path, f"{prefix}: scheme {scheme.name} cannot hold its weight of shape {list(shape)} "
                         f"({one_line(e)})") from None
    have = {k[len(prefix) + 1:] for k in header if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1:]}
    have.discard("bias")
    if have != set(want):
        lost, extra = sorted(set(want) - have), sorted(have - set(want))
        raise _bad(path, f"{prefix} ({scheme.name}) stores parts {sorted(have)} in model.safetensors, "
                         f"expected {sorted(want)} (missing {lost}, unexpected {extra})")
    for part, (dt, shp) in want.items():
        info = header[f"{prefix}.{part}"]
        if info.get("dtype") != _ST_NAME.get(dt) or tuple(info.get("shape", ())) != tuple(shp):
            raise _bad(path, f"{prefix}.{part} is {info.get('dtype')} {info.get('shape')} in model.safetensors; "
                             f"scheme {scheme.name} stores {_ST_NAME.get(dt)} {list(shp)}")
    return {f"{prefix}.{p}" for p in want}


def _check_bias(header: dict, name: str, mod: nn.Module, path: Path) -> set[str]:
    bias = getattr(mod, "bias", None)
    key = f"{name}.bias"
    if bias is None:
        if key in header:
            raise _bad(path, f"{key} is stored but the layer has no bias")
        return set()
    if key not in header:
        raise _bad(path, f"{key} is missing from model.safetensors")
    _check_plain(header, key, bias, path)
    return {key}


def _check_plain(header: dict, key: str, t: torch.Tensor, path: Path) -> None:
    info = header[key]
    if tuple(info.get("shape", ())) != tuple(t.shape):
        raise _bad(path, f"{key} has shape {info.get('shape')} in model.safetensors; the model needs {list(t.shape)}")
    if (info.get("dtype") in _FLOAT_NAMES) != t.is_floating_point():
        raise _bad(path, f"{key} is stored as {info.get('dtype')}; the model needs a {t.dtype} tensor")


def validate_contents(model: nn.Module, info: QuantInfo, header: dict, path: Path) -> None:
    """Check the stored tensors (`header`: safetensors name -> {dtype, shape}) against `info`
    and `model` (built empty from config.json, before any module is swapped)."""
    used: set[str] = set()
    replaced: set[str] = set()
    for name, text in info.layers.items():
        mod = _module(model, name, path, "quantized layer")
        if linear_weight(mod) is None:
            raise _bad(path, f"quantized layer {name!r} is a {type(mod).__name__}, not a Linear layer")
        used |= _check_parts(header, name, stored_shape(mod), parse_scheme(text), path)
        used |= _check_bias(header, name, mod, path)
        replaced.add(name)
    if info.head:
        emb, out, _ = head_modules(model)  # on the meta device tied weights are not one tensor yet
        tied = bool(info.head.get("tied", False))
        config_tied = getattr(getattr(model, "config", None), "tie_word_embeddings", tied)
        got = (info.head.get("embedding"), info.head.get("head"), tied)
        if got != (emb, out, bool(config_tied) and out is not None):
            raise _bad(path, f"quantization_config.head names embedding {got[0]!r}, head {got[1]!r}, tied {got[2]} "
                             f"but this model has embedding {emb!r}, head {out!r}, tied {bool(config_tied)}")
        hs = parse_scheme(info.head["scheme"])
        for mname in [emb] + ([] if tied else [out]):
            if mname is None:
                continue
            mod = model.get_submodule(mname)
            used |= _check_parts(header, mname, stored_shape(mod), hs, path)
            if mname == out:
                used |= _check_bias(header, mname, mod, path)
        replaced.update(n for n in (emb, out) if n)
    state = model.state_dict(keep_vars=True)
    rest = sorted(set(header) - used)
    extra = [k for k in rest if k not in state or k.rpartition(".")[0] in replaced]
    if extra:
        raise _bad(path, f"model.safetensors holds {len(extra)} tensor(s) this model has no place for "
                         f"({', '.join(extra[:3])})")
    for k in rest:
        _check_plain(header, k, state[k], path)
    tied_ptrs = {}
    for k, t in state.items():
        tied_ptrs.setdefault(id(t), []).append(k)
    # a tensor tied to a replaced module's (T5's encoder/decoder.embed_tokens share `shared`) is stored with it
    replaced_ids = {id(t) for k, t in state.items() if k.rpartition(".")[0] in replaced}
    missing = [k for k, t in state.items() if k.rpartition(".")[0] not in replaced and k not in header
               and id(t) not in replaced_ids and not any(o in header for o in tied_ptrs[id(t)])]
    if missing:
        raise _bad(path, f"{len(missing)} tensor(s) are missing from model.safetensors ({', '.join(missing[:3])})")
