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
"""
from __future__ import annotations

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
from ..memory import trim_heap
from .atomic import atomic_dir

log = logging.getLogger(__name__)


def _expand_to_folder(source: str, folder: Path, dtype: str) -> None:
    """Write `source` as a float safetensors folder (+ tokenizer), in a child process."""
    # safetensors directly, not save_pretrained: transformers refuses to save a model it
    # de-quantized from GGUF. Tied tensors are written once, under their first name.
    code = (
        "import sys, torch; from pathlib import Path; from safetensors.torch import save_file; "
        "from quantkit.io.load import load; "
        "m, t = load(sys.argv[1], dtype=getattr(torch, sys.argv[3])); seen, sd = set(), {}\n"
        "for k, v in m.state_dict().items():\n"
        "    if v.data_ptr() not in seen: seen.add(v.data_ptr()); sd[k] = v.contiguous()\n"
        "save_file(sd, str(Path(sys.argv[2]) / 'model.safetensors'), metadata={'format': 'pt'}); "
        "c = m.config; c.__dict__.pop('quantization_config', None); c.save_pretrained(sys.argv[2]); "
        "t is not None and t.save_pretrained(sys.argv[2])"
    )
    log.warning("expanding %s to float safetensors in %s (once, in a child process)", source, folder)
    with atomic_dir(folder) as tmp:
        r = subprocess.run([sys.executable, "-c", code, str(source), str(tmp), dtype], capture_output=True, text=True)
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise SourceError(f"could not expand {source} into {folder}: {last}")


def float_folder(source, offload_dir: str | Path | None, dtype: str = "float32") -> Path:
    """A folder of float safetensors + config.json for `source` (in place for HF folders)."""
    from .load import resolve

    src = resolve(source)
    if src.kind in ("hf_dir", "safetensors_file"):
        folder = Path(src.path)
        if any(folder.glob("*.safetensors")):
            return folder
    if offload_dir is None:
        raise SourceError(f"streaming {source} needs --offload-dir: a folder for its float weights on disk")
    folder = Path(offload_dir) / "float"
    if not (folder / "config.json").is_file():
        _expand_to_folder(str(source), folder, dtype)
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
        missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        left = [n for n, p in module.named_parameters() if p.is_meta]
        if left:
            raise SourceError(f"{self.folder}: no weights for {prefix}{left[0]} ({len(left)} missing)")


def open_streaming(source, offload_dir=None, dtype: torch.dtype = torch.float32):
    """(model with weightless blocks, tokenizer, loader) for block-by-block quantization."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..arch import family_of
    from ..pipeline import head_modules

    keep_heap_small()
    folder = float_folder(source, offload_dir, str(dtype).replace("torch.", ""))
    config = AutoConfig.from_pretrained(str(folder))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fam = family_of(model)
    loader = BlockLoader(folder, dtype)
    # the embedding table and output head stay on disk (memory-mapped, read only where used):
    # the walk needs only the calibration tokens' rows, and they are quantized at its end
    mapped = frozenset(f"{n}.weight" for n in head_modules(model)[:2] if n)
    rest = loader.tensors("", exclude=(fam.blocks + ".",), mapped=mapped)
    model.load_state_dict(rest, strict=False, assign=True)
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
