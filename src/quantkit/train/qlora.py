"""QLoRA: LoRA adapters trained over a frozen 4-bit base (Dettmers et al. 2023, arXiv:2305.14314).

`prepare_qlora(model)` quantizes the base with `qk.quantize` (NF4, blocks of 64, double
quantization: the paper's defaults) in the compute dtype asked, then wraps the target Linears
(q_proj and v_proj by default) in `LoRALinear` adapters (r=8, alpha=32); only the adapters
train. `save_adapter` writes PEFT's layout (`adapter_config.json` +
`adapter_model.safetensors`) so `peft.PeftModel.from_pretrained` loads it onto the
dequantized base; `merge` folds the adapters into the weights and quantizes them again.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import SchemeError
from ..io.atomic import atomic_dir
from ..nn import LoRALinear, QuantEmbedding, QuantLinear
from ..modules import linear_weight, set_module

DEFAULT_TARGETS = ("q_proj", "v_proj")
DEFAULT_SCHEME = "nf4-b64-dq"
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def prepare_qlora(model: nn.Module, scheme: str = DEFAULT_SCHEME, r: int = 8, alpha: float = 32, dropout: float = 0.05,
                  targets=DEFAULT_TARGETS, compute_dtype: str = "fp32", progress: bool = False) -> nn.Module:
    """A 4-bit copy of `model` with trainable LoRA adapters on the `targets` Linears."""
    from ..pipeline import quantize_model, validate_config
    from ..config import make_config

    if compute_dtype not in COMPUTE_DTYPES:
        raise SchemeError(f"unknown compute dtype {compute_dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}")
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise SchemeError(f"LoRA needs r >= 1, alpha > 0 and dropout in [0, 1) (got r={r}, alpha={alpha}, dropout={dropout})")
    targets = tuple(targets)
    check_linear_names(model, targets)
    dtype = COMPUTE_DTYPES[compute_dtype]
    base = model if dtype == torch.float32 else _to_dtype_copy(model, dtype)
    cfg = make_config(scheme, "rtn", "keep")
    validate_config(cfg)
    qmodel = quantize_model(base, cfg, progress=progress)
    for name, mod in list(qmodel.named_modules()):  # gradients flow through every base layer to the adapters
        if isinstance(mod, QuantLinear) and not mod.kernel.differentiable:
            set_module(qmodel, name, QuantLinear(mod.quantized_weight(), mod.bias, kernel="dequant"))
    wrapped = []
    for name, mod in list(qmodel.named_modules()):
        if isinstance(mod, QuantLinear) and name.rsplit(".", 1)[-1] in targets and name in qmodel.quantkit.layers:
            set_module(qmodel, name, LoRALinear(mod, mod.in_features, mod.out_features, r, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        names = sorted({n.rsplit(".", 1)[-1] for n in qmodel.quantkit.layers})
        raise SchemeError(f"no Linear named {', '.join(targets)} in this model; its Linears are: {', '.join(names)}")
    for n, p in qmodel.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    qmodel.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
                          "compute_dtype": compute_dtype, "base_scheme": qmodel.quantkit.config.scheme.name}
    return qmodel


def _to_dtype_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's names (base_model.model.<module>.lora_A.weight, ...)."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().float().contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().float().contiguous()
    return out


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str = "", overwrite: bool = False) -> Path:
    """Write the adapters in PEFT's layout (atomic); `peft` loads them onto the dequantized base."""
    layers = lora_layers(model)
    if not layers:
        raise SchemeError("this model has no LoRA adapters to save (call prepare_qlora first)")
    lc = model.lora_config
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
              "r": lc["r"], "lora_alpha": lc["lora_alpha"], "lora_dropout": lc["lora_dropout"],
              "target_modules": lc["target_modules"], "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
              "use_rslora": False, "use_dora": False}
    base_info = {"base_scheme": lc["base_scheme"], "compute_dtype": lc["compute_dtype"], "base_model": str(base_model)}
    out = Path(out_dir)
    with atomic_dir(out, "adapter", overwrite) as tmp:
        save_file(adapter_state_dict(model), str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (Path(tmp) / "quantkit_base.json").write_text(json.dumps(base_info, indent=2))  # how the base was quantized
    return out


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load adapter weights saved by `save_adapter` (or by peft, same layout) into a model from
    `prepare_qlora` with the same rank and targets, in place."""
    from safetensors.torch import load_file

    from ..errors import SourceError

    try:
        state = load_file(str(Path(folder) / "adapter_model.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise SourceError(f"cannot read the adapter in {folder}: {e}") from None
    mine = adapter_state_dict(model)
    if set(state) != set(mine):
        raise SourceError(f"{folder}: adapter does not match this model's LoRA layers (rank, targets or model differ)")
    layers = lora_layers(model)
    with torch.no_grad():
        for key, t in state.items():
            name, part = key[len("base_model.model."):].rsplit(".", 2)[:2]
            w = getattr(layers[name], part).weight
            if w.shape != t.shape:
                raise SourceError(f"{folder}: {key} has shape {tuple(t.shape)}, this model expects {tuple(w.shape)}")
            w.copy_(t)
    return model


def dequantized_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A float copy of a quantized model: every QuantLinear/QuantEmbedding becomes an
    nn.Linear/nn.Embedding holding its dequantized weight; LoRA adapters are dropped (their
    bases kept). What a peer (peft, transformers) sees as the base model."""
    import copy

    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, LoRALinear):
            set_module(m, name, mod.base)
    emb = {}
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantEmbedding):
            w = mod.quantized_weight().dequantize(dtype)
            e = nn.Embedding(w.shape[0], w.shape[1], padding_idx=mod.padding_idx, dtype=dtype)
            e.weight = nn.Parameter(w, requires_grad=False)
            set_module(m, name, e)
            emb[id(mod.linear)] = e
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, dtype=dtype)
            if id(mod) in emb:
                lin.weight = emb[id(mod)].weight  # tied head stays tied
            else:
                lin.weight = nn.Parameter(mod.dequantized_weight(dtype), requires_grad=False)
            if mod.bias is not None:
                lin.bias = nn.Parameter(mod.bias.detach().to(dtype), requires_grad=False)
            set_module(m, name, lin)
    for attr in ("quantkit", "lora_config"):
        if hasattr(m, attr):
            delattr(m, attr)
    return m


@torch.no_grad()
def merge(model: nn.Module, scheme: "str | None" = None) -> nn.Module:
    """Fold every adapter into its base weight and quantize it again (round to nearest) with
    the base's scheme, or `scheme` (e.g. "int8": a finer grid keeps more of a small update),
    in place; returns a plain quantized model (`qk.save` takes it)."""
    from ..algorithms import method_of
    from ..scheme import parse_scheme

    target = None if scheme is None else parse_scheme(scheme)

    layers = lora_layers(model)
    if not layers:
        raise SchemeError("this model has no LoRA adapters to merge")
    info = model.quantkit
    for name, m in layers.items():
        base = m.base
        w = base.dequantized_weight(torch.float32) + m.delta_weight()
        sc = base.scheme if target is None else target.fallback_for(w.shape[1]) or target
        qw = method_of("rtn").quantize(w, sc, {})
        set_module(model, name, QuantLinear(qw, base.bias))
        info.methods[name] = "qlora-merge"
        info.layers[name] = sc.name
        info.errors[name] = float((w - qw.dequantize()).norm() / w.norm().clamp(min=1e-12))
    del model.lora_config
    model.eval()
    return model


def check_linear_names(model: nn.Module, targets) -> None:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_weight(m) is not None}
    missing = [t for t in targets if t not in names]
    if missing:
        raise SchemeError(f"no Linear named {', '.join(missing)}; this model's Linears: {', '.join(sorted(names))}")
