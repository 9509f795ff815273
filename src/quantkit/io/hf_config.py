"""`QuantkitConfig`: quantkit as a transformers `quantization_config`, and the seed users' own
keys: every `BitsAndBytesConfig` key with bitsandbytes' defaults and meaning, and
`from_bnb` / `from_gptq`, which translate those objects field by field as the installed
transformers defines them, refusing by name a field quantkit cannot honour.

bitsandbytes' meaning, kept on purpose (it differs from quantkit's own defaults):
* `load_in_4bit=True` alone is bnb's default 4-bit type, fp4 without double quantization
  (scheme fp4-b64); `bnb_4bit_quant_type="nf4"` and `bnb_4bit_use_double_quant=True` give nf4-b64-dq;
* bnb keeps the embedding table and output head in the compute dtype: so does this (head "keep"),
  unless `llm_int8_skip_modules` is a list without the head (bnb then quantizes it; quantkit
  stores embeddings/head as int8, the nearest storage it has, and says so);
* `llm_int8_skip_modules` names modules as bnb (transformers' should_convert_module) does;
* `llm_int8_threshold` is LLM.int8()'s outlier threshold, any positive value (scheme llm-int8-tX).
"""
from __future__ import annotations

import logging

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import QuantConfig, Rule, make_config
from ..errors import SchemeError
from ..pipeline import needs_calibration, validate_config
from ..scheme import parse_scheme

log = logging.getLogger(__name__)
QUANT_METHOD = "quantkit"
SAVED_KEYS = ("format_version", "config", "layers", "methods", "fallbacks", "errors")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32")
# BitsAndBytesConfig's fields (transformers' names), with bitsandbytes' defaults
BNB_DEFAULTS = dict(load_in_8bit=False, load_in_4bit=False, llm_int8_threshold=6.0, llm_int8_skip_modules=None,
                    llm_int8_enable_fp32_cpu_offload=False, llm_int8_has_fp16_weight=False,
                    bnb_4bit_compute_dtype=None, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                    bnb_4bit_quant_storage=None)
_BNB_BOOKKEEPING = {"quant_method", "_load_in_8bit", "_load_in_4bit"}
# GPTQConfig fields that only choose GPU kernels, packing or caching: no effect on the weights here
_GPTQ_NO_EFFECT = {"quant_method", "backend", "use_cuda_fp16", "use_exllama", "exllama_config", "cache_block_outputs",
                   "max_input_length", "meta", "format", "checkpoint_format", "pad_token_id", "tokenizer", "dataset"}


def as_dtype(d, key: str = "compute_dtype") -> torch.dtype | None:
    if d is None or isinstance(d, torch.dtype):
        return d
    try:
        return _DTYPES[str(d).replace("torch.", "")]
    except KeyError:
        raise SchemeError(f"{key} {d!r}: use float32, bfloat16 or float16") from None


def _dtype_name(d) -> str | None:
    return None if d is None else str(as_dtype(d)).replace("torch.", "")


class QuantkitConfig(QuantizationConfigMixin):
    """quantkit as a transformers `quantization_config`.

    scheme: any weight scheme of the grammar (`quantkit.GRAMMAR`), e.g. "int4-g128", "nf4-dq",
    "int8", "llm-int8"; method: "rtn", "llm-int8", or "gptq" with calibration `dataset` (a text
    file's path, or a list of texts) tokenized by `tokenizer` (a tokenizer or its name/path;
    default the model's own), `calib_samples` x `calib_len` tokens; `method_options` the
    method's own options ({"damp": 0.01, "act_order": False}, see `qk.GPTQ`), `sequential` its
    group order. head: embeddings/output head storage (bf16 default, "int8", "keep", ...);
    compute_dtype: dtype the unquantized parameters and activations use (default: the
    checkpoint's); modules_to_not_convert: Linears left in float, named as for bitsandbytes: a
    bare name ("down_proj", "mlp.down_proj") names every layer ending in it, a parent
    ("model.layers.0") the layers inside it, and fnmatch patterns ("*.mlp.*") work too
    (`config.Rule`); "lm_head" keeps the output head (and the embedding table it is stored
    with) in its original precision. A name that matches no module is refused, listing the
    model's layers.

    Every `BitsAndBytesConfig` key is accepted with bitsandbytes' defaults and meaning (module
    docstring); `from_bnb(BitsAndBytesConfig(...))` and `from_gptq(GPTQConfig(...))` translate
    those objects. A config read back from a saved checkpoint carries what was done (layers,
    schemes, errors).
    """

    def __init__(self, scheme: str | None = None, method: str = "rtn", head=None, compute_dtype=None,
                 modules_to_not_convert=None, method_options: dict | None = None, sequential: bool = False,
                 dataset=None, tokenizer=None, calib_samples: int = 128, calib_len: int = 512,
                 load_in_4bit: bool = False, load_in_8bit: bool = False, bnb_4bit_quant_type: str = "fp4",
                 bnb_4bit_use_double_quant: bool = False, bnb_4bit_compute_dtype=None, bnb_4bit_quant_storage=None,
                 bnb_4bit_blocksize: int = 64, llm_int8_threshold: float = 6.0, llm_int8_skip_modules=None,
                 llm_int8_has_fp16_weight: bool = False, llm_int8_enable_fp32_cpu_offload: bool = False,
                 quant_method: str = QUANT_METHOD, **saved):
        self.quant_method = QUANT_METHOD
        unknown = set(saved) - set(SAVED_KEYS)
        if unknown:
            raise SchemeError(f"QuantkitConfig got unknown arguments {sorted(unknown)}; see help(QuantkitConfig)")
        self.saved = {k: saved[k] for k in SAVED_KEYS if k in saved} or None
        if self.saved is not None:  # read back from a checkpoint: what was done, per layer
            self.saved["head"] = head if isinstance(head, dict) else {}
            self.compute_dtype = compute_dtype
            self.dataset = self.tokenizer = None
            return
        skip = list(modules_to_not_convert or [])
        if load_in_4bit and load_in_8bit:
            raise SchemeError("choose one of load_in_4bit and load_in_8bit")
        if load_in_4bit or load_in_8bit:
            if scheme is not None:
                raise SchemeError("give either scheme= or load_in_4bit/load_in_8bit, not both")
            scheme, head, skip = self._bnb(load_in_4bit, bnb_4bit_quant_type, bnb_4bit_use_double_quant,
                                           bnb_4bit_blocksize, bnb_4bit_quant_storage, llm_int8_threshold,
                                           llm_int8_skip_modules, llm_int8_has_fp16_weight,
                                           llm_int8_enable_fp32_cpu_offload, head, skip)
            compute_dtype = compute_dtype or bnb_4bit_compute_dtype
        if scheme is None:
            raise SchemeError("QuantkitConfig needs a scheme (e.g. scheme='int4-g128' or 'nf4-dq') or load_in_4bit=True")
        self.scheme = parse_scheme(scheme).name
        self.method = method
        self.method_options = dict(method_options or {})
        self.sequential = bool(sequential)
        self.head = head
        self.compute_dtype = _dtype_name(compute_dtype)
        self.modules_to_not_convert = skip
        self.dataset = dataset if dataset is None or isinstance(dataset, str) else list(dataset)
        self.tokenizer = tokenizer  # not saved (an object): the checkpoint records what was done
        self.calib_samples, self.calib_len = int(calib_samples), int(calib_len)
        self.quant_config()  # refuse bad schemes, heads and methods now, not in the middle of loading

    @staticmethod
    def _bnb(four, quant_type, double_quant, blocksize, storage, threshold, skip_modules, fp16_weight, cpu_offload,
             head, skip):
        """(scheme, head, modules kept in float) for bitsandbytes' keys, as bitsandbytes means them."""
        if fp16_weight:
            raise SchemeError("llm_int8_has_fp16_weight=True keeps trainable float16 weights beside the int8 ones "
                              "(bitsandbytes' training mode); quantkit stores int8 weights only: train with "
                              "quantkit's QAT or QLoRA instead")
        if cpu_offload:
            log.warning("llm_int8_enable_fp32_cpu_offload: quantkit runs every layer quantized on this CPU, nothing "
                        "is offloaded between devices, so the key changes nothing here")
        if four:
            if quant_type not in ("nf4", "fp4"):
                raise SchemeError(f"bnb_4bit_quant_type must be nf4 or fp4, not {quant_type!r}")
            if storage is not None and _dtype_or_str(storage) not in _STORAGE_DTYPES:
                raise SchemeError(f"bnb_4bit_quant_storage {storage!r}: use one of {', '.join(_STORAGE_DTYPES)}")
            if storage is not None and _dtype_or_str(storage) != "uint8":
                log.info("bnb_4bit_quant_storage %s is the container dtype bitsandbytes views the packed codes as; "
                         "quantkit packs the same codes in uint8", _dtype_or_str(storage))
            scheme = f"{quant_type}-b{blocksize}" + ("-dq" if double_quant else "")
        else:
            scheme = parse_scheme(f"llm-int8-t{float(threshold):g}").name
        if skip_modules is None:  # bnb's default: the output head (and, as bnb never converts them, the embeddings)
            return scheme, "keep" if head is None else head, skip
        names = list(skip_modules)
        heads = [n for n in names if n == "lm_head" or n.endswith(".lm_head")]
        if not heads and head is None:
            log.warning("llm_int8_skip_modules %s does not name lm_head, so bitsandbytes would quantize the output "
                        "head too; quantkit stores the embedding table and output head as int8", names)
            head = "int8"
        return scheme, "keep" if head is None else head, skip + names

    @classmethod
    def from_bnb(cls, bnb, **extra) -> "QuantkitConfig":
        """Translate a transformers `BitsAndBytesConfig`, field by field (`extra`: quantkit's own
        keywords, e.g. head=). A field this transformers adds that quantkit does not know, set
        to anything but its default, is refused by name."""
        d = bnb.to_dict() if hasattr(bnb, "to_dict") else dict(bnb)
        unknown = {k: v for k, v in d.items() if k not in BNB_DEFAULTS and k not in _BNB_BOOKKEEPING
                   and v not in (None, False)}
        if unknown:
            raise SchemeError(f"BitsAndBytesConfig field(s) {sorted(unknown)} have no quantkit translation")
        kw = {k: getattr(bnb, k, d.get(k, default)) for k, default in BNB_DEFAULTS.items()}
        kw["bnb_4bit_compute_dtype"] = getattr(bnb, "bnb_4bit_compute_dtype", None) if (
            getattr(bnb, "bnb_4bit_compute_dtype", None) not in (None, torch.float32)) else None
        storage = kw.pop("bnb_4bit_quant_storage")
        kw["bnb_4bit_quant_storage"] = None if storage in (None, torch.uint8, "uint8") else storage
        return cls(**kw, **extra)

    @classmethod
    def from_gptq(cls, gptq, dataset=None, **extra) -> "QuantkitConfig":
        """Translate a transformers `GPTQConfig`, field by field: bits, group_size (-1: per
        channel), sym, desc_act (GPTQ's act_order), act_group_aware (GPTQModel's group-aware
        reordering, on by default when desc_act is off: columns in activation order while each
        group keeps its columns; quantkit's act_order with static_groups, the nearest it has),
        damp_percent (with GPTQConfig's own default, 0.1), true_sequential,
        dataset (a list of texts; `dataset=` here also takes a text file's path), tokenizer,
        model_seqlen (calibration length) and batch_size. A field that would change what is
        quantized and that quantkit cannot honour is refused by name."""
        d = gptq.to_dict() if hasattr(gptq, "to_dict") else dict(gptq)
        known = {"bits", "group_size", "sym", "desc_act", "act_group_aware", "damp_percent", "true_sequential",
                 "model_seqlen", "batch_size", "block_name_to_quantize", "module_name_preceding_first_block"}
        refused = {k: v for k, v in d.items() if k not in known and k not in _GPTQ_NO_EFFECT and v is not None}
        if refused:
            raise SchemeError(f"GPTQConfig field(s) {sorted(refused)} cannot be honoured by quantkit "
                              "(it quantizes every Linear of the blocks it finds in the model)")
        if d.get("block_name_to_quantize") or d.get("module_name_preceding_first_block"):
            raise SchemeError("GPTQConfig block_name_to_quantize / module_name_preceding_first_block: quantkit finds "
                              "the model's blocks itself; leave them unset")
        data = dataset if dataset is not None else d.get("dataset")
        if isinstance(data, str) and data in ("wikitext2", "c4", "c4-new", "ptb", "ptb-new"):
            raise SchemeError(f"GPTQConfig dataset {data!r} would be downloaded; give the texts (a list of strings) "
                              "or a text file: QuantkitConfig.from_gptq(config, dataset=PATH)")
        bits, group = int(d["bits"]), int(d.get("group_size", 128))
        sym = "-sym" if d.get("sym", True) else "-asym"
        scheme = f"int{bits}" + ("" if group == -1 else f"-g{group}") + sym
        desc_act, gar = bool(d.get("desc_act", False)), bool(d.get("act_group_aware", False)) and group != -1
        options = {"damp": float(d.get("damp_percent", 0.1)), "act_order": desc_act or gar,
                   "static_groups": gar and not desc_act}
        kw = dict(scheme=scheme, method="gptq", method_options=options, sequential=bool(d.get("true_sequential", True)),
                  dataset=data, tokenizer=d.get("tokenizer"))
        if d.get("model_seqlen"):
            kw["calib_len"] = int(d["model_seqlen"])
        return cls(**{**kw, **extra})

    def quant_config(self) -> QuantConfig:
        """The QuantConfig this asks for (rules keep `modules_to_not_convert` in float)."""
        if self.saved is not None:
            return QuantConfig.from_dict(self.saved["config"])
        method = "llm-int8" if parse_scheme(self.scheme).kind == "llm-int8" and self.method == "rtn" else self.method
        m = {"name": method, "options": self.method_options} if self.method_options else method
        rules = tuple(Rule(p, None) for p in self.modules_to_not_convert)  # kept in float: no method runs
        cfg = make_config(self.scheme, m, self.head, rules, sequential=self.sequential)
        validate_config(cfg)
        if needs_calibration(cfg) and self.dataset is None:
            raise SchemeError(f"{self.scheme} with {cfg.method.name} needs calibration data: give dataset= (a text "
                              "file's path or a list of texts), or load the float model and call "
                              "qk.quantize(model, ..., calib=TEXT)")
        return cfg

    def record(self, saved: dict) -> None:
        """After quantizing: keep what was done, so save_pretrained writes quantkit's config."""
        self.saved = {k: saved[k] for k in SAVED_KEYS if k in saved}
        self.saved["head"] = saved.get("head", {})

    def to_dict(self) -> dict:
        if self.saved is not None:
            d = {"quant_method": QUANT_METHOD, **self.saved}
            if self.compute_dtype is not None:
                d["compute_dtype"] = self.compute_dtype
            return d
        return {"quant_method": QUANT_METHOD, "scheme": self.scheme, "method": self.method, "head": self.head,
                "compute_dtype": self.compute_dtype, "modules_to_not_convert": self.modules_to_not_convert,
                "method_options": self.method_options, "sequential": self.sequential,
                "dataset": self.dataset if isinstance(self.dataset, str) else None,
                "calib_samples": self.calib_samples, "calib_len": self.calib_len}

    def to_diff_dict(self) -> dict:
        return self.to_dict()


def _dtype_or_str(d) -> str:
    return str(d).replace("torch.", "")
