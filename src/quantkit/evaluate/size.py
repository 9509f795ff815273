"""How big a model is: in memory, on disk, and per role (embeddings, attention, MLP, ...).

Memory is counted per underlying storage, so tied weights (an output head that shares the
embedding matrix), views and aliases are counted once, and a quantized layer's packed buffers
count at their real size. Everything the module holds counts: parameters and all buffers,
persistent or not (rotary ``inv_freq`` tables included) — it is what the process actually holds.

Parameters are the weights a model represents: a quantized layer (a module with
``quantized_weight()`` and ``in_features``/``out_features``, e.g. QuantLinear) counts its
``[out, in]`` weight, whatever its packed buffers hold, so a quantized model reports the
parameter count of the float model it came from.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import SourceError

__all__ = ["GROUPS", "WEIGHT_SUFFIXES", "disk_bytes", "memory_bytes", "module_breakdown", "param_dtypes",
           "weight_count"]

#: Roles reported by :func:`module_breakdown`, in the order storage is attributed
#: (the head comes last so a tied head finds its storage already counted by the embeddings).
GROUPS = ("embeddings", "attention", "experts", "mlp", "norms", "other", "head")

#: Files counted by :func:`disk_bytes` in a folder.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")

_ATTENTION = re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|qkv|query|key|value")
_EXPERTS = re.compile(r"(^|\.)experts(\.|$)")  # a mixture-of-experts' experts (fused or one layer each)
_MLP = re.compile(r"mlp|ffn|feed_forward|fc|gate|up_proj|down_proj|dense|w1|w2|w3|expert")
_BLOCK_INDEX = re.compile(r"(^|\.)\d+(\.|$)")  # a ModuleList index: "layers.3.", "h.0."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _leaves(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """Plain tensors behind ``t`` (tensor subclasses that wrap several inner tensors are opened)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _leaves(getattr(t, name))
    else:
        yield t


def _storage(t: torch.Tensor) -> tuple[object, int]:
    """(key identifying the storage that holds ``t``, its size in bytes)."""
    try:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if t.device.type != "meta" and ptr != 0:
            return (t.device.type, t.device.index, ptr), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return ("tensor", id(t)), t.numel() * t.element_size()


def _tensors(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """(module name, module, tensor name, tensor, is_parameter) for every tensor each module owns
    directly; a tensor shared by two modules is yielded for both."""
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            yield mname, module, pname, p, True
        for bname, b in module.named_buffers(recurse=False):
            if b is not None:
                yield mname, module, bname, b, False


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by all parameters and buffers (persistent or not), each storage counted once."""
    seen: dict[object, int] = {}
    for *_, t, _ in _tensors(model):
        for leaf in _leaves(t):
            key, nbytes = _storage(leaf)
            seen.setdefault(key, nbytes)
    return sum(seen.values())


def disk_bytes(path: str | Path) -> int:
    """Size on disk: a file's size; for a folder, the sum of its weight files directly inside it
    (``*.safetensors``, ``*.gguf``, ``*.bin``; configs, tokenizers and subfolders are not counted).
    Raises SourceError for a missing path or a folder without weight files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        raise SourceError(f"{path} does not exist")
    files = [f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    if not files:
        raise SourceError(f"{path} holds no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    return sum(f.stat().st_size for f in files)


def param_dtypes(model: nn.Module) -> dict[str, int]:
    """Number of elements per dtype name (e.g. ``{"float32": 1200, "int8": 40960}``) over all
    parameters and buffers, each tensor counted once."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for *_, t, _ in _tensors(model):
        for leaf in _leaves(t):
            if id(leaf) in seen:
                continue
            seen.add(id(leaf))
            name = _dtype_name(leaf.dtype)
            counts[name] = counts.get(name, 0) + leaf.numel()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _quantized_elements(module: nn.Module) -> int | None:
    """[out, in] element count of a quantized layer's weight (held as packed buffers), else None."""
    if callable(getattr(module, "quantized_weight", None)) and hasattr(module, "in_features"):
        return int(module.out_features) * int(module.in_features)
    return None


def weight_count(model: nn.Module) -> int:
    """Parameters the model represents: every distinct parameter, plus each distinct quantized
    layer's [out, in] weight (its packed buffers are that weight's storage)."""
    params = {id(p): p.numel() for p in model.parameters()}
    quant = {id(m): n for m in model.modules() if (n := _quantized_elements(m)) is not None}
    return sum(params.values()) + sum(quant.values())


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or (hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"))


def _is_linear(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.Linear) or "Linear" in name or name == "Conv1D"


def _role(mname: str, module: nn.Module, head: nn.Module | None, embeddings: set[str]) -> str:
    if mname in embeddings or any(mname.startswith(e + ".") for e in embeddings):
        return "embeddings"  # a quantized table's inner layer too (the tied head reached under the table's name)
    if head is not None and module is head:
        return "head"
    if "Norm" in type(module).__name__:
        return "norms"
    if _EXPERTS.search(mname.lower()) and (_is_linear(module) or any(p.dim() == 3 for p in module.parameters(recurse=False))):
        return "experts"
    if _is_linear(module):
        lowered = mname.lower()
        if _ATTENTION.search(lowered):
            return "attention"
        if _MLP.search(lowered) or _BLOCK_INDEX.search(lowered):
            return "mlp"
    return "other"


def module_breakdown(model: nn.Module) -> dict[str, dict]:
    """Parameters and bytes grouped by role, from module types and names only (no per-model code).

    Roles (:data:`GROUPS`): ``embeddings`` (nn.Embedding), ``head`` (``get_output_embeddings()``),
    ``attention`` (linear layers named like attn/q_proj/query/c_attn/...), ``experts`` (a
    mixture-of-experts' experts: a module named ``experts`` holding fused 3-D weights, or the
    layers inside it once quantized, one per expert), ``mlp`` (other linear
    layers in the blocks: mlp/ffn/fc/gate/up/down/dense/...), ``norms`` (class name contains
    "Norm"), ``other`` (everything else, e.g. rotary tables). Linear layers are nn.Linear, any
    class named ``*Linear*`` (quantized layers) and GPT-2's ``Conv1D``. A quantized embedding
    table (QuantEmbedding) and what it holds are ``embeddings``.

    Each entry: ``params`` (parameter elements; a quantized layer counts its [out, in] weight, see
    :func:`weight_count`), ``buffers`` (elements of the other buffers), ``bytes``, ``dtypes``
    (sorted dtype names), ``tied`` (bool). Each tensor and storage is attributed once, to the
    first role in GROUPS order that holds it, so the entries sum to :func:`weight_count` and
    to :func:`memory_bytes`; a head tied to the embeddings shows ``tied=True`` with 0 params and
    0 bytes of its own.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    try:
        head = get_head() if callable(get_head) else None
    except (NotImplementedError, AttributeError):
        head = None

    embeddings = {n for n, m in model.named_modules(remove_duplicate=False) if _is_embedding(m)}
    held: dict[str, list[tuple[nn.Module, torch.Tensor, bool]]] = {g: [] for g in GROUPS}
    for mname, module, _, t, is_param in _tensors(model):
        held[_role(mname, module, head, embeddings)].append((module, t, is_param))

    seen_tensors: set[int] = set()
    seen_storage: set[object] = set()
    seen_quantized: set[int] = set()
    out: dict[str, dict] = {}
    for group in GROUPS:
        entry = {"params": 0, "buffers": 0, "bytes": 0, "dtypes": set(), "tied": False}
        for module, t, is_param in held[group]:
            entry["dtypes"].update(_dtype_name(leaf.dtype) for leaf in _leaves(t))
            if id(t) in seen_tensors:
                entry["tied"] = True
                continue
            seen_tensors.add(id(t))
            packed = _quantized_elements(module) if not is_param else None
            if packed is not None:  # a quantized layer's storage: its weight counts once, as parameters
                if id(module) not in seen_quantized:
                    seen_quantized.add(id(module))
                    entry["params"] += packed
            else:
                entry["params" if is_param else "buffers"] += t.numel()
            for leaf in _leaves(t):
                key, nbytes = _storage(leaf)
                if key in seen_storage:
                    entry["tied"] = True
                else:
                    seen_storage.add(key)
                    entry["bytes"] += nbytes
        entry["dtypes"] = sorted(entry["dtypes"])
        out[group] = entry
    return out
