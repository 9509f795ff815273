"""GGUF export through the `gguf` package's writer (import is `load.py`: transformers dequantizes).

    export_gguf(model, tokenizer, "out.gguf", "Q4_0")

What goes into the file:
* metadata llama.cpp needs: architecture and hyper-parameters (from `model.config`), the
  tokenizer (vocab, merges, token types, special tokens, chat template; `gguf_tokens.py`),
  `general.file_type` and `general.quantization_version`;
* every tensor, named as llama.cpp names it (`gguf.get_tensor_name_map`), Llama-style q/k
  rows permuted back to llama.cpp's rotary layout, with the type `ggml_mix.tensor_type` picks.

Weights come from the model as they are:
* float weights (nn.Linear, nn.Embedding, norms) are rounded to the GGUF type by llama.cpp's
  reference rounding (`formats/ggml.py`), byte for byte what the `gguf` package writes;
* quantkit weights (QuantLinear) already in the tensor's GGML type (schemes `gguf-*`, e.g.
  from GPTQ solved onto the GGUF grid, see `plan_types`) are copied byte for byte;
* quantkit weights whose grid a GGUF type holds exactly (groups of 32: int8 symmetric ->
  Q8_0, int4/int5 symmetric -> Q4_0/Q5_0, int4/int5 affine -> Q4_1/Q5_1) are *repacked*:
  codes and scales copied, no second rounding (`repack`). Other quantized weights are
  dequantized and rounded to the chosen type; the summary says which and why.

The file is written to a temporary sibling and renamed when complete.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SchemeError, SourceError
from ..formats import QuantizedWeight
from ..formats.ggml import LINEAR_GRIDS, quantize_rows
from ..formats.integer import int_codes
from .atomic import atomic_path, check_output
from .ggml_mix import FTYPES, tensor_type
from .gguf_tokens import tokenizer_fields

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    gguf: str  # general.architecture
    permute_qk: bool  # HF stores q/k rows in the rotate-half layout; llama.cpp wants interleaved pairs
    head_dim_keys: bool = False  # write attention.key/value_length always (readers do not derive head_dim)
    norm_offset: bool = False  # Gemma: HF norms scale by (1 + w), llama.cpp's by w: written as w + 1
    gemma: bool = False  # Gemma 2/3 hyper-parameters: sliding window, Gemma 2's logit soft-capping
    gpt2: bool = False  # GPT-2: LayerNorm epsilon, learned positions (no rope), n_inner
    moe: bool = False  # experts stacked into ffn_{gate,up,down}_exps [E, out, in]; expert counts
    layer_norm: str = ""  # the config's LayerNorm epsilon attribute, for families with LayerNorms (not RMS)
    hf_reads: bool = True  # transformers' GGUF reader reads such a file back (tests check it; else llama.cpp only)
    granite: bool = False  # Granite's four multipliers (embedding, residual, attention, logits)
    neox_qkv: bool = False  # GPT-NeoX: per-head interleaved query_key_value rows written as q | k | v; partial rotary
    encoder: bool = False  # BERT / RoBERTa: llama.cpp's embedding runtime (the encoder only, no task head)


# model_type -> how llama.cpp calls it (its convert_hf_to_gguf.py conventions). Adding one = an
# entry here, plus its hyper-parameters in _hparams when they are not llama's.
ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", True),
    "mistral": Arch("llama", True),
    "qwen2": Arch("qwen2", False),
    "qwen3": Arch("qwen3", False, True),  # qwen2 with per-head q/k RMS norms (attn_q_norm, attn_k_norm)
    "phi3": Arch("phi3", False),  # fused qkv_proj -> attn_qkv, gate_up_proj -> ffn_up
    "gemma2": Arch("gemma2", False, True, norm_offset=True, gemma=True),
    "gemma3_text": Arch("gemma3", False, True, norm_offset=True, gemma=True),
    "gpt2": Arch("gpt2", False, gpt2=True),  # Conv1D weights written [out, in]
    "qwen3_moe": Arch("qwen3moe", False, True, moe=True),
    "starcoder2": Arch("starcoder2", False, layer_norm="norm_epsilon"),  # LayerNorms and biases everywhere
    "falcon": Arch("falcon", False, layer_norm="layer_norm_epsilon"),  # fused query_key_value: q heads, then k, v
    # llama.cpp writes Mixtral as llama with stacked experts, a file transformers' reader takes for a dense llama
    "mixtral": Arch("llama", True, moe=True, hf_reads=False),
    "olmo2": Arch("olmo2", False, hf_reads=False),  # post-norm blocks, q/k norms over whole projections
    "granite": Arch("granite", True, granite=True, hf_reads=False),
    "gpt_neox": Arch("gptneox", False, layer_norm="layer_norm_eps", neox_qkv=True, hf_reads=False),
    "bert": Arch("bert", False, layer_norm="layer_norm_eps", encoder=True, hf_reads=False),
    "roberta": Arch("bert", False, layer_norm="layer_norm_eps", encoder=True, hf_reads=False),  # positions past pad+1
}
_SKIP = ("rotary_emb.inv_freq",)  # buffers llama.cpp recomputes


@dataclass
class ExportSummary:
    path: Path
    ftype: str
    bytes: int
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    repacked: list[str] = field(default_factory=list)  # tensors whose codes were copied
    requantized: list[tuple[str, str]] = field(default_factory=list)  # (tensor, why) rounded a second time

    def lines(self) -> list[str]:
        out = [f"wrote {self.path} ({self.bytes / 1e6:.1f} MB, {self.ftype}; tensor types: "
               + ", ".join(f"{k} x{v}" for k, v in sorted(self.types.items())) + ")"]
        if self.repacked:
            out.append(f"{len(self.repacked)} quantized tensors repacked without a second rounding")
        if self.requantized:
            why = sorted({w for _, w in self.requantized})
            out.append(f"{len(self.requantized)} quantized tensors dequantized and rounded again: " + "; ".join(why))
        return out


def _arch(model: nn.Module) -> tuple[str, Arch]:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHS:
        raise SourceError(f"GGUF export does not support model type {mt!r}; supported: {', '.join(sorted(ARCHS))}")
    return mt, ARCHS[mt]


def _rope_theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _rope_scaling(cfg) -> dict | None:
    rs = getattr(cfg, "rope_scaling", None)
    if not rs:
        params = getattr(cfg, "rope_parameters", None)
        rs = params if isinstance(params, dict) else None
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return None
    return rs


def _kv_heads(cfg, arch: Arch) -> int:
    """Key/value heads as llama.cpp reads them (Falcon's multi-query: one, whatever num_kv_heads says)."""
    if arch.gguf == "falcon" and getattr(cfg, "multi_query", False) and not cfg.new_decoder_architecture:
        return 1
    if arch.neox_qkv:  # GPT-NeoX has one k/v head per head (a num_key_value_heads in its config is unused)
        return int(cfg.num_attention_heads)
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def _hparams(w, model: nn.Module, arch: Arch) -> None:
    import gguf

    cfg = model.config
    n_head = cfg.num_attention_heads
    if arch.encoder:
        w.add_context_length(int(cfg.max_position_embeddings) - _position_offset(cfg))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(int(n_head))
        w.add_layer_norm_eps(float(cfg.layer_norm_eps))
        w.add_causal_attention(False)
        w.add_pooling_type(gguf.PoolingType.MEAN)  # mean-pooled embeddings, the measure quantkit reports for encoders
        w.add_token_type_count(int(getattr(cfg, "type_vocab_size", 1)))
        w.add_vocab_size(int(cfg.vocab_size))
        return
    if arch.gpt2:
        w.add_context_length(int(cfg.n_positions))
        w.add_embedding_length(int(cfg.n_embd))
        w.add_block_count(int(cfg.n_layer))
        w.add_feed_forward_length(int(cfg.n_inner or 4 * cfg.n_embd))
        w.add_head_count(int(n_head))
        w.add_layer_norm_eps(float(cfg.layer_norm_epsilon))
        w.add_vocab_size(int(cfg.vocab_size))
        return
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    if arch.gguf == "falcon" and (cfg.new_decoder_architecture or cfg.alibi or not cfg.parallel_attn or cfg.bias):
        raise SourceError("GGUF export writes Falcon's first layout (multi-query or grouped, parallel attention, "
                          "rotary, no biases); this model has new_decoder_architecture, alibi or biases")
    if arch.moe:
        if arch.gguf == "qwen3moe" and (not getattr(cfg, "norm_topk_prob", False) or getattr(cfg, "mlp_only_layers", None)):
            raise SourceError("GGUF export: llama.cpp's qwen3moe renormalizes the top-k routing weights and has experts "
                              "in every block; this model has norm_topk_prob=False or dense mlp_only_layers")
        w.add_expert_count(int(getattr(cfg, "num_local_experts", None) or cfg.num_experts))
        w.add_expert_used_count(int(cfg.num_experts_per_tok))
        if arch.gguf == "qwen3moe":  # Mixtral's experts are intermediate_size wide, as feed_forward_length says
            w.add_expert_feed_forward_length(int(cfg.moe_intermediate_size))
    if arch.gemma:
        if getattr(cfg, "query_pre_attn_scalar", head_dim) != head_dim:
            raise SourceError(f"GGUF export: llama.cpp scales Gemma's attention by 1/sqrt(head_dim) ({head_dim}); this "
                              f"model's query_pre_attn_scalar is {cfg.query_pre_attn_scalar}")
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(int(cfg.sliding_window))
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            w.add_attn_logit_softcapping(float(cfg.attn_logit_softcapping))
        if getattr(cfg, "final_logit_softcapping", None) is not None:
            w.add_final_logit_softcapping(float(cfg.final_logit_softcapping))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(getattr(cfg, "ffn_hidden_size", None) or cfg.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(_kv_heads(cfg, arch))
    w.add_rope_freq_base(_rope_theta(cfg))
    if arch.layer_norm:
        w.add_layer_norm_eps(float(getattr(cfg, arch.layer_norm)))
    else:
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    rot = head_dim
    if arch.neox_qkv:
        rp = getattr(cfg, "rope_parameters", None) or {}
        pct = getattr(cfg, "rotary_pct", None) or rp.get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None)
        rot = int(head_dim * float(pct if pct is not None else 1.0))
        w.add_parallel_residual(bool(cfg.use_parallel_residual))
    w.add_rope_dimension_count(int(rot))
    if arch.granite:
        w.add_embedding_scale(float(cfg.embedding_multiplier))
        w.add_residual_scale(float(cfg.residual_multiplier))
        w.add_attention_scale(float(cfg.attention_multiplier))
        w.add_logit_scale(float(cfg.logits_scaling))
    if head_dim * n_head != cfg.hidden_size or arch.head_dim_keys:
        w.add_key_length(int(head_dim))
        w.add_value_length(int(head_dim))
    w.add_vocab_size(int(cfg.vocab_size))
    rs = _rope_scaling(cfg)
    if rs is not None:
        kind = rs.get("rope_type", rs.get("type"))
        if kind != "linear":
            raise SourceError(f"GGUF export does not support rope scaling {kind!r} yet (only linear)")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))


def _permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows [n_head · head_dim, ...] from HF's rotate-half order to llama.cpp's interleaved pairs.

    Within a head HF keeps the first halves of the rotary pairs, then the second halves
    (rows 0..d/2-1, d/2..d-1); llama.cpp wants them interleaved (0, d/2, 1, d/2+1, ...).
    Works on float weights, codes and per-row scales alike (rows only move).
    """
    rest = t.shape[1:]
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *rest).transpose(1, 2).reshape(t.shape)


def _position_offset(cfg) -> int:
    """RoBERTa's positions start after its padding id (pad + 1 rows unused); llama.cpp's start at 0."""
    return int(cfg.pad_token_id) + 1 if getattr(cfg, "model_type", "") == "roberta" else 0


def _encoder_sources(model: nn.Module, srcs: dict) -> dict:
    """An encoder's tensors as llama.cpp's BERT runtime names them: the base model's prefix
    ("bert.", "roberta.") dropped, the pooler and task heads left out (the runtime has none;
    said in the log), RoBERTa's position table from its first real position."""
    base = getattr(model, "base_model_prefix", "")
    out, dropped = {}, []
    for k, v in srcs.items():
        if base and k.startswith(base + "."):
            k = k[len(base) + 1:]
        if k.startswith(("pooler.", "cls.", "lm_head.", "classifier.", "qa_outputs.")) or k.endswith(
                ("position_ids", "token_type_ids")):
            dropped.append(k)
            continue
        if k == "embeddings.position_embeddings.weight":
            v = v[_position_offset(model.config):]
        out[k] = v
    if dropped:
        log.info("GGUF export of an encoder: %d tensors of the pooler / task head left out (%s, ...); llama.cpp's "
                 "BERT runtime computes embeddings only", len(dropped), dropped[0])
    return out


def _sources(model: nn.Module) -> dict[str, "torch.Tensor | QuantizedWeight"]:
    """HF tensor name -> float tensor or QuantizedWeight, for every persistent weight."""
    from ..nn.quant_linear import QuantEmbedding, QuantLinear

    out: dict[str, torch.Tensor | QuantizedWeight] = {}
    quantized = set()
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in quantized):
            continue  # e.g. the head a QuantEmbedding shares (tied weights)
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            prefix = f"{name}." if name else ""
            out[prefix + "weight"] = mod.quantized_weight()
            quantized.add(name)
            if getattr(mod, "bias", None) is not None:
                out[prefix + "bias"] = mod.bias.detach()
    for name, t in model.state_dict(keep_vars=False).items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized or name in out or name.endswith(_SKIP):
            continue
        out[name] = t.detach()
    _stack_experts(model, out)
    for name, mod in model.named_modules():  # a float Conv1D (GPT-2) holds [in, out]: written [out, in]
        key = f"{name}.weight"
        if key in out and isinstance(out[key], torch.Tensor) and type(mod).__name__ == "Conv1D":
            out[key] = mod.weight.detach().t()
    cfg = getattr(model, "config", None)
    if getattr(cfg, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # llama.cpp uses token_embd when output.weight is absent
    return out


def _stack_experts(model: nn.Module, out: dict) -> None:
    """Experts as llama.cpp stores them: one [E, out, in] float tensor per projection, the fused
    gate_up split into `<experts>.gate_proj` and `.up_proj` (ffn_gate_exps, ffn_up_exps). A
    quantized expert is dequantized here (rounded to the file's type once more, said in the summary)."""
    from ..modules import fused_parameters
    from ..nn import ExpertLinears

    stacks = {n: getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]).detach().float()
              for n in fused_parameters(model)}
    for name, mod in model.named_modules():
        if isinstance(mod, ExpertLinears):
            if mod.transposed:
                raise SourceError(f"GGUF export: {name} stores its experts transposed ([E, in, out]); not supported yet")
            per = [out.pop(f"{name}.{e}.weight") for e in range(len(mod))]
            stacks[name] = torch.stack([p.dequantize(torch.float32) if isinstance(p, QuantizedWeight) else p.float()
                                        for p in per])
    for name, w in stacks.items():
        out.pop(name, None)
        owner, _, param = name.rpartition(".")
        if param == "gate_up_proj":
            half = w.shape[1] // 2
            out[f"{owner}.gate_proj.weight"], out[f"{owner}.up_proj.weight"] = w[:, :half], w[:, half:]
        else:
            out[f"{owner}.{param}.weight"] = w


def _neox_qkv(src, n_head: int):
    """GPT-NeoX's query_key_value rows [n_head, (q, k, v), head_dim, ...] as llama.cpp's q | k | v
    blocks (a weight's rows or a bias): float, or a quantized weight dequantized (rows only move,
    but its codes are read through the float path here)."""
    t = src.dequantize(torch.float32) if isinstance(src, QuantizedWeight) else src.float()
    rest = t.shape[1:]
    return t.reshape(n_head, 3, t.shape[0] // n_head // 3, *rest).transpose(0, 1).reshape(t.shape)


def repack(qw: QuantizedWeight, type_name: str) -> torch.Tensor | None:
    """Bytes [out, in/32·nbytes] of a quantkit integer weight in a legacy GGUF type, or None.

    Possible when the weight's grid is the type's grid: groups of 32, same code range and
    symmetry. Affine weights need their offset m = -s·z in float16; it is rounded there
    (codes and scales are copied exactly).
    """
    g = LINEAR_GRIDS.get(type_name)
    s = qw.scheme
    if g is None or s.kind != "int" or s.group_size != 32:
        return None
    if g.affine == s.symmetric or s.bits != {254: 8, 15: 4, 31: 5}.get(g.qmax - g.qmin):
        return None
    if s.symmetric and s.bits != 8 and g.qmin != -(2 ** (s.bits - 1)):
        return None
    q, scale, zero, L = int_codes(qw)  # q [out, in]; scale, zero [out, in/32]
    out, inn = qw.shape
    d = scale.reshape(-1)
    m = torch.zeros_like(d) if zero is None else (-scale * zero).reshape(-1)
    return g.pack_dm(q.reshape(-1, 32), d, m).reshape(out, inn // 32 * g.nbytes)


def _to_bytes(src, type_name: str, name: str, summary: ExportSummary) -> torch.Tensor:
    if isinstance(src, QuantizedWeight):
        if src.scheme.kind == "float":
            return quantize_rows(src.dequantize(torch.float32), type_name)
        if src.scheme.kind == "ggml" and src.scheme.fp_format == type_name:
            summary.repacked.append(name)  # already the file's bytes (e.g. GPTQ onto this grid)
            return src.tensors["qweight"]
        b = repack(src, type_name)
        if b is not None:
            summary.repacked.append(name)
            return b
        summary.requantized.append((name, f"{src.scheme.name} is not on the {type_name} grid"))
        return quantize_rows(src.dequantize(torch.float32), type_name)
    if src.dim() == 3:  # stacked experts [E, out, in]: rows of every expert
        return quantize_rows(src.float().reshape(-1, src.shape[-1]), type_name).reshape(*src.shape[:2], -1)
    return quantize_rows(src.float(), type_name)


def plan_types(model: nn.Module, ftype: str) -> dict[str, str]:
    """{Linear module name: GGML type} that a GGUF file of `ftype` gives each Linear layer
    (embeddings and a tied head excluded), by llama.cpp's rules (`ggml_mix`)."""
    import gguf

    ftype = ftype.upper()
    if ftype not in FTYPES:
        raise SchemeError(f"unknown GGUF type {ftype!r}; choose one of {', '.join(FTYPES)}")
    _, arch = _arch(model)
    cfg = model.config
    n_blocks = int(cfg.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], n_blocks)
    has_output = not getattr(cfg, "tie_word_embeddings", False)
    n_gqa = cfg.num_attention_heads // _kv_heads(cfg, arch)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            gname = names.get_name(name + ".weight", try_suffixes=(".weight",))
            if gname is None or gname.startswith(("token_embd", "output.")):
                continue
            out[name] = tensor_type(gname, tuple(mod.weight.shape), ftype, n_blocks, has_output, n_gqa)
    return out


def export_gguf(model: nn.Module, tokenizer, path: "str | os.PathLike", ftype: str = "Q8_0",
                tokenizer_pre: str | None = None, progress: bool = True, overwrite: bool = False,
                protect=()) -> ExportSummary:
    """Write `model` (float or quantkit-quantized) and its tokenizer as a GGUF file llama.cpp runs.

    An existing GGUF file at `path` is replaced; anything else only with `overwrite`, and a
    `protect`ed path (the source) never (io.atomic.check_output)."""
    import gguf

    ftype = ftype.upper()
    if ftype not in FTYPES:
        raise SchemeError(f"unknown GGUF type {ftype!r}; choose one of {', '.join(FTYPES)}")
    if tokenizer is None:
        raise SourceError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    _, arch = _arch(model)
    path = Path(path)
    if path.suffix.lower() != ".gguf":
        raise SourceError(f"the output file must end in .gguf: {path}")
    check_output(path, "gguf", overwrite=overwrite, protect=protect)  # before any weight work
    cfg = model.config
    n_blocks = int(cfg.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], n_blocks)
    srcs = _sources(model)
    if arch.encoder:
        srcs = _encoder_sources(model, srcs)
    tok_kv = tokenizer_fields(tokenizer, cfg, pre=tokenizer_pre)  # fail before any weight work
    has_output = "lm_head.weight" in srcs
    n_gqa = cfg.num_attention_heads // _kv_heads(cfg, arch)
    plan = []
    for hf_name, src in srcs.items():
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise SourceError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} of a {arch.gguf} model")
        shape = tuple(src.shape)
        plan.append((hf_name, gname, src, tensor_type(gname, shape, ftype, n_blocks, has_output, n_gqa)))
    summary = ExportSummary(path, ftype, 0)
    n_head = cfg.num_attention_heads
    n_kv = _kv_heads(cfg, arch)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(plan), desc=f"GGUF {ftype}", unit="tensor", leave=False)
    with atomic_path(path, "gguf", overwrite, protect) as tmp:
        w = gguf.GGUFWriter(tmp, arch=arch.gguf)
        w.add_name(str(getattr(cfg, "_name_or_path", "") or path.stem))
        _hparams(w, model, arch)
        w.add_file_type(int(FTYPES[ftype]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, (value, vtype, sub) in tok_kv.items():
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, value, vtype, sub_type=sub)
            else:
                w.add_key_value(key, value, vtype)
        for hf_name, gname, src, tname in plan:
            if arch.norm_offset and hf_name.endswith("norm.weight"):
                src = src.float() + 1.0
            if arch.neox_qkv and gname.endswith(("attn_qkv.weight", "attn_qkv.bias")):
                src = _neox_qkv(src, n_head)
            data = _to_bytes(src, tname, gname, summary)
            if arch.permute_qk and gname.endswith(("attn_q.weight", "attn_k.weight")):
                data = _permute(data, n_head if "attn_q" in gname else n_kv)
            if arch.permute_qk and gname.endswith(("attn_q.bias", "attn_k.bias")):
                data = _permute(data.view(-1, 1), n_head if "attn_q" in gname else n_kv).reshape(-1)
            arr = data.contiguous().numpy()  # uint8 [..., bytes]; the writer derives the element shape
            w.add_tensor(gname, arr, raw_shape=arr.shape, raw_dtype=gguf.GGMLQuantizationType[tname])
            summary.types[tname] = summary.types.get(tname, 0) + 1
            if bar is not None:
                bar.update(1)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    if bar is not None:
        bar.close()
    summary.bytes = path.stat().st_size
    for line in summary.lines():
        log.info(line)
    return summary
