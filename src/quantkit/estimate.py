"""Know before you run: the output size (exact), and the wall time and peak memory of a
quantization run (`quantkit quantize`) on this machine, from the model's shapes and a short
measured probe on the model itself (loaded in this process).

Time. Data-free methods (rtn, llm-int8): up to SAMPLES real layers of each distinct (shape,
scheme, method) are quantized, timed, and the mean multiplied by the count. Calibrated methods
(gptq, static activation ranges, SmoothQuant): the real block walk runs on copies of the first
block (a warm-up, which also measures the memory transient), then of the first two, timed,
with the real calibration samples: the run is blocks x half that time. The embedding/head
storage is timed once.

Memory, in phases (resident bytes of the process):
  loaded  the model with every parameter resident (the probe touches them: a checkpoint
          loaded through mmap is otherwise only partly resident)
  + quant the quantized modules' buffers (measured on the sampled layers, scaled by count) and
          the embedding/head storage, minus the float weights that are freed as layers are
          swapped (those in anonymous memory; pages of a mapped checkpoint stay resident);
          calibrated methods add the transient of one block (activations, Hessians), measured
          on the one-block probe with the high-water mark reset (Linux /proc/self/clear_refs)
  + save  the stored tensors unpacked, and safetensors' serialization (two copies of the file)
  peak = max(what loading took, loaded + quant transient, loaded + quant + save).
The model is left as it was.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .memory import rss_bytes
from .algorithms import method_of
from .config import QuantConfig
from .modules import head_modules, head_scheme, iter_targets, layer_module, linear_weight, set_module
from .pipeline import QuantInfo, needs_calibration, quantize_calibrated, swap_quantized, validate_config
from .scheme import parse_scheme


@dataclass
class RunEstimate:
    size_bytes: int  # model.safetensors, exact
    seconds: float  # the quantization step (what `quantize` reports as quantize_seconds)
    peak_rss_bytes: int  # the process's peak resident memory over load + quantize + save
    probe_seconds: float  # what measuring took

    def to_dict(self) -> dict:
        return asdict(self)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _targets(model: nn.Module, cfg: QuantConfig) -> list[tuple[str, tuple[int, int], object, object]]:
    """(name, shape, scheme, method) of every layer `cfg` stores quantized."""
    return [(t.name, t.shape, t.scheme, t.method) for t in iter_targets(model, cfg) if t.scheme is not None]


SAMPLES = 8  # real layers timed per distinct kind (the median is used)


def _probe_layers(model, targets, cfg) -> tuple[float, int]:
    """(seconds to quantize every target, bytes of their QuantLinear buffers), from up to
    SAMPLES real layers per distinct (shape, scheme, method), quantized into a throwaway holder
    (the model keeps its float layers)."""
    kinds: dict[tuple, list[str]] = {}
    for name, shape, scheme, method in targets:
        kinds.setdefault((shape, scheme, method), []).append(name)
    seconds, buf_bytes = 0.0, 0
    warm = True  # the first call pays one-off costs (lazy imports, kernel set-up): run it once untimed
    for (shape, scheme, method), names in kinds.items():
        picks = names[:: max(1, len(names) // SAMPLES)][:SAMPLES]
        times, sizes = [], []
        for name in ([picks[0]] if warm else []) + picks:
            holder = nn.Module()
            holder.layer = layer_module(model, name)
            t0 = time.perf_counter()
            swap_quantized(holder, "layer", holder.layer, scheme, method, {}, QuantInfo(cfg))
            if warm:
                warm = False
                continue
            times.append(time.perf_counter() - t0)
            sizes.append(sum(b.numel() * b.element_size() for b in holder.layer.buffers()))
        seconds += sorted(times)[len(times) // 2] * len(names)  # the median: one slow sample is noise
        buf_bytes += int(sum(sizes) / len(sizes) * len(names))
    return seconds, buf_bytes


def _probe_blocks(model, cfg, targets, calib, batch_size, k) -> float:
    """Run the calibrated block walk on copies of the first k blocks; returns its seconds."""
    from .arch import blocks_of, family_of

    fam = family_of(model)
    original = blocks_of(model, fam)
    copies = nn.ModuleList([copy.deepcopy(b) for b in list(original)[:k]])
    plans = {n: (sc, m) for n, _, sc, m in targets
             if n.startswith(fam.blocks + ".") and int(n[len(fam.blocks) + 1:].split(".")[0]) < k}
    set_module(model, fam.blocks, copies)
    try:
        t0 = time.perf_counter()
        quantize_calibrated(model, plans, calib, cfg, QuantInfo(cfg), batch_size=batch_size, progress=False)
        return time.perf_counter() - t0
    finally:
        set_module(model, fam.blocks, original)
        del copies


def estimate_quantize(model: nn.Module, cfg: QuantConfig, calib: torch.Tensor | None = None,
                      batch_size: int = 8) -> RunEstimate:
    """Estimate of `quantkit quantize` with `cfg` on `model` (loaded in this process; `calib`
    the calibration token ids for calibrated configs). See the module docstring."""
    from .arch import blocks_of, family_of
    from .formats import storage_bytes
    from .io.checkpoint import expected_weights_bytes
    from .memory import file_backed

    validate_config(cfg)
    t_start = time.perf_counter()
    size = expected_weights_bytes(model, cfg)
    load_peak = rss_bytes(peak=True)
    params = list({id(p): p for p in model.parameters()}.values())
    with torch.no_grad():
        for p in params:  # make every parameter resident, as the run will
            p.detach().sum()
    loaded = rss_bytes(peak=False)
    targets = _targets(model, cfg)
    weights = {n: linear_weight(layer_module(model, n)) for n, _, _, _ in targets}
    emb_name, out_name, tied = head_modules(model)
    head_w = [model.get_submodule(n).weight for n in {emb_name, out_name} - {None}
              if getattr(model.get_submodule(n), "weight", None) is not None]
    anon = [not fb for fb in file_backed([w for w in weights.values()] + head_w)]
    freed = sum(w.numel() * w.element_size() for w, a in zip(list(weights.values()) + head_w, anon) if a)
    head_store = sum(storage_bytes(head_scheme(cfg.head, w.dtype), tuple(w.shape)) for w in head_w[:1 if tied else 2])
    stored = sum(storage_bytes(sc, shape) for _, shape, sc, _ in targets)
    largest = max((s[0] * s[1] for _, s, _, _ in targets), default=0) * 4
    if needs_calibration(cfg):
        if calib is None:
            raise ValueError("calibrated configs need the calibration ids to probe with")
        fam = family_of(model)
        n_blocks = len(blocks_of(model, fam))
        measured = _reset_peak()
        before = rss_bytes(peak=False)
        t1 = _probe_blocks(model, cfg, targets, calib, batch_size, 1)  # also warms up: timed again below
        transient = max(0, rss_bytes(peak=True) - before) if measured else 6 * largest
        # two blocks, timed after the warm-up: the per-block time (the fixed cost, capturing the
        # first block's inputs, is a small part of a block's work and counted in it)
        per_block = _probe_blocks(model, cfg, targets, calib, batch_size, 2) / 2 if n_blocks > 1 else t1
        outside = [t for t in targets if not t[0].startswith(fam.blocks + ".")]
        # outside the blocks the pipeline uses rtn (and per-token activations for static schemes), as here;
        # the buffers' size depends on the weight scheme and kernel, not the method: measured with rtn
        rtn = method_of("rtn")
        data_free = [(n, s, parse_scheme("w8a8-dynamic") if sc.needs else sc, rtn) for n, s, sc, _ in targets]
        out_s = _probe_layers(model, [t for t in data_free if t[0] in {o[0] for o in outside}], cfg)[0] if outside else 0.0
        _, bufs = _probe_layers(model, data_free, cfg)
        seconds = n_blocks * per_block + out_s
    else:
        seconds, bufs = _probe_layers(model, targets, cfg)
        transient = 4 * largest
    if head_w:  # the embedding/head storage is written last, in both kinds of run
        from .formats import quantize as quantize_tensor

        t0 = time.perf_counter()
        quantize_tensor(head_w[0].detach(), head_scheme(cfg.head, head_w[0].dtype))
        seconds += time.perf_counter() - t0
    after_quant = loaded + bufs + head_store - freed
    peak = max(load_peak, loaded + transient, after_quant + transient, after_quant + stored + 2 * size)
    return RunEstimate(size, seconds, int(peak), time.perf_counter() - t_start)
