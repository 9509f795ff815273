"""Streaming: keep the float weights of the blocks on disk and load one block at a time.

`open_streaming(source, offload_dir)` returns a model whose blocks hold no weights (meta
tensors) plus a `BlockLoader` that assigns one block's tensors from memory-mapped
safetensors when the calibration walk reaches it. The embedding table and output head stay
memory-mapped views of the file: the walk reads only the rows of the calibration tokens (their
pages are dropped again when block 0 loads), and the pipeline quantizes them at the end in
chunks of rows (pipeline.quantize_table). The rest outside the blocks (final norm, ...) is
loaded at once. With it, quantizing needs about one float block, the quantized blocks so far
and the calibration activations — not the float model.

Sources: a Hugging Face folder of safetensors (sharded or not) is read in place. Any other
source (a GGUF file, the `smollm2` alias, a hub id) is first written to `offload_dir` as a
float safetensors folder by a child process, so the float model never sits in this process.
That folder carries the source's fingerprint (`FINGERPRINT`): it is reused only for the same
source, expanded again when the source changed, and a `float` folder without one is never
touched. Every tensor read is checked for NaN/Inf and for a place in the model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import SourceError
from ..memory import release_file_pages, trim_heap
from .atomic import atomic_dir
from .validate import check_finite, one_line

log = logging.getLogger(__name__)


FINGERPRINT = "quantkit-source.json"  # in a float folder quantkit expanded: which source it holds


def _file_id(path: Path, head: bool) -> dict:
    st = path.stat()
    out = {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if head:  # a copy with the same size and mtime but other bytes is another model
        with open(path, "rb") as f:
            out["head_sha256"] = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return out


def source_fingerprint(source, dtype: str) -> dict:
    """What identifies the source a float folder was expanded from: its resolved path, and the
    size, mtime and (for a single file) a hash of the first MiB of its files."""
    from . import models
    from .load import resolve, weight_files

    src = resolve(source)
    fp: dict = {"format": 1, "kind": src.kind, "dtype": dtype}
    if src.kind == "hub":
        fp["hub"] = src.name
        try:  # the cached snapshot (its folder name is the commit)
            from huggingface_hub import snapshot_download

            fp["snapshot"] = snapshot_download(src.name, local_files_only=True)
        except Exception:
            pass
        return fp
    path = models.fetch(src.name, quiet=True) if src.kind == "alias" else Path(src.path)
    fp["path"] = str(path.resolve())
    if path.is_file():
        fp["files"] = [_file_id(path, head=True)]
    else:
        files = weight_files(path) + [f for f in (path / "config.json",) if f.is_file()]
        fp["files"] = [_file_id(f, head=False) for f in files]
    return fp


def _expand_to_folder(source: str, folder: Path, dtype: str, fingerprint: dict, allow_pickle: bool,
                      replace: bool, protect) -> None:
    """Write `source` as a float safetensors folder (+ tokenizer), in a child process."""
    # safetensors directly, not save_pretrained: transformers refuses to save a model it
    # de-quantized from GGUF. Tied tensors are written once, under their first name.
    code = (
        "import sys, torch; from pathlib import Path; from safetensors.torch import save_file; "
        "from quantkit.io.load import load; "
        "m, t = load(sys.argv[1], dtype=getattr(torch, sys.argv[3]), allow_pickle=sys.argv[4] == '1'); "
        "seen, sd = set(), {}\n"
        "for k, v in m.state_dict().items():\n"
        "    if v.data_ptr() not in seen: seen.add(v.data_ptr()); sd[k] = v.contiguous()\n"
        "save_file(sd, str(Path(sys.argv[2]) / 'model.safetensors'), metadata={'format': 'pt'}); "
        "c = m.config; c.__dict__.pop('quantization_config', None); c.save_pretrained(sys.argv[2]); "
        "t is not None and t.save_pretrained(sys.argv[2])"
    )
    log.warning("expanding %s to float safetensors in %s (once, in a child process)", source, folder)
    with atomic_dir(folder, kind="float", overwrite=replace, protect=protect) as tmp:
        r = subprocess.run([sys.executable, "-c", code, str(source), str(tmp), dtype, "1" if allow_pickle else "0"],
                           capture_output=True, text=True)
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
            if last.startswith("quantkit.errors."):  # the child's own one-line error
                last = last.split(": ", 1)[-1]
            raise SourceError(f"could not expand {source} into {folder}: {last}")
        (Path(tmp) / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")


def float_folder(source, offload_dir: str | Path | None, dtype: str = "float32", allow_pickle: bool = False) -> Path:
    """A folder of float safetensors + config.json for `source` (in place for HF folders).

    Other sources are expanded once into `offload_dir/float`, with the source's fingerprint
    (`FINGERPRINT`) beside the weights: a later run reuses the folder only for the same source
    (same file, size, mtime and first MiB; same dtype) and expands it again, replacing only that
    folder, when the source changed. A `float` folder without the fingerprint was not written
    by quantkit and is never touched."""
    from .load import resolve, validate_hf_dir

    src = resolve(source)
    if src.kind in ("hf_dir", "safetensors_file"):
        folder = Path(src.path)
        if any(folder.glob("*.safetensors")):
            return folder
        validate_hf_dir(folder, allow_pickle)  # refuses pickle-only weights before any work
    if offload_dir is None:
        raise SourceError(f"streaming {source} needs --offload-dir: a folder for its float weights on disk")
    folder = Path(offload_dir) / "float"
    want = source_fingerprint(source, dtype)
    replace = False
    if folder.is_symlink() or folder.exists():
        mark = folder / FINGERPRINT
        if folder.is_symlink() or not folder.is_dir() or (not mark.is_file() and any(folder.iterdir())):
            raise SourceError(f"{folder} exists but was not written by quantkit (no {FINGERPRINT} in it); "
                              "quantkit will not replace it: delete it or pass another --offload-dir")
        if mark.is_file():
            try:
                have = json.loads(mark.read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError):
                have = None
            if have == want and (folder / "config.json").is_file():
                return folder
            log.warning("%s holds the float weights of %s, not of %s; expanding again",
                        folder, (have or {}).get("path") or (have or {}).get("hub") or "another source", source)
            replace = True
    _expand_to_folder(str(source), folder, dtype, want, allow_pickle, replace, [src.path])
    return folder


def _glibc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


HEAP_MMAP_THRESHOLD = 128 * 1024


def keep_heap_small() -> None:
    """glibc only, for streaming: a fixed mmap threshold of 128 KiB, so that every buffer
    bigger than that (weights, Hessians, activations, the block forward's temporaries) is an
    mmap of its own and goes back to the OS the moment it is freed: resident memory stays what
    is alive, which is the point of streaming.

    It costs time: each temporary is zero-filled by page faults on first touch. `quantkit
    quantize smollm2 --method gptq --scheme int4-g128 --calib wiki.test.raw --calib-samples 32
    --offload-dir D --json` (2026-11-30, AVX2 EPYC) took 216 s with a 650 MB peak as it is, and
    145 s with a 677 MB peak with HEAP_MMAP_THRESHOLD edited to 32 MiB (temporaries reused from
    the heap); at 128 x 512 that edit kept 100-180 MB more (fragmentation between batches),
    over the streaming memory goal. Quantizing in memory leaves glibc's own (dynamic) thresholds.
    """
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, HEAP_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


class BlockLoader:
    """Assigns tensors by name prefix from the safetensors files of a folder (memory-mapped)."""

    def __init__(self, folder: Path, dtype: torch.dtype):
        self.folder, self.dtype = Path(folder), dtype
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map = weight_map
        self._mapped: list[weakref.ref] = []  # tensors viewing the files (track_mapped)

    def tensors(self, prefix: str = "", exclude: tuple[str, ...] = (), mapped: frozenset = frozenset()) -> dict[str, torch.Tensor]:
        """Tensors under `prefix` (the prefix cut from their names), private copies in `self.dtype`.
        Names in `mapped` (full names) whose stored dtype is already `self.dtype` come back as
        views of the memory-mapped file instead: nothing is read until used, and
        `release_mapped` drops the pages read through them."""
        names = [k for k in self.weight_map if k.startswith(prefix) and not any(k.startswith(e) for e in exclude)]
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in names:
            by_file.setdefault(self.weight_map[k], []).append(k)
        for fname, keys in by_file.items():
            with safe_open(str(self.folder / fname), framework="pt") as h:
                for k in keys:
                    t = h.get_tensor(k)
                    check_finite([(k, t)], str(self.folder / fname))
                    release_file_pages(t)  # the pages the check read, if `t` views the file
                    if not (k in mapped and t.dtype == self.dtype):
                        t = t.to(self.dtype) if t.is_floating_point() else t
                        # a private copy: a tensor viewing the memory-mapped file would keep the
                        # file's pages resident (and counted in RSS) for as long as it lives
                        t = t.clone()
                    out[k[len(prefix):]] = t
        return out

    def track_mapped(self, tensors) -> None:
        """Remember (weakly) the tensors, as the model holds them, that view the files."""
        from ..memory import file_backed

        self._mapped += [weakref.ref(t) for t, mm in zip(tensors, file_backed(tensors)) if mm]

    def release_mapped(self) -> int:
        """Drop from the resident set the file pages read so far through the tracked views
        (they read back from the file if used again); returns the bytes released."""
        from ..memory import release_file_pages

        alive = [t for t in (r() for r in self._mapped) if t is not None]
        self._mapped = [weakref.ref(t) for t in alive]
        return sum(release_file_pages(t) for t in alive)

    def load_into(self, module: nn.Module, prefix: str) -> None:
        """Materialize `module` (whose parameters are meta) from the tensors under `prefix`."""
        import gc

        gc.collect()  # modules swapped out can sit in reference cycles; free their weights now
        trim_heap()  # the previous block's float weights and statistics are gone by now
        self.release_mapped()  # the embedding rows the calibration inputs were looked up in
        state = self.tensors(prefix)
        _assign(module, state, self.folder, prefix)
        left = [n for n, p in module.named_parameters() if p.is_meta]
        if left:
            raise SourceError(f"{self.folder}: no weights for {prefix}{left[0]} ({len(left)} missing)")


def _assign(module: nn.Module, state: dict, folder: Path, prefix: str = "") -> None:
    """load_state_dict(assign=True), refusing tensors the module has no place for or of the wrong shape."""
    try:
        _, unexpected = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches
        raise SourceError(f"{folder}: tensors under {prefix or 'the model'} do not fit the model config.json "
                          f"describes ({one_line(e)}); copy or convert the complete model again") from None
    if unexpected:
        raise SourceError(f"{folder}: {len(unexpected)} tensor(s) the model has no place for "
                          f"({', '.join(prefix + k for k in sorted(unexpected)[:3])}); copy or convert the model again")


def open_streaming(source, offload_dir=None, dtype: torch.dtype = torch.float32, allow_pickle: bool = False):
    """(model with weightless blocks, tokenizer, loader) for block-by-block quantization.
    Sources stored only as pickle files are expanded only with `allow_pickle`."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..arch import family_of
    from ..modules import head_modules

    keep_heap_small()
    folder = float_folder(source, offload_dir, str(dtype).replace("torch.", ""), allow_pickle)
    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fam = family_of(model)
    loader = BlockLoader(folder, dtype)
    # the embedding table and output head stay on disk (memory-mapped, read only where used):
    # the walk needs only the calibration tokens' rows, and they are quantized at its end
    mapped = frozenset(f"{n}.weight" for n in head_modules(model)[:2] if n)
    rest = loader.tensors("", exclude=(fam.blocks + ".",), mapped=mapped)
    _assign(model, rest, folder)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del rest
    params = dict(model.named_parameters(remove_duplicate=False))
    loader.track_mapped([params[n] for n in sorted(mapped) if n in params])
    outside = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(fam.blocks + ".")]
    if outside:
        raise SourceError(f"{folder}: no weights for {outside[0]}")
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(folder)) if (folder / "tokenizer_config.json").exists() else None
    return model, tok, loader
