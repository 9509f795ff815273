"""Refuse model sources that cannot be right, before and after transformers builds them.

transformers is forgiving where quantkit must not be: a tensor missing from the weight files
(or renamed in a GGUF) is silently filled with freshly initialised values, and a GGUF without
its shape metadata becomes a default-sized model (a 7B Llama for `llama`). The checks here run
around every load in io/load.py:

- `check_gguf_structure`: the architecture's block count and width metadata are there, and so
  are the tensors every block needs, all with names the `gguf` package knows for the arch;
- `check_fits`: the float model fits in the memory this process can still have;
- `check_loading_info`: transformers' loading report has no missing, unexpected or misshapen key;
- `check_finite`: no float weight holds NaN or Inf;
- `check_tokenizer_files`: the tokenizer's JSON files parse.
Each raises SourceError with one line that says what is wrong and what to do.
"""
from __future__ import annotations

import json
import logging
import numbers
import re
import struct
from pathlib import Path

import torch

from ..errors import SourceError

log = logging.getLogger(__name__)

STREAMING_HINT = ("quantize a Hugging Face safetensors folder with `quantkit quantize MODEL --offload-dir DIR` "
                  "(streaming: one block in memory at a time), or free memory")
# GGUF architectures whose every block has attention and feed-forward tensors (blk.N.attn_*, blk.N.ffn_*)
_DENSE_GGUF = {"llama", "mistral", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "gpt-oss", "falcon", "phi3", "bloom",
               "stablelm", "gpt2", "starcoder2", "nemotron", "gemma2", "gemma3", "minimax-m2"}
_ST_SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _names(keys, n: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def one_line(e: BaseException, n: int = 160) -> str:
    """An exception's first line, at most `n` characters (for one-line errors)."""
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else type(e).__name__
    return msg if len(msg) <= n else msg[:n - 3] + "..."


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


# ---------------------------------------------------------------- memory


def _proc_kb(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate: the least of the machine's MemAvailable, its
    cgroup's remaining limit and its address-space limit (RLIMIT_AS); None if none is known."""
    bounds = []
    avail = _proc_kb("/proc/meminfo", "MemAvailable:")
    if avail is not None:
        bounds.append(avail)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            bounds.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            bounds.append(soft - (_proc_kb("/proc/self/status", "VmSize:") or 0))
    except (ImportError, OSError, ValueError):
        pass
    return max(0, min(bounds)) if bounds else None


def check_fits(params: int, bytes_per_param: int, where: str, hint: str = STREAMING_HINT) -> None:
    """Refuse a model of `params` parameters that needs more than the memory available."""
    need, have = params * bytes_per_param, available_memory()
    if have is not None and need > have:
        raise SourceError(f"{where}: loading needs about {gb(need)} ({params / 1e9:.2f}B parameters x "
                          f"{bytes_per_param} bytes) and this machine has {gb(have)} available; {hint}")


def meta_parameter_count(cls, config) -> int | None:
    """Parameters of the model `cls` builds from `config` (built on the meta device: no memory)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=True):
            model = cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)
        return sum(p.numel() for p in model.parameters())
    except Exception as e:  # the real load reports what is wrong with the config
        log.debug("could not build %s from its config on the meta device: %s", cls.__name__, e)
        return None


# ---------------------------------------------------------------- safetensors


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, bytes the file needs). Raises ValueError/OSError if unreadable."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(size, 100_000_000):
            raise ValueError(f"header length {n} is larger than the file")
        header = json.loads(f.read(n).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for key, info in header.items():
        if not isinstance(info, dict):
            raise ValueError(f"entry {key!r} is not an object")
        start, stop = (int(x) for x in info["data_offsets"])
        if not 0 <= start <= stop:
            raise ValueError(f"entry {key!r} has data offsets {start}..{stop}")
        end = max(end, stop)
    return header, 8 + n + end


def safetensors_params(files) -> int:
    """Elements stored in these safetensors files (their headers only)."""
    total = 0
    for f in files:
        header, _ = safetensors_header(f)
        for info in header.values():
            n = 1
            for d in info.get("shape", []):
                n *= int(d)
            total += n
    return total


# ---------------------------------------------------------------- GGUF


def _gguf_known_names(arch: str, blocks: int) -> set[str] | None:
    """Tensor names (without .weight/.bias) the gguf package knows for `arch`; None if it does not know it."""
    import gguf

    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if enum is None or enum not in gguf.MODEL_TENSORS:
        return None
    out = set()
    for t in gguf.MODEL_TENSORS[enum]:
        name = gguf.TENSOR_NAMES[t]
        out.update(name.format(bid=b) for b in range(blocks)) if "{bid}" in name else out.add(name)
    return out


def gguf_hf_to_gguf_name(arch: str, blocks: int, key: str) -> str | None:
    """The GGUF tensor name of a transformers parameter name (gguf's name map), if known."""
    import gguf

    enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if enum is None:
        return None
    try:
        return gguf.get_tensor_name_map(enum, blocks).get_name(key, try_suffixes=(".weight", ".bias"))
    except Exception:
        return None


def check_gguf_structure(path: Path, arch: str, fields: dict, tensors: list) -> int:
    """Refuse a GGUF that lacks its shape metadata or the tensors its blocks need; returns the
    number of elements its tensors hold. `fields` maps keys to values, `tensors` is a list of
    (name, shape as stored, element count)."""
    def meta_int(key: str) -> int:
        v = fields.get(key)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
            raise SourceError(f"{path}: its metadata has no valid {key} (found {v!r}); this GGUF is incomplete "
                              "or damaged: download or convert it again")
        return int(v)

    blocks, width = meta_int(f"{arch}.block_count"), meta_int(f"{arch}.embedding_length")
    names = {n: (shape, count) for n, shape, count in tensors}
    if len(names) != len(tensors):
        raise SourceError(f"{path}: a tensor name appears twice; the file is damaged, download or convert it again")
    if "t5" not in arch:  # encoder-decoders name their blocks enc.blk.N / dec.blk.N
        need = ["token_embd.weight"]
        known = _gguf_known_names(arch, blocks)
        if known is None or "output_norm" in known:
            need.append("output_norm.weight")
        missing = [n for n in need if n not in names]
        by_block: dict[int, set[str]] = {b: set() for b in range(blocks)}
        beyond = []
        for n in names:
            m = re.match(r"blk\.(\d+)\.([^.]+)", n)
            if m and int(m.group(1)) < blocks:
                by_block[int(m.group(1))].add(m.group(2))
            elif m:
                beyond.append(n)
        for b, kinds in by_block.items():
            if not kinds:
                missing.append(f"blk.{b}.*")
            elif arch in _DENSE_GGUF:
                missing += [f"blk.{b}.{k}*" for k in ("attn_", "ffn_")  # a weight, not just the norm
                            if not any(x.startswith(k) and "norm" not in x for x in kinds)]
        if missing:
            raise SourceError(f"{path}: tensors missing for a {arch} model of {blocks} blocks: {_names(missing)}; "
                              "the file is incomplete or was renamed: download or convert it again")
        if beyond:
            raise SourceError(f"{path}: tensors {_names(beyond)} lie beyond {arch}.block_count = {blocks}; "
                              "the file is damaged: download or convert it again")
        unknown = [] if known is None else [n for n in names if n.rsplit(".", 1)[0] not in known]
        if unknown:
            raise SourceError(f"{path}: tensors {_names(unknown)} are not {arch} tensors (renamed or damaged?); "
                              "transformers would drop them and leave random weights: convert the model again")
        shape, _ = names["token_embd.weight"]
        if width not in tuple(int(d) for d in shape):
            raise SourceError(f"{path}: token_embd.weight has shape {list(shape)} but {arch}.embedding_length is "
                              f"{width}; the metadata does not match the tensors: convert the model again")
        if "output_norm.weight" in names and int(names["output_norm.weight"][1]) != width:
            raise SourceError(f"{path}: output_norm.weight has {names['output_norm.weight'][1]} elements but "
                              f"{arch}.embedding_length is {width}; convert the model again")
    return sum(int(c) for _, c in names.values())


# ---------------------------------------------------------------- after transformers built it


def check_loading_info(info: dict, where: str, to_source=None) -> None:
    """Refuse a load whose report lists missing, unexpected or misshapen keys (or errors);
    `to_source(key)` may give the name a key has in the source file (GGUF)."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    errors = [str(e).strip().splitlines()[0] for e in info.get("error_msgs") or () if str(e).strip()]
    parts = []
    if missing:
        named = [f"{k} ({to_source(k)})" if to_source and to_source(k) else k for k in missing]
        parts.append(f"{len(missing)} missing ({_names(named)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if mismatched:
        shown = [f"{m[0]} {list(m[1])} in the file, {list(m[2])} in the model" if isinstance(m, tuple) and len(m) == 3
                 else str(m) for m in mismatched]
        parts.append(f"{len(mismatched)} with the wrong shape ({_names(shown, 2)})")
    if errors:
        parts.append(f"load errors ({_names(errors, 1)})")
    if parts:
        raise SourceError(f"{where}: the weights do not match the model its config describes: {'; '.join(parts)}; "
                          "transformers would fill the gaps with random values: copy or convert the complete model again")


def check_finite(named_tensors, where: str, chunk: int = 1 << 24) -> None:
    """Refuse float tensors holding NaN or Inf (named: the first one found). Tied tensors are
    checked once; big ones in chunks of `chunk` elements (the test allocates a bool per element)."""
    seen = set()
    for name, t in named_tensors:
        if not t.is_floating_point() or t.is_meta or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        flat = t.detach().reshape(-1)
        for i in range(0, flat.numel(), chunk):
            part = flat[i:i + chunk]
            if part.element_size() == 1:  # float8: no isfinite kernel
                part = part.float()
            if not bool(torch.isfinite(part).all()):
                raise SourceError(f"{where}: tensor {name} holds NaN or Inf values; the weights are damaged: "
                                  "download or convert them again")


_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "added_tokens.json")


def check_tokenizer_files(folder: Path) -> None:
    """Refuse a folder whose tokenizer JSON files do not parse (naming the file)."""
    for name in _TOKENIZER_JSON:
        f = folder / name
        if f.is_file():
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SourceError(f"{f} is not valid JSON ({one_line(e, 120)}); copy the tokenizer files again, "
                                  "or delete them to load without a tokenizer") from None


def pickle_refusal(folder: Path) -> SourceError:
    files = sorted(p.name for p in folder.glob("*.bin"))
    return SourceError(f"{folder} holds its weights only as pickle files ({_names(files, 2)}), which can run code "
                       "when read; convert them to safetensors (save_pretrained(..., safe_serialization=True)) or "
                       "pass --allow-pickle (allow_pickle=True) to read them with torch's weights-only unpickler")
