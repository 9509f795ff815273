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

from ..errors import SchemeError
from ..memory import release_file_pages, trim_heap
from ..modules import fused_parameters, head_modules, iter_targets, linear_weight, quantizable_layers, set_module, split_experts
from ..pipeline import QuantInfo, needs_calibration, quantize_head, quantize_model, record_fallbacks, swap_quantized
from ..scheme import parse_scheme
from .hf_config import QUANT_METHOD, QuantkitConfig, as_dtype
from .checkpoint import (LAYOUT_VERSION, METADATA, meta_quantize, stored_spec, checkpoint_tensors, install_quantized,
                         quant_info, quantization_config)

log = logging.getLogger(__name__)


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
        # calibrated methods (gptq) see the whole float model: it is loaded first, then quantized
        self.calibrated = not self.pre_quantized and needs_calibration(self.cfg)
        self.targets: dict[str, tuple] = {}
        # kernel buffers of the layers quantized on load: transformers re-allocates every
        # non-persistent buffer (empty) after reading the checkpoint; they are put back after loading
        self.packed: dict[str, dict[str, torch.Tensor]] = {}

    def update_dtype(self, dtype):
        cd = as_dtype(self.quantization_config.compute_dtype)
        return cd if cd is not None else dtype

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        """A Linear's weight is quantized as it is read; fused experts (read whole, often merged
        from per-expert tensors by transformers' conversions) after loading, expert by expert."""
        name, _, tensor = param_name.rpartition(".")
        return not self.pre_quantized and not self.calibrated and tensor == "weight" and name in self.targets

    def _process_model_before_weight_loading(self, model, **kwargs):
        emb_name, out_name, _ = head_modules(model)
        if self.pre_quantized:
            self._install_placeholders(model)
            return model
        fused = fused_parameters(model)
        layers = [(n, sh) for n, sh in quantizable_layers(model)
                  if n.rpartition(".")[0] in fused or isinstance(model.get_submodule(n), nn.Linear)]
        resolved = iter_targets(model, self.cfg, layers)  # every layer and rule checked before any weight is read
        record_fallbacks(self.info, resolved)
        self.targets = {n: (scheme, method) for n, _, scheme, method, _ in resolved if scheme is not None}
        if not self.targets:
            raise SchemeError("this model has no Linear layers to quantize")
        return model

    def _install_placeholders(self, model) -> None:
        info = self.info
        split_experts(model)  # experts are stored a layer each
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
        elif self.calibrated:
            model.eval()  # calibration runs the model: no dropout
            self.info = quantize_model(model, self.cfg, inplace=True, calib=self._calibration(model)).quantkit
        else:
            fused = fused_parameters(model)
            missing = [n for n in self.targets if n not in self.info.layers and n.rpartition(".")[0] not in fused]
            if missing:
                raise SchemeError(f"{len(missing)} layers were not in the checkpoint (e.g. {missing[0]})")
            for name, bufs in self.packed.items():
                mod = model.get_submodule(name)
                for k, t in bufs.items():
                    setattr(mod, k, t)
            self.packed.clear()
            self._quantize_experts(model)
            floats = [linear_weight(m) if linear_weight(m) is not None else m.weight
                      for m in (model.get_submodule(n) for n in {emb_name, out_name} - {None})]
            quantize_head(model, self.cfg, self.info, emb_name, out_name, tied)
            for w in floats:
                release_file_pages(w.detach())
            del floats
            trim_heap()
        model.quantkit = self.info
        # saved in quantkit's layout, under the names the modules have now: transformers must not
        # turn them back into a legacy checkpoint's (per-expert w1/w2/w3 tensors, merged on load)
        model._weight_conversions = []
        self.quantization_config.record(quantization_config(model))
        model.eval()
        return model

    def _calibration(self, model) -> torch.Tensor:
        """Calibration token ids from the config's dataset (a text file's calibration part, see
        data.calibration, or a list of texts), tokenized by its tokenizer or the model's own."""
        from transformers import AutoTokenizer

        from ..data import calib_samples, calibration

        qc = self.quantization_config
        tok = qc.tokenizer
        if tok is None or isinstance(tok, str):
            tok = AutoTokenizer.from_pretrained(tok or model.config._name_or_path)
        if isinstance(qc.dataset, str):
            return calibration(tok, qc.dataset, n=qc.calib_samples, length=qc.calib_len)
        return calib_samples(tok, "\n\n".join(qc.dataset), qc.calib_samples, qc.calib_len)

    def _quantize_experts(self, model) -> None:
        """Quantize the fused experts, now loaded, one expert at a time (pipeline.swap_quantized,
        as qk.quantize does), then let their float pages go."""
        fused = fused_parameters(model)
        if not fused:
            return
        floats = [getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]).detach() for n in fused]
        split_experts(model)
        for name, (scheme, method) in self.targets.items():
            if name.rpartition(".")[0] in fused:
                swap_quantized(model, name, model.get_submodule(name), scheme, method, {}, self.info)
        for w in floats:
            release_file_pages(w)
        del floats
        trim_heap()

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
