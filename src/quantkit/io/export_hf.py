"""Checkpoints the serving engines read: the GPTQ layout and compressed-tensors' pack-quantized.

Both are written from a quantkit-quantized model whose Linears share one integer weight-only
scheme (2/3/4/8 bits for GPTQ, 4/8 for compressed-tensors; one group size that divides every
layer's input width, or per channel). The integer codes, scales and zero points are the very
ones quantkit stored, repacked, so the peer dequantizes to exactly quantkit's weights; the
embedding table and head are written dequantized (float), as those loaders expect.

GPTQ ("gptq" checkpoint format, i.e. v1; what transformers + optimum + gptqmodel load):
  qweight int32 [in*b/32, out]  unsigned codes u packed along the input dim, LSB first
  qzeros  int32 [in/g, out*b/32] (zero - 1) packed along the output dim, LSB first (v1 stores zero-1)
  scales  fp16  [in/g, out];  g_idx int32 [in] = i // g;  W[o, i] = scales[g_idx[i], o] * (u - zero)
  3-bit codes straddle words (32 values in 3 words, as AutoGPTQ packs them).
  symmetric schemes: u = q + 2^(b-1), zero = 2^(b-1).  config: bits, group_size, sym, and desc_act /
  true_sequential as the run had them (act order, sequential groups of a GPTQ run),
  checkpoint_format "gptq"; quantize_config.json beside config.json for GPTQ tools.
compressed-tensors, format "pack-quantized" (what vLLM serves, transformers loads):
  weight_packed int32 [out, in*b/32]  u = q_signed + 2^(b-1) packed along the input dim, LSB first
  weight_scale  fp16 [out, in/g] (loaded in the model's dtype: float32/float16 exact, bf16 rounds);  weight_shape int64 [2] = [out, in]
  weight_zero_point int32 [out*b/32, in/g] (affine only) = zero packed along the output dim
  config_groups.group_0: targets ["Linear"], weights {num_bits, type int, symmetric, strategy
  group|channel, group_size}; ignore ["lm_head"] (an unlisted head would load uninitialized).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import QuantkitError, SchemeError
from ..formats.integer import int_codes
from ..nn import QuantEmbedding, QuantLinear
from ..scheme import Scheme, parse_scheme
from .atomic import atomic_dir


def _chunk(bits: int) -> int:
    """Values per whole number of 32-bit words: 32/bits when bits divides 32, else 32 (3-bit:
    32 values in 3 words, as AutoGPTQ packs them)."""
    return 32 // bits if 32 % bits == 0 else 32


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned codes (< 2^bits) into int32 words along `dim` (0 or 1) as one LSB-first bit
    stream: value k sits at bits [k*bits, (k+1)*bits) of the stream, word j holding bits
    [32j, 32j+32); a value may straddle two words (3-bit, as AutoGPTQ's packer lays them)."""
    per = _chunk(bits)
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.t()
    rows, n = c.shape
    if n % per:
        raise SchemeError(f"{n} values do not fill whole 32-bit words of {bits}-bit codes (a multiple of {per})")
    c = c.reshape(rows, n // per, per)
    words = torch.zeros(rows, n // per, per * bits // 32, dtype=torch.int64)
    for k in range(per):
        w, off = divmod(k * bits, 32)
        words[:, :, w] |= (c[:, :, k] << off) & 0xFFFFFFFF
        if off + bits > 32:
            words[:, :, w + 1] |= c[:, :, k] >> (32 - off)
    words = words.reshape(rows, -1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words.contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_int32 (for tests and checks)."""
    per = _chunk(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    if dim == 0:
        w = w.t()
    rows = w.shape[0]
    w = w.reshape(rows, -1, per * bits // 32)
    out = torch.empty(rows, w.shape[1], per, dtype=torch.int64)
    for k in range(per):
        i, off = divmod(k * bits, 32)
        v = w[:, :, i] >> off
        if off + bits > 32:
            v = v | (w[:, :, i + 1] << (32 - off))
        out[:, :, k] = v & (2**bits - 1)
    out = out.reshape(rows, -1)
    return out.t().contiguous() if dim == 0 else out


@dataclass
class Codes:
    """One layer's stored integers in unsigned form: u [out, in], zero [out, G] (None when
    symmetric: the implied zero is 2^(b-1)), scale fp16 [out, G], group length g."""

    u: torch.Tensor
    zero: torch.Tensor | None
    scale: torch.Tensor
    g: int


def layer_codes(qw) -> Codes:
    q, scale, zero, L = int_codes(qw)
    b = qw.scheme.bits
    if zero is None:
        return Codes((q + 2 ** (b - 1)).to(torch.int64), None, scale.half(), L)
    return Codes(q.to(torch.int64), zero.round().to(torch.int64), scale.half(), L)


@dataclass
class Exporter:
    name: str
    bits: tuple[int, ...]
    folder_suffix: Callable[[Scheme, int], str]
    tensors: Callable[[str, Codes, Scheme, tuple[int, int], torch.dtype], dict]
    config: Callable[[Scheme, int, list[str], object], dict]  # (scheme, group, ignore, the run's QuantConfig)
    extra_files: Callable[[Scheme, int, object], dict] = field(default=lambda s, g, run: {})


def _gptq_tensors(name, c: Codes, scheme, shape, dtype):
    b = scheme.bits
    out, inn = shape
    zero = c.zero if c.zero is not None else torch.full_like(c.scale, 2 ** (b - 1), dtype=torch.int64)
    return {f"{name}.qweight": pack_int32(c.u.t(), b, dim=0),
            f"{name}.qzeros": pack_int32(((zero - 1) & (2**b - 1)).t(), b, dim=1),
            f"{name}.scales": c.scale.t().contiguous(),
            f"{name}.g_idx": (torch.arange(inn) // c.g).to(torch.int32)}


def _gptq_fields(scheme, g, ignore, run=None):
    """GPTQ's quantization_config; desc_act and true_sequential say what was run (`run`: the
    model's QuantConfig): act order and sequential groups of a GPTQ run, false otherwise. The
    groups are stored in column order either way (g_idx = i // g), so any loader reads them."""
    m = getattr(run, "method", None)
    gptq = getattr(m, "name", None) == "gptq"
    return {"bits": scheme.bits, "group_size": g, "desc_act": bool(gptq and m.act_order), "sym": scheme.symmetric,
            "true_sequential": bool(gptq and run.sequential), "checkpoint_format": "gptq", "quant_method": "gptq"}


def _ct_tensors(name, c: Codes, scheme, shape, dtype):
    b = scheme.bits
    d = {f"{name}.weight_packed": pack_int32(c.u, b, dim=1),
         f"{name}.weight_scale": c.scale.contiguous(),  # fp16, as stored: exact; the loader casts to its dtype
         f"{name}.weight_shape": torch.tensor(list(shape), dtype=torch.int64)}
    if c.zero is not None:
        d[f"{name}.weight_zero_point"] = pack_int32(c.zero, b, dim=0)
    return d


def _ct_config(scheme, g, ignore, run=None):
    weights = {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "dynamic": False,
               "strategy": "channel" if g <= 0 else "group", "group_size": None if g <= 0 else g, "actorder": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": weights,
                                          "input_activations": None, "output_activations": None}},
            "ignore": ignore, "kv_cache_scheme": None}


EXPORTERS: dict[str, Exporter] = {
    "gptq": Exporter("gptq", (2, 3, 4, 8), lambda s, g: f"GPTQ-{s.bits}bit-{g if g > 0 else 'channel'}{'g' if g > 0 else ''}",
                     _gptq_tensors, _gptq_fields,
                     lambda s, g, run: {"quantize_config.json": {k: v for k, v in _gptq_fields(s, g, [], run).items()
                                                                 if k != "quant_method"}}),
    "compressed-tensors": Exporter("compressed-tensors", (4, 8),
                                   lambda s, g: f"quantized.w{s.bits}a16" + (f"-g{g}" if g > 0 else ""),
                                   _ct_tensors, _ct_config),
}


def export_scheme(model: nn.Module, bits: int = 4, symmetric: bool = True) -> str:
    """The integer scheme with the largest group (128, 64 or 32) dividing every Linear's input
    width, for a model to be quantized and then exported (one group size for all layers)."""
    from ..modules import head_modules, linear_weight

    info = getattr(model, "quantkit", None)
    if info is not None:  # already quantized: the widths of its quantized layers
        widths = {model.get_submodule(n).in_features for n in info.layers}
    else:
        _, out_name, _ = head_modules(model)
        widths = {linear_weight(m).shape[1] for n, m in model.named_modules()
                  if linear_weight(m) is not None and n != out_name}
    for g in (128, 64, 32):
        if all(w % g == 0 for w in widths):
            return f"int{bits}-g{g}-{'sym' if symmetric else 'asym'}"
    return f"int{bits}-{'sym' if symmetric else 'asym'}"


def default_folder(model_name: str, fmt: str, scheme: Scheme, g: int) -> str:
    return f"{model_name}-{EXPORTERS[fmt].folder_suffix(scheme, g)}"


def model_name(source: str) -> str:
    """A display name from a model source: file stem without a GGUF type suffix, or folder name."""
    p = Path(str(source))
    if p.suffix == ".gguf" or p.is_file():
        stem = p.stem
    elif p.is_dir():
        stem = p.resolve().name
    else:
        stem = str(source).rstrip("/").split("/")[-1]
    return re.sub(r"[.-](Q\d_K(_[SML])?|Q\d_\d|Q\d|F16|F32|BF16|IQ\w+)$", "", stem, flags=re.I) or "model"


@dataclass
class ExportSummary:
    path: Path
    format: str
    scheme: str
    group_size: int
    layers: int
    bytes: int


def check_scheme(fmt: str, scheme: "str | Scheme") -> Scheme:
    """`scheme` if the layout `fmt` can hold it, else a SchemeError saying what it holds."""
    if fmt not in EXPORTERS:
        raise SchemeError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORTERS)}")
    ex, scheme = EXPORTERS[fmt], parse_scheme(scheme)
    if scheme.kind != "int" or scheme.act:
        raise SchemeError(f"the {fmt} layout holds integer weight-only schemes (e.g. int4-g128-sym), not {scheme.name}")
    if scheme.bits not in ex.bits:
        raise SchemeError(f"the {fmt} layout holds {', '.join(map(str, ex.bits))}-bit weights, not {scheme.bits}-bit")
    return scheme


def uniform_scheme(model, fmt: Exporter) -> tuple[Scheme, int]:
    info = getattr(model, "quantkit", None)
    if info is None:
        raise QuantkitError("export needs a model quantized by quantkit (qk.quantize, or a quantkit checkpoint)")
    schemes = set(info.layers.values())
    if len(schemes) != 1:
        raise SchemeError(f"the {fmt.name} layout has one scheme and one group size for every layer; this model has "
                          f"{sorted(schemes)} (a group size that does not divide every input width falls back to a smaller "
                          f"one). Quantize it with one scheme whose group divides every width, e.g. "
                          f"{export_scheme(model)}")
    scheme = check_scheme(fmt.name, schemes.pop())
    return scheme, scheme.group_size if scheme.group_size > 0 else -1


def export_hf(model: nn.Module, tokenizer, out_dir: str | Path, fmt: str, card: str | None = None,
              overwrite: bool = False, protect=()) -> ExportSummary:
    """Write `model` (quantized by quantkit) in `fmt` ("gptq" or "compressed-tensors") to
    `out_dir` atomically: model.safetensors, config.json with the format's quantization_config,
    the tokenizer, and README.md (`card`) when given."""
    if fmt not in EXPORTERS:
        raise SchemeError(f"unknown export format {fmt!r}; valid: {', '.join(EXPORTERS)}")
    ex = EXPORTERS[fmt]
    scheme, g = uniform_scheme(model, ex)
    info = model.quantkit
    emb_name, out_name, tied = info.head.get("embedding"), info.head.get("head"), bool(info.head.get("tied"))
    # embeddings/head are written dequantized, in their 16-bit storage dtype (exact), else float32
    float_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(info.head.get("scheme"), torch.float32)
    tensors: dict[str, torch.Tensor] = {}
    for name in info.layers:
        mod = model.get_submodule(name)
        tensors.update(ex.tensors(name, layer_codes(mod.quantized_weight()), scheme, (mod.out_features, mod.in_features),
                                  float_dtype))
        if mod.bias is not None:
            tensors[f"{name}.bias"] = mod.bias.detach().to(float_dtype).contiguous()
    for hname in [emb_name] + ([] if tied else [out_name]):
        if not hname:
            continue
        m = model.get_submodule(hname)
        if isinstance(m, (QuantEmbedding, QuantLinear)):
            w = (m.linear if isinstance(m, QuantEmbedding) else m).dequantized_weight(torch.float32)
            tensors[f"{hname}.weight"] = w.to(float_dtype).contiguous()
            b = getattr(m, "bias", None)
            if b is not None:
                tensors[f"{hname}.bias"] = b.detach().to(float_dtype).contiguous()
    done = set(info.layers) | {emb_name, out_name}
    seen = set()
    for key, t in model.state_dict().items():
        prefix = key.rpartition(".")[0]
        if prefix in done or any(prefix.startswith(d + ".") for d in done if d):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if ptr in seen:
            continue
        seen.add(ptr)
        tensors[key] = t.detach().contiguous().clone()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = ex.config(scheme, g, [out_name] if out_name else [], info.config)
    config["dtype"] = str(float_dtype).replace("torch.", "")
    config["tie_word_embeddings"] = bool(tied)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "export", overwrite, protect) as tmp:
        tmp = Path(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        for fname, content in ex.extra_files(scheme, g, info.config).items():
            (tmp / fname).write_text(json.dumps(content, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if card:
            (tmp / "README.md").write_text(card)
    return ExportSummary(out_dir, fmt, scheme.name, g, len(info.layers), (out_dir / "model.safetensors").stat().st_size)


_LOADERS = {
    "gptq": ("transformers with `optimum` and `gptqmodel` (CPU: `GPTQConfig(bits=..., backend=\"gptq_torch\")`), "
             "vLLM, TGI"),
    "compressed-tensors": "transformers with `compressed-tensors`, vLLM",
}


def model_card(name: str, fmt: str, scheme: Scheme, g: int, method: str, calib: str | None, measured: dict | None,
               eval_text: str | None, seconds: float | None, command: str, ctx: int = 512) -> str:
    """README.md for an exported folder: what was done, what was measured, how to reproduce."""
    rows = [f"| format | {fmt} ({'GPTQ v1 layout' if fmt == 'gptq' else 'pack-quantized'}) |",
            f"| weights | {scheme.bits}-bit integer, {'symmetric' if scheme.symmetric else 'asymmetric'}, "
            f"{'per channel' if g <= 0 else f'groups of {g}'} (quantkit scheme `{scheme.name}`) |",
            f"| method | {method} |",
            f"| calibration data | {calib or 'none (round to nearest needs none)'} |",
            "| embeddings / head | float (not quantized) |"]
    if seconds is not None:
        rows.append(f"| quantization time | {seconds:.1f} s |")
    lines = [f"# {name} ({fmt}, {scheme.bits}-bit)", "",
             f"Quantized with [quantkit](https://pypi.org/project/quantkit/) from {name}. Loads with {_LOADERS[fmt]}.", "",
             "| | |", "|---|---|", *rows, ""]
    if measured:
        lines += [f"## Measured (by quantkit when this folder was written; text: {eval_text}, evaluation part, "
                  f"{measured.get('tokens', '?')} tokens, windows of {ctx})", "",
                  "| metric | value |", "|---|---:|",
                  f"| perplexity | {measured['perplexity']:.3f} |"]
        if measured.get("kl_divergence") is not None:
            lines.append(f"| KL divergence vs the float model | {measured['kl_divergence']:.4f} |")
        if measured.get("top1_agreement") is not None:
            lines.append(f"| top-1 agreement with the float model | {measured['top1_agreement']:.4f} |")
        lines.append(f"| quantized weights in memory (quantkit) | {measured['size_bytes'] / 1e6:.2f} MB |")
        if measured.get("decode_tokens_per_s"):
            lines.append(f"| decode speed (quantkit, batch 1, this machine) | {measured['decode_tokens_per_s']:.1f} tokens/s |")
        lines.append("")
    lines += ["## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)
