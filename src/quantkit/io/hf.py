"""transformers integration: quantize while loading, and save_pretrained / from_pretrained.

    from transformers import AutoModelForCausalLM
    from quantkit import QuantkitConfig            # importing it registers "quantkit" with transformers
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QuantkitConfig(scheme="nf4-dq"))
    model.save_pretrained("out/")                  # quantkit's layout (io/checkpoint.py)
    model = AutoModelForCausalLM.from_pretrained("out/")   # no config argument needed

Through transformers' public registration API (`register_quantization_config`,
`register_quantizer`). On the fly, each Linear's float weight is quantized the moment the
loader reads it (transformers loads synchronously when a quantizer quantizes on the fly) and
the float tensor is dropped, so the float model is never whole in memory; the embedding/head
storage (bf16 by default) is applied after loading, as `qk.quantize` does. The per-layer work
is `pipeline.swap_quantized`, the same code `qk.quantize` runs, so the logits are identical.

A checkpoint saved either way (`save_pretrained` here, `qk.save`) has the same files; loading
it through transformers replaces each stored layer with a placeholder holding the stored
tensors (names, dtypes and shapes from the codec), which the loader fills and
`checkpoint.install_quantized` turns into QuantLinear / QuantEmbedding modules.
"""
from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import SchemeError
from ..memory import release_file_pages, trim_heap
from ..modules import head_modules, iter_targets, linear_weight, set_module
from ..pipeline import QuantInfo, needs_calibration, quantize_head, record_fallbacks, swap_quantized, validate_config
from ..config import QuantConfig, Rule, make_config
from ..scheme import parse_scheme
from .checkpoint import (LAYOUT_VERSION, METADATA, meta_quantize, stored_spec, checkpoint_tensors, install_quantized,
                         quant_info, quantization_config)

log = logging.getLogger(__name__)
QUANT_METHOD = "quantkit"
_SAVED_KEYS = ("format_version", "config", "layers", "methods", "fallbacks", "errors")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _dtype(d) -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    try:
        return _DTYPES[str(d).replace("torch.", "")]
    except KeyError:
        raise SchemeError(f"compute_dtype {d!r}: use float32, bfloat16 or float16") from None


class QuantkitConfig(QuantizationConfigMixin):
    """quantkit as a transformers `quantization_config`.

    scheme: any weight scheme of the grammar (`quantkit.GRAMMAR`), e.g. "int4-g128", "nf4-dq",
    "int8", "llm-int8"; method: "rtn" or "llm-int8" (data-free: GPTQ needs calibration data,
    use `qk.quantize`); head: embeddings/output head storage (bf16 default, "int8", "keep", ...);
    compute_dtype: dtype the unquantized parameters and activations use (default: the
    checkpoint's); modules_to_not_convert: Linears left in float, named as for bitsandbytes: a bare
    name ("down_proj", "mlp.down_proj") names every layer ending in it, a parent ("model.layers.0")
    the layers inside it, and fnmatch patterns ("*.mlp.*") work too (`scheme.Rule`); "lm_head"
    keeps the output head (and the embedding table it is stored with) in its original precision.
    A name that matches no module is refused, listing the model's layers.

    bitsandbytes-style shortcuts: `load_in_4bit=True` (with `bnb_4bit_quant_type` "nf4"/"fp4",
    `bnb_4bit_use_double_quant`, `bnb_4bit_compute_dtype`, `bnb_4bit_blocksize` 64) means
    scheme "nf4-b64-dq"; `load_in_8bit=True` means "llm-int8" (LLM.int8(), threshold 6.0).
    A config read back from a saved checkpoint carries what was done (layers, schemes, errors).
    """

    def __init__(self, scheme: str | None = None, method: str = "rtn", head=None, compute_dtype=None,
                 modules_to_not_convert=None, load_in_4bit: bool = False, load_in_8bit: bool = False,
                 bnb_4bit_quant_type: str = "nf4", bnb_4bit_use_double_quant: bool = True,
                 bnb_4bit_compute_dtype=None, bnb_4bit_blocksize: int = 64, llm_int8_threshold: float = 6.0,
                 quant_method: str = QUANT_METHOD, **saved):
        self.quant_method = QUANT_METHOD
        unknown = set(saved) - set(_SAVED_KEYS)
        if unknown:
            raise SchemeError(f"QuantkitConfig got unknown arguments {sorted(unknown)}; see help(QuantkitConfig)")
        self.saved = {k: saved[k] for k in _SAVED_KEYS if k in saved} or None
        if self.saved is not None:  # read back from a checkpoint: what was done, per layer
            self.saved["head"] = head if isinstance(head, dict) else {}
            self.compute_dtype = compute_dtype
            return
        if load_in_4bit and load_in_8bit:
            raise SchemeError("choose one of load_in_4bit and load_in_8bit")
        if load_in_4bit or load_in_8bit:
            if scheme is not None:
                raise SchemeError("give either scheme= or load_in_4bit/load_in_8bit, not both")
            if load_in_8bit and llm_int8_threshold != 6.0:
                raise SchemeError("quantkit's LLM.int8() uses the paper's outlier threshold 6.0; drop llm_int8_threshold")
            if load_in_4bit and bnb_4bit_quant_type not in ("nf4", "fp4"):
                raise SchemeError(f"bnb_4bit_quant_type must be nf4 or fp4, not {bnb_4bit_quant_type!r}")
            scheme = ("llm-int8" if load_in_8bit else
                      f"{bnb_4bit_quant_type}-b{bnb_4bit_blocksize}" + ("-dq" if bnb_4bit_use_double_quant else ""))
            compute_dtype = compute_dtype or bnb_4bit_compute_dtype
        if scheme is None:
            raise SchemeError("QuantkitConfig needs a scheme (e.g. scheme='int4-g128' or 'nf4-dq') or load_in_4bit=True")
        self.scheme = parse_scheme(scheme).name
        self.method = method
        self.head = head
        self.compute_dtype = None if compute_dtype is None else str(_dtype(compute_dtype)).replace("torch.", "")
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.quant_config()  # refuse bad schemes, heads and methods now, not in the middle of loading

    def quant_config(self) -> QuantConfig:
        """The QuantConfig this asks for (rules keep `modules_to_not_convert` in float)."""
        if self.saved is not None:
            return QuantConfig.from_dict(self.saved["config"])
        method = "llm-int8" if self.scheme == "llm-int8" and self.method == "rtn" else self.method
        rules = tuple(Rule(p, None, method) for p in self.modules_to_not_convert)
        cfg = make_config(self.scheme, method, self.head, rules)
        validate_config(cfg)
        if needs_calibration(cfg):
            raise SchemeError(f"{self.scheme} with {method} needs calibration data, which quantize-on-load does not "
                              "have; load the float model and call qk.quantize(model, ..., calib=TEXT)")
        return cfg

    def record(self, saved: dict) -> None:
        """After quantizing: keep what was done, so save_pretrained writes quantkit's config."""
        self.saved = {k: saved[k] for k in _SAVED_KEYS if k in saved}
        self.saved["head"] = saved.get("head", {})

    def to_dict(self) -> dict:
        if self.saved is not None:
            d = {"quant_method": QUANT_METHOD, **self.saved}
            if self.compute_dtype is not None:
                d["compute_dtype"] = self.compute_dtype
            return d
        return {"quant_method": QUANT_METHOD, "scheme": self.scheme, "method": self.method, "head": self.head,
                "compute_dtype": self.compute_dtype, "modules_to_not_convert": self.modules_to_not_convert}

    def to_diff_dict(self) -> dict:
        return self.to_dict()


class _Stored(nn.Module):
    """Placeholder for a stored layer while transformers loads a quantkit checkpoint: one buffer
    per stored tensor (name, dtype, shape from the codec), filled by the loader."""

    def __init__(self, scheme, shape, bias: torch.Tensor | None = None):
        super().__init__()
        self.stored_shape = tuple(shape)
        with torch.device("cpu"):  # transformers builds the skeleton under a meta device context
            spec = stored_spec(meta_quantize(self.stored_shape, scheme))
        for part, (dt, sh) in spec.items():
            self.register_buffer(part, torch.empty(sh, dtype=dt, device="meta"))
        self.bias = None if bias is None else nn.Parameter(torch.empty_like(bias, device="meta"), requires_grad=False)


class QuantizeOnLoad(ConversionOps):
    """transformers ConversionOps: quantize one Linear's weight the moment it is read."""

    def __init__(self, quantizer: "QuantkitHfQuantizer"):
        self.hf_quantizer = quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, model=None, full_layer_name=None,
                missing_keys=None, **kwargs):
        (value,) = tuple(input_dict.values())
        w = value[0] if isinstance(value, (list, tuple)) else value
        name = full_layer_name.rpartition(".")[0]
        q = self.hf_quantizer
        scheme, method = q.targets[name]
        mod = model.get_submodule(name)
        mod.weight = nn.Parameter(w, requires_grad=False)
        swap_quantized(model, name, mod, scheme, method, {}, q.info)
        q.packed[name] = dict(model.get_submodule(name).named_buffers(recurse=False))  # storage, as quantized
        del mod.weight
        release_file_pages(w)  # the float weight was read through the checkpoint's mmap: let its pages go
        trim_heap()
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}

    @property
    def reverse_op(self):
        raise NotImplementedError("a quantized weight cannot be turned back into the float one")


class QuantkitHfQuantizer(HfQuantizer):
    """transformers' HfQuantizer for quant_method "quantkit" (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantkitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.cfg = quantization_config.quant_config()
        self.info = quant_info(quantization_config.to_dict()) if self.pre_quantized else QuantInfo(self.cfg)
        self.targets: dict[str, tuple] = {}
        # kernel buffers of the layers quantized on load: transformers re-allocates every
        # non-persistent buffer (empty) after reading the checkpoint; they are put back after loading
        self.packed: dict[str, dict[str, torch.Tensor]] = {}

    def update_dtype(self, dtype):
        cd = _dtype(self.quantization_config.compute_dtype)
        return cd if cd is not None else dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        name, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and tensor == "weight" and name in self.targets

    def _process_model_before_weight_loading(self, model, **kwargs):
        emb_name, out_name, _ = head_modules(model)
        if self.pre_quantized:
            self._install_placeholders(model)
            return model
        layers = [(n, tuple(mod.weight.shape)) for n, mod in model.named_modules()
                  if isinstance(mod, nn.Linear) and n != out_name]
        resolved = iter_targets(model, self.cfg, layers)  # every layer and rule checked before any weight is read
        record_fallbacks(self.info, resolved)
        self.targets = {n: (scheme, method) for n, _, scheme, method, _ in resolved if scheme is not None}
        if not self.targets:
            raise SchemeError("this model has no Linear layers to quantize")
        return model

    def _install_placeholders(self, model) -> None:
        info = self.info
        for name, scheme in info.layers.items():
            mod = model.get_submodule(name)
            set_module(model, name, _Stored(parse_scheme(scheme), tuple(linear_weight(mod).shape),
                                             getattr(mod, "bias", None)))
        head = info.head
        if head:
            hs = parse_scheme(head["scheme"])
            for n in [head.get("embedding")] + ([] if head.get("tied") else [head.get("head")]):
                if n:
                    m = model.get_submodule(n)
                    w = linear_weight(m) if linear_weight(m) is not None else m.weight
                    set_module(model, n, _Stored(hs, tuple(w.shape), getattr(m, "bias", None)))
            if head.get("tied") and head.get("head"):  # one stored table; install_quantized ties the modules
                set_module(model, head["head"], nn.Module())
                model.all_tied_weights_keys = {}

    def get_quantize_ops(self):
        return QuantizeOnLoad(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        emb_name, out_name, tied = head_modules(model) if not self.pre_quantized else (None, None, None)
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if self.pre_quantized:
            stored = {}
            for name, mod in model.named_modules():
                if isinstance(mod, _Stored):
                    for k, t in list(mod.named_buffers(recurse=False)) + list(mod.named_parameters(recurse=False)):
                        stored[f"{name}.{k}"] = t
            install_quantized(model, self.info, set(stored), stored.__getitem__, dtype)
        else:
            missing = [n for n in self.targets if n not in self.info.layers]
            if missing:
                raise SchemeError(f"{len(missing)} layers were not in the checkpoint (e.g. {missing[0]})")
            for name, bufs in self.packed.items():
                mod = model.get_submodule(name)
                for k, t in bufs.items():
                    setattr(mod, k, t)
            self.packed.clear()
            floats = [linear_weight(m) if linear_weight(m) is not None else m.weight
                      for m in (model.get_submodule(n) for n in {emb_name, out_name} - {None})]
            quantize_head(model, self.cfg, self.info, emb_name, out_name, tied)
            for w in floats:
                release_file_pages(w.detach())
            del floats
            trim_heap()
        model.quantkit = self.info
        self.quantization_config.record(quantization_config(model))
        model.eval()
        return model

    def get_state_dict_and_metadata(self, model):
        return checkpoint_tensors(model), dict(METADATA)

    def is_serializable(self, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Register "quantkit" with transformers (idempotent; done when this module is imported)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuantkitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)


register()
assert LAYOUT_VERSION == 1  # placeholders and install_quantized follow layout version 1
