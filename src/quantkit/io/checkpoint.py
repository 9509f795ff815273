"""quantkit's checkpoint layout: one safetensors file of packed weights + config.json.

Layout (tensors: layout version 1, unchanged since the first release; config: format_version 2):
- `model.safetensors`: for a quantized layer `L`, its storage tensors as `L.<part>` (e.g.
  `L.qweight`, `L.scale`, `L.zero`; parts and dtypes come from the codec) and `L.bias`; the
  embedding table as `E.<part>` (a tied head is not stored twice); every other parameter
  and persistent buffer under its usual name, in its own dtype.
- `config.json`: the transformers config plus `quantization_config` = {"quant_method":
  "quantkit", "format_version", "config" (QuantConfig.to_dict(): each method and transform as
  {"name", "options"}; version 1 wrote the method as a name and GPTQ's options apart, and is
  still read), "layers" {name: scheme},
  "methods", "head", "fallbacks", "errors" (relative weight error per layer)}; the tokenizer files beside it.
Writes go to a temporary folder renamed at the end (io.atomic). `load_checkpoint` builds the
model with empty weights, refuses a damaged or edited folder (io/checkpoint_validate.py: config,
schemes, stored names/dtypes/shapes, NaN/Inf), swaps in the quantized modules and assigns the stored tensors.
"""
from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import QuantkitError, SourceError
from ..formats import QuantizedWeight
from ..nn import QuantEmbedding, QuantLinear
from ..modules import fused_parameters, layer_module, split_experts, head_modules, head_scheme, head_storage, iter_targets, linear_weight, set_module, tied_embeddings
from ..pipeline import QuantInfo
from ..config import QuantConfig
from ..scheme import parse_scheme
from .atomic import atomic_dir
from .classes import model_class
from .layout import (FORMAT_VERSION, LAYOUT_VERSION, METADATA, WEIGHTS_FILE, meta_quantize,  # noqa: F401
                     stored_parts, stored_shape, stored_spec)

log = logging.getLogger(__name__)



def _checkpoint_groups(model: nn.Module):
    """checkpoint_tensors one group at a time: each quantized module's stored parts (unpacked
    from its kernel layout only when the group is reached), then the other parameters and
    persistent buffers. Same names, same tensors; no copies beyond one module's."""
    inner = {id(m.linear) for m in model.modules() if isinstance(m, QuantEmbedding)}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantEmbedding) or (isinstance(mod, QuantLinear) and id(mod) not in inner):
            yield {f"{name}.{part}": t for part, t in mod.quantized_weight().tensors.items()}
    seen, rest = set(), {}
    for key, t in model.state_dict().items():  # packed buffers are non-persistent: not listed here
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr not in seen:  # tied tensors are stored once
            seen.add(ptr)
            rest[key] = t
    yield rest


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the checkpoint stores, by name (packed parts for quantized modules)."""
    out: dict[str, torch.Tensor] = {}
    for group in _checkpoint_groups(model):
        out.update(group)
    return {k: (v.detach().contiguous().clone() if v.untyped_storage().nbytes() != v.nbytes else v.detach().contiguous())
            for k, v in out.items()}


def checkpoint_bytes(model: nn.Module) -> int:
    """Exact bytes of the `model.safetensors` that `save(model)` writes for this quantized model
    (from the stored parts' dtypes and shapes, one module unpacked at a time; nothing written)."""
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for group in _checkpoint_groups(model):
        specs.update({k: (t.dtype, tuple(t.shape)) for k, t in group.items()})
    return safetensors_bytes(specs, METADATA)


def _write_weights(model: nn.Module, path: Path) -> None:
    """Write the checkpoint's safetensors file byte for byte as `save_file(checkpoint_tensors(
    model), path, METADATA)` would, straight from the tensors the model holds (a quantized
    layer's storage tensors, as they are): the header from their dtypes and shapes, then each
    tensor's bytes in safetensors' order. Nothing is copied beyond one non-contiguous tensor at
    a time (save_file would first turn every tensor into a bytes object). Cases safetensors'
    own writer must handle (a name twice, a dtype it alone knows, a tensor off the CPU, a
    big-endian machine) go to it."""
    tensors: dict[str, torch.Tensor] = {}
    direct = sys.byteorder == "little"
    for group in _checkpoint_groups(model):
        for k, t in group.items():
            direct = direct and k not in tensors and t.dtype in _ST_DTYPES and t.device.type == "cpu"
            tensors[k] = t.detach()
    if not direct:
        save_file(checkpoint_tensors(model), str(path), metadata=METADATA)
        return
    header, offsets = _safetensors_header({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, METADATA)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for k, _ in sorted(offsets.items(), key=lambda kv: kv[1]):
            t = tensors[k]
            if t.numel():
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def quantization_config(model: nn.Module) -> dict:
    info: QuantInfo = model.quantkit
    return {
        "quant_method": "quantkit",
        "format_version": FORMAT_VERSION,
        "config": info.config.to_dict(),
        "layers": info.layers,
        "methods": info.methods,
        "head": info.head,
        "fallbacks": info.fallbacks,
        "errors": {k: round(v, 6) for k, v in info.errors.items()},
    }


def save(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False, protect=()) -> Path:
    """Write `model` (returned by quantize) to `out_dir` atomically; returns the folder.

    `out_dir` may hold a previous quantkit checkpoint; anything else there is refused unless
    `overwrite` (io.atomic.check_output); `protect`ed paths (the source) never are."""
    if not hasattr(model, "quantkit"):
        raise QuantkitError("this model was not quantized by quantkit; call qk.quantize(model, scheme) first "
                            "(scheme fp32 or bf16 stores it unquantized)")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "checkpoint", overwrite, protect) as tmp:
        _write_weights(model, Path(tmp) / WEIGHTS_FILE)
        config = model.config.to_dict()
        # the class saved is the class loaded (an encoder's BertModel is not rebuilt as BertLMHeadModel)
        config["architectures"] = [type(model).__name__]
        config["quantization_config"] = quantization_config(model)
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir


# ----------------------------------------------------------------------------- size, exactly
_ST_DTYPES = {  # torch dtype -> (safetensors name, rank in safetensors' descending sort)
    torch.float64: ("F64", 16), torch.float32: ("F32", 15), torch.bfloat16: ("BF16", 12),
    torch.float16: ("F16", 11), torch.int64: ("I64", 17), torch.int32: ("I32", 13),
    torch.int16: ("I16", 9), torch.int8: ("I8", 5), torch.uint8: ("U8", 4), torch.bool: ("BOOL", 0),
    torch.float8_e4m3fn: ("F8_E4M3", 7), torch.float8_e5m2: ("F8_E5M2", 6),
}


def _safetensors_header(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict | None = None):
    """(header bytes, {name: (start, end)}) of the safetensors file `save_file` writes for
    tensors of these dtypes/shapes: sorted by dtype (safetensors' order), then name; compact
    JSON padded with spaces to 8-byte alignment."""
    order = sorted(specs.items(), key=lambda kv: (-_ST_DTYPES[kv[1][0]][1], kv[0]))
    header: dict = {}
    if metadata:
        header["__metadata__"] = metadata
    off = 0
    offsets = {}
    for name, (dt, shape) in order:
        n = 1
        for d in shape:
            n *= d
        size = n * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt][0], "shape": list(shape), "data_offsets": [off, off + size]}
        offsets[name] = (off, off + size)
        off += size
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return h + b" " * ((-len(h)) % 8), offsets


def safetensors_bytes(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict | None = None) -> int:
    """Exact size of the safetensors file `save_file` writes for tensors of these dtypes/shapes."""
    header, offsets = _safetensors_header(specs, metadata)
    return 8 + len(header) + max((e for _, e in offsets.values()), default=0)


def expected_weights_bytes(model: nn.Module, cfg: QuantConfig) -> int:
    """Bytes of `model.safetensors` that `save(quantize(model, cfg))` would write (exact)."""
    specs: dict[str, tuple] = {}
    emb_name, out_name, tied = head_modules(model)
    replaced = set()
    fused = fused_parameters(model)  # stored a layer per expert, as quantize splits them
    for name, shape, scheme, _, _ in iter_targets(model, cfg):  # the layers and schemes quantize resolves
        mod = layer_module(model, name)
        if scheme is None:
            if name.rpartition(".")[0] in fused:  # an expert kept in float: its own weight
                specs[f"{name}.weight"] = (mod.weight.dtype, shape)
            continue
        replaced.add(name)
        for part, sp in stored_spec(meta_quantize(shape, scheme)).items():
            specs[f"{name}.{part}"] = sp
        if getattr(mod, "bias", None) is not None:
            specs[f"{name}.bias"] = (mod.bias.dtype, tuple(mod.bias.shape))
    ref = model.get_submodule(emb_name) if emb_name else (model.get_submodule(out_name) if out_name else None)
    replaced.update(n for n in (emb_name, out_name) if n)
    if ref is not None:
        hs = head_scheme(head_storage(cfg, emb_name, out_name), ref.weight.dtype)
        for mname in [emb_name] + ([] if tied else [out_name]):
            if mname is None:
                continue
            m = model.get_submodule(mname)
            shape = tuple(linear_weight(m).shape) if linear_weight(m) is not None else tuple(m.weight.shape)
            for part, sp in stored_spec(meta_quantize(shape, hs)).items():
                specs[f"{mname}.{part}"] = sp
            if getattr(m, "bias", None) is not None:
                specs[f"{mname}.bias"] = (m.bias.dtype, tuple(m.bias.shape))
    seen = set()
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in replaced or key in fused:
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        specs[key] = (t.dtype, tuple(t.shape))
    return safetensors_bytes(specs, METADATA)


# ----------------------------------------------------------------------------- load
def is_quantkit_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == "quantkit"
    except (json.JSONDecodeError, AttributeError):
        return False


def _check_safetensors(path: Path) -> dict:
    """The header ({name: {dtype, shape, data_offsets}}) of a complete safetensors file."""
    from .validate import safetensors_header

    if not path.is_file():
        raise SourceError(f"{path.parent}: missing {path.name}; the checkpoint is incomplete, save it again")
    size = path.stat().st_size
    try:
        header, need = safetensors_header(path)
    except Exception as e:
        raise SourceError(f"{path}: not a valid safetensors file ({type(e).__name__}); save the checkpoint again") from None
    if size < need:
        raise SourceError(f"{path} is truncated ({size} of {need} bytes); copy or save it again")
    return header


def quant_info(qc: dict, where: str | Path = "quantization_config") -> QuantInfo:
    """The QuantInfo a saved `quantization_config` describes (SourceError naming `where` if it is damaged)."""
    from .checkpoint_validate import validate_quantization_config

    return validate_quantization_config(qc, where)


def install_quantized(model: nn.Module, info: QuantInfo, keys: set[str], get, dtype: torch.dtype) -> set[str]:
    """Swap in the QuantLinear / QuantEmbedding modules `info` describes, built from stored
    tensors: `keys` are the stored names, `get(name)` returns one. Returns the names used (the
    caller assigns the rest: norms, biases of unquantized layers). Shared by `load_checkpoint`
    and the transformers integration (io/hf.py)."""

    def parts(prefix: str) -> dict[str, torch.Tensor]:
        names = [k for k in keys if k.startswith(prefix + ".") and "." not in k[len(prefix) + 1:] and k != prefix + ".bias"]
        return {k[len(prefix) + 1:]: get(k) for k in names}

    used = set()
    for name, scheme in info.layers.items():
        mod = model.get_submodule(name)
        shape = stored_shape(mod)
        p = parts(name)
        used.update(f"{name}.{k}" for k in p)
        bias = get(f"{name}.bias") if f"{name}.bias" in keys else None
        if bias is not None:
            used.add(f"{name}.bias")
        set_module(model, name, QuantLinear(QuantizedWeight(parse_scheme(scheme), shape, p), bias))
    head = info.head
    if head:
        hs = parse_scheme(head["scheme"])
        emb_name, out_name, tied = head.get("embedding"), head.get("head"), head.get("tied")
        if emb_name:
            m = model.get_submodule(emb_name)
            p = parts(emb_name)
            used.update(f"{emb_name}.{k}" for k in p)
            qe = QuantEmbedding(QuantizedWeight(hs, stored_shape(m), p), getattr(m, "padding_idx", None), out_dtype=dtype,
                                embed_scale=getattr(m, "embed_scale", None))
            aliases = tied_embeddings(model, m)
            set_module(model, emb_name, qe)
            for a in aliases:
                set_module(model, a, qe)
            if tied and out_name:
                set_module(model, out_name, qe.linear)
        if out_name and not tied:
            m = model.get_submodule(out_name)
            p = parts(out_name)
            used.update(f"{out_name}.{k}" for k in p)
            bias = get(f"{out_name}.bias") if f"{out_name}.bias" in keys else None
            used.add(f"{out_name}.bias")
            set_module(model, out_name, QuantLinear(QuantizedWeight(hs, stored_shape(m), p), bias))
    return used


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32):
    """Rebuild a model saved by `save`: same modules, same kernels, identical logits. A
    damaged or edited checkpoint is refused (io/checkpoint_validate.py) before anything loads."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    from . import checkpoint_validate as cv
    from .validate import check_finite, check_tokenizer_files, one_line

    path = Path(path)
    raw = cv.read_config(path)
    info = cv.validate_quantization_config(raw.pop("quantization_config", None), path)
    weights = path / WEIGHTS_FILE
    header = _check_safetensors(weights)
    try:
        config = AutoConfig.for_model(**raw)
        cls = model_class(raw, str(path))
        with init_empty_weights(include_buffers=False):
            model = (cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config")
                     else cls._from_config(config, dtype=dtype))
        model.tie_weights()  # (outside init_empty_weights, which would re-register a fresh tensor) tied tables are one
        split_experts(model)  # fused experts are stored a layer each, as quantize split them
    except SourceError:
        raise
    except Exception as e:
        raise SourceError(f"{path / 'config.json'} does not describe a model transformers can build "
                          f"(model_type {raw.get('model_type')!r}): {one_line(e)}; save the checkpoint again") from None
    cv.validate_contents(model, info, header, path)
    check_tokenizer_files(path)
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        stored = {k: f.get_tensor(k) for k in keys}
    check_finite(sorted(stored.items()), str(weights))
    used = install_quantized(model, info, keys, stored.__getitem__, dtype)
    rest = {k: stored[k] for k in keys - used}
    del stored
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta or unexpected:
        raise SourceError(f"{path}: checkpoint does not match its config (missing {still_meta[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}); save it again with this quantkit version")
    model.quantkit = info
    model.eval()
    tokenizer = None
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as e:
            raise SourceError(f"{path}: its tokenizer files do not load ({one_line(e)}); copy them again, or "
                              "delete them to load without a tokenizer") from None
    return model, tokenizer
