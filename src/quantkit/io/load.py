"""Any model source -> (nn.Module, tokenizer).

`resolve(source)` says what a source is; `load(source)` checks it and loads it. Sources:

    alias        a built-in name (see `models.ALIASES`), fetched once, then loaded as a GGUF
    gguf         a .gguf file: magic, header and tensor extents are checked, then transformers
                 dequantizes it (architecture must be one transformers' GGUF loader knows)
    hf_dir       a folder with config.json and *.safetensors (sharded or not) or *.bin weights
    quantkit_dir a folder whose config.json has quantization_config.quant_method == "quantkit"
    safetensors_file  one .safetensors file with a config.json next to it (= its folder)
    hub          an `owner/name` id that is not a local path, passed to transformers

Bad input raises `SourceError` with one line that says what to do. Around every load the
checks of io/validate.py run: a GGUF needs its shape metadata and the tensors of every block,
the model must fit in the memory available, transformers' loading report must list no missing,
unexpected or misshapen weight (it would fill gaps with random values), and no float weight may
hold NaN or Inf. Weights only in pickle files (*.bin) are read only with `allow_pickle=True`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SourceError
from . import models, validate
from .classes import model_class

logger = logging.getLogger(__name__)

KINDS = ("alias", "gguf", "hf_dir", "safetensors_file", "quantkit_dir", "hub")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# GGUF architecture names that transformers' loader renames before looking them up.
_GGUF_ARCH_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                      "minimax-m2": "minimax_m2", "t5encoder": "t5"}


@dataclass(frozen=True)
class Source:
    kind: str  # one of KINDS
    path: Path | None  # local file or folder (the cache path for an alias; None for a hub id)
    description: str
    name: str = ""  # what the user passed (alias name, hub id or path string)


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------- resolve


def resolve(source: str | os.PathLike) -> Source:
    """Say what kind of model source `source` is (cheap: no weights are read)."""
    name = os.fspath(source)
    if isinstance(source, str) and source in models.ALIASES:
        if not Path(source).exists():
            spec = models.ALIASES[source]
            return Source("alias", models.cached_path(source), f"built-in model {source}: {spec.description}", name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return Source("gguf", path, f"GGUF file {path} ({_mb(path.stat().st_size)})", name)
        if path.suffix.lower() == ".safetensors":
            if not (path.parent / "config.json").is_file():
                raise SourceError(f"{path} is a single .safetensors file; a config.json is needed next to it "
                                  "(save the model with save_pretrained, or pass its folder)")
            kind = "quantkit_dir" if _is_quantkit_config(path.parent) else "safetensors_file"
            return Source(kind, path.parent, f"safetensors file {path} (folder {path.parent})", name)
        if path.name == "config.json":
            return resolve(path.parent)
        raise SourceError(f"{path} is not a model: pass a .gguf file, a .safetensors file, "
                          "or a folder with config.json")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SourceError(f"{path} has no config.json: pass a Hugging Face model folder "
                              "(save_pretrained output), a quantkit checkpoint, or a .gguf file")
        if _is_quantkit_config(path):
            return Source("quantkit_dir", path, f"quantkit checkpoint {path}", name)
        return Source("hf_dir", path, f"Hugging Face folder {path}", name)
    if path.exists():
        raise SourceError(f"{path} is neither a file nor a folder")
    if path.suffix.lower() in (".gguf", ".safetensors", ".json"):
        raise SourceError(f"no such file: {path}")
    if _HUB_ID.match(name) and not name.startswith((".", "/")):
        return Source("hub", None, f"hub id {name}", name)
    raise SourceError(f"no such file or folder: {name} (pass a local folder, a .gguf file, a hub id "
                      f"owner/name, or one of: {', '.join(sorted(models.ALIASES))})")


def _read_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{folder / 'config.json'} is not valid JSON: {_short(e)}") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"{folder / 'config.json'} must hold a JSON object")
    return cfg


def _is_quantkit_config(folder: Path) -> bool:
    qc = _read_config(folder).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "quantkit"


# ---------------------------------------------------------------- validation


def _gguf_arch_supported(arch: str) -> bool | None:
    """Whether transformers' GGUF loader knows `arch`; None if that cannot be told."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return None
    supported = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    return arch in supported or _GGUF_ARCH_RENAMES.get(arch) in supported or ("t5" in arch and "t5" in supported)


_GGUF_PRE: dict[str, str | None] = {}  # resolved path -> tokenizer.ggml.pre, read by validate_gguf
_GGUF_SIZE: dict[str, tuple[int, int]] = {}  # resolved path -> (elements its tensors hold, block count)


def validate_gguf(path: Path) -> str:
    """Check a GGUF file's magic, header, tensor extents, shape metadata and the tensors its
    blocks need (validate.check_gguf_structure); return its architecture."""
    if not path.is_file():
        raise SourceError(f"no such file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != models.GGUF_MAGIC:
        raise SourceError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        size = path.stat().st_size
        for t in reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("no general.architecture in its metadata")
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        pre = reader.fields.get("tokenizer.ggml.pre")
        _GGUF_PRE[str(path.resolve())] = None if pre is None else bytes(pre.parts[pre.data[0]]).decode("utf-8")
        fields = {}
        for key in (f"{arch}.block_count", f"{arch}.embedding_length"):
            f = reader.fields.get(key)
            fields[key] = None if f is None or not f.data else f.contents()
        tensors = [(t.name, tuple(int(d) for d in t.shape), int(t.n_elements)) for t in reader.tensors]
    except SourceError:
        raise
    except Exception as e:  # the reader fails in many ways on damaged files
        raise SourceError(f"{path} is truncated or not a valid GGUF file: {_short(e)}") from None
    if _gguf_arch_supported(arch) is False:
        raise SourceError(f"{path} has GGUF architecture {arch!r}, which transformers' GGUF loader does not "
                          "support; convert the original model instead, or pass a Hugging Face folder")
    elements = validate.check_gguf_structure(path, arch, fields, tensors)
    _GGUF_SIZE[str(path.resolve())] = (elements, int(fields[f"{arch}.block_count"]))
    return arch


def validate_hf_dir(folder: Path, allow_pickle: bool = False) -> dict:
    """Check a Hugging Face folder's weight files; return its config.json. Weights only in
    pickle files (*.bin) are refused unless `allow_pickle`."""
    cfg = _read_config(folder)
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{index} is not a valid safetensors index: {_short(e)}") from None
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise SourceError(f"{folder} is missing shard(s) {', '.join(missing)} listed in {index.name}; "
                              "copy the complete model folder")
    if not files and not any(folder.glob("*.bin")):
        raise SourceError(f"{folder} has config.json but no weights (*.safetensors or *.bin)")
    if not files and not allow_pickle:
        raise validate.pickle_refusal(folder)
    for f in files:
        try:
            _, need = validate.safetensors_header(f)
            have = f.stat().st_size
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SourceError(f"{f} is truncated or not a valid safetensors file: {_short(e)}") from None
        if have < need:
            raise SourceError(f"{f} is truncated: its header needs {need} bytes, the file has {have}; "
                              "download or copy it again")
    validate.check_tokenizer_files(folder)
    return cfg


# ---------------------------------------------------------------- load


_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "spiece*", "tekken.json")


def _load_tokenizer(where: str | Path, **kwargs):
    from transformers import AutoTokenizer

    # transformers builds an empty tokenizer for a folder without tokenizer files: refuse that.
    if isinstance(where, Path) and not any(any(where.glob(p)) for p in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s; continuing without a tokenizer", where)
        return None
    try:
        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception as e:
        logger.warning("no tokenizer loaded from %s (%s); continuing without one", where, _short(e))
        return None


def _finish(model: nn.Module) -> nn.Module:
    model.eval()
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    return model


def _gguf_fits(path: Path, arch: str, elements: int, dtype: torch.dtype) -> None:
    """Refuse a GGUF whose float model does not fit: transformers dequantizes every tensor to
    float32 first, then copies it into the model (so both are held at the peak)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise SourceError(f"transformers could not read the metadata of {path} (GGUF architecture {arch!r}): "
                          f"{_short(e)}") from None
    params = max(elements, validate.meta_parameter_count(AutoModelForCausalLM, config) or 0)
    per = 4 + torch.empty((), dtype=dtype).element_size()
    validate.check_fits(params, per, str(path), "a GGUF is dequantized whole, even for streaming: "
                        + validate.STREAMING_HINT)


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import functools

    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    arch = validate_gguf(path)
    elements, blocks = _GGUF_SIZE[str(path.resolve())]
    _gguf_fits(path, arch, elements, dtype)
    bar = gguf_utils.tqdm
    try:  # transformers' GGUF de-quantizing bar ignores its own progress-bar switch: honour it here
        if not hf_logging.is_progress_bar_enabled():
            gguf_utils.tqdm = functools.partial(bar, disable=True)
        model, info = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:
        raise SourceError(f"transformers could not load {path} (GGUF architecture {arch!r}): {_short(e)}") from None
    finally:
        gguf_utils.tqdm = bar
    validate.check_loading_info(info, str(path), lambda k: validate.gguf_hf_to_gguf_name(arch, blocks, k))
    validate.check_finite(model.state_dict().items(), str(path))
    pre = _GGUF_PRE.get(str(path.resolve()))
    if pre:  # llama.cpp's pre-tokenizer name; GGUF export writes it back (saved with checkpoints too)
        model.config.gguf_tokenizer_pre = pre
    return model, tok


def _hf_dir_fits(folder: Path, cls, dtype: torch.dtype) -> None:
    """Refuse a folder whose model (as config.json describes it, or as its weight files hold
    it, whichever is bigger) does not fit in memory at `dtype`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise SourceError(f"{folder / 'config.json'} does not describe a model transformers can build: "
                          f"{_short(e)}") from None
    try:
        stored = validate.safetensors_params(sorted(folder.glob("*.safetensors")))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{folder}: a safetensors header is damaged: {_short(e)}") from None
    params = max(stored, validate.meta_parameter_count(cls, config) or 0)
    validate.check_fits(params, torch.empty((), dtype=dtype).element_size(), str(folder))


def _load_hf_dir(folder: Path, dtype: torch.dtype, allow_pickle: bool = False):
    cfg = validate_hf_dir(folder, allow_pickle)
    cls = model_class(cfg, str(folder))
    _hf_dir_fits(folder, cls, dtype)
    safetensors = any(folder.glob("*.safetensors"))
    try:
        model, info = cls.from_pretrained(folder, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True,
                                          use_safetensors=safetensors, weights_only=True)
    except Exception as e:
        raise SourceError(f"transformers could not load {folder}: {_short(e)}") from None
    validate.check_loading_info(info, str(folder))
    validate.check_finite(model.state_dict().items(), str(folder))
    return model, _load_tokenizer(folder)


def _load_hub(hub_id: str, dtype: torch.dtype, allow_pickle: bool = False):
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(hub_id)
        cls = model_class(cfg.to_dict(), hub_id)
        kwargs = {} if allow_pickle else {"use_safetensors": True}
        model, info = cls.from_pretrained(hub_id, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True,
                                          weights_only=True, **kwargs)
    except SourceError:
        raise
    except Exception as e:
        hint = ("; if it has only pickle weights (*.bin), pass --allow-pickle" if not allow_pickle
                and "safetensors" in str(e) else "")
        raise SourceError(f"could not load hub id {hub_id} (offline? pass a local folder or a .gguf file): "
                          f"{_short(e)}{hint}") from None
    validate.check_loading_info(info, hub_id)
    validate.check_finite(model.state_dict().items(), hub_id)
    return model, _load_tokenizer(hub_id)


def load(source: str | os.PathLike, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
         dequantize: bool = True):
    """Load any model source as (model in eval mode, tokenizer or None). Weights stored only as
    pickle files (pytorch_model.bin) are refused unless `allow_pickle` (then read with torch's
    weights-only unpickler). A GGUF source with `dequantize=False` keeps its quantized tensors'
    bytes (io/gguf_keep.py) instead of fp32 weights."""
    src = source if isinstance(source, Source) else resolve(source)
    if not dequantize and src.kind not in ("alias", "gguf"):
        raise SourceError(f"dequantize=False keeps a GGUF file's quantized bytes; {source} is not a GGUF file")
    if src.kind in ("alias", "gguf"):
        path = models.fetch(src.name) if src.kind == "alias" else src.path
        model, tok = _load_gguf(path, dtype)
        if not dequantize:
            from .gguf_keep import keep_gguf_blocks

            arch = validate_gguf(path)
            kept = keep_gguf_blocks(model, path, arch, _GGUF_SIZE[str(path.resolve())][1])
            object.__setattr__(model, "quantkit_gguf_kept", kept)
    elif src.kind == "quantkit_dir":
        from quantkit.io.checkpoint import load_checkpoint

        model, tok = load_checkpoint(src.path, dtype=dtype)
    elif src.kind in ("hf_dir", "safetensors_file"):
        model, tok = _load_hf_dir(src.path, dtype, allow_pickle)
    elif src.kind == "hub":
        model, tok = _load_hub(src.name, dtype, allow_pickle)
    else:  # pragma: no cover - resolve only returns KINDS
        raise SourceError(f"unknown source kind {src.kind!r}")
    return _finish(model), tok


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def source_bytes_on_disk(source: str | os.PathLike | Source) -> int:
    """Bytes of the source's weight files (.gguf, or *.safetensors / *.bin in the folder)."""
    src = source if isinstance(source, Source) else resolve(source)
    if src.kind == "alias":
        return models.fetch(src.name, quiet=True).stat().st_size
    if src.kind == "gguf":
        return src.path.stat().st_size
    if src.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(src.name, local_files_only=True))
        except Exception as e:
            raise SourceError(f"hub id {src.name} is not in the local Hugging Face cache: {_short(e)}") from None
    else:
        folder = src.path
    return sum(f.stat().st_size for f in weight_files(folder))
