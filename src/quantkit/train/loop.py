"""The training loop QAT and QLoRA share: batches, optimizer, schedule, checkpoints, resume.

Batches are random spans of the training token ids; the spans of step t are drawn from a
generator seeded with (seed, t), so a run resumed from a checkpoint sees exactly the batches
the uninterrupted run would have seen. A checkpoint (`<out>/checkpoint/`, written atomically)
holds the trainable parameters, the optimizer state, the RNG state, the step and the losses
so far; `resume=True` continues from it and reproduces the same loss curve.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..errors import DataError, QuantkitError
from ..io.atomic import atomic_dir
from ..memory import rss_bytes
from .optim8bit import AdamW8bit, state_bytes

log = logging.getLogger(__name__)

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit}
SCHEDULES = ("cosine", "constant")
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one run (validated on construction)."""

    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup: int = 0  # linear warm-up steps
    schedule: str = "cosine"  # "cosine" (to 0 at the last step) or "constant"
    optimizer: str = "adamw"  # "adamw" or "adamw8bit"
    max_grad_norm: float = 1.0  # 0 = no clipping
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0 = checkpoint only at the end
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise QuantkitError(f"need steps >= 1, batch size >= 1 and sequence length >= 2 "
                                f"(got {self.steps}, {self.batch_size}, {self.seq_len})")
        if not self.lr > 0:
            raise QuantkitError(f"learning rate must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise QuantkitError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise QuantkitError(f"unknown schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")


def batch_for_step(ids: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    """The token batch [batch_size, seq_len] of `step`, a pure function of (ids, seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - cfg.seq_len + 1, (cfg.batch_size,), generator=g)
    return torch.stack([ids[s: s + cfg.seq_len] for s in starts.tolist()])


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for `step` (0-based)."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / span))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(folder: Path, model, opt, step: int, history: list[float], cfg: TrainConfig) -> None:
    with atomic_dir(folder, "resume") as tmp:
        save_file({n: p.detach().contiguous() for n, p in trainable(model).items()}, str(Path(tmp) / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, Path(tmp) / "optimizer.pt")
        (Path(tmp) / "state.json").write_text(json.dumps({"step": step, "losses": history, "config": asdict(cfg)}, indent=1))


def _load_checkpoint(folder: Path, model, opt, cfg: TrainConfig) -> tuple[int, list[float]]:
    try:
        state = json.loads((folder / "state.json").read_text())
        params = load_file(str(folder / "trainable.safetensors"))
        extra = torch.load(folder / "optimizer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler refuses a tampered file in many ways
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"cannot resume from {folder}: {msg}; remove it to start over") from None
    saved = state.get("config", {})
    for key in ("batch_size", "seq_len", "seed", "optimizer"):
        if saved.get(key) != getattr(cfg, key):
            raise QuantkitError(f"cannot resume from {folder}: it was trained with {key}={saved.get(key)!r}, "
                                f"this run asks {getattr(cfg, key)!r}")
    mine = trainable(model)
    if set(params) != set(mine):
        raise QuantkitError(f"cannot resume from {folder}: its trainable parameters do not match this model's")
    with torch.no_grad():
        for n, t in params.items():
            mine[n].copy_(t)
    opt.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["rng"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Switch transformers' activation (gradient) checkpointing on or off, by either name."""
    kind = "enable" if on else "disable"
    for prefix in ("activation", "gradient"):
        fn = getattr(model, f"{prefix}_checkpointing_{kind}", None)
        if fn is not None:
            fn(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}) if on else fn()
            return
    raise QuantkitError("this model does not support gradient checkpointing; run without --grad-checkpointing")


def train(model: nn.Module, ids: torch.Tensor, cfg: TrainConfig, out_dir: str | Path | None = None,
          resume: bool = False, progress: bool = True, loss_fn=None) -> dict:
    """Train the parameters of `model` that require grad on spans of the 1-D token ids `ids`.

    `loss_fn(model, batch) -> scalar` defaults to the causal-LM cross-entropy. Returns a
    summary: per-step losses, seconds, trainable parameter count, optimizer-state bytes, peak
    RSS. With `out_dir`, checkpoints go to `out_dir/checkpoint` (every `save_every` steps and
    at the end) and `resume=True` continues from there.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() < cfg.seq_len + 1:
        raise DataError(f"training text too short: {ids.numel()} tokens for sequences of {cfg.seq_len}; "
                        "pass a longer text or a smaller --seq-len")
    params = trainable(model)
    if not params:
        raise QuantkitError("the model has no trainable parameters")
    torch.manual_seed(cfg.seed)
    opt = OPTIMIZERS[cfg.optimizer](list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if loss_fn is None:
        def loss_fn(m, batch):
            return m(input_ids=batch, labels=batch, use_cache=False).loss
    if cfg.grad_checkpointing:
        _checkpointing(model, True)
    folder = None if out_dir is None else Path(out_dir) / CHECKPOINT
    start, history = 0, []
    if resume:
        if folder is None or not (folder / "state.json").exists():
            raise QuantkitError(f"nothing to resume: no checkpoint in {folder}")
        start, history = _load_checkpoint(folder, model, opt, cfg)
        log.info("resumed from %s at step %d", folder, start)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress)
    try:
        for step in range(start, cfg.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss = loss_fn(model, batch_for_step(ids, cfg, step))
            if not torch.isfinite(loss):
                raise QuantkitError(f"loss became {loss.item()} at step {step}; lower --lr")
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if cfg.log_every and (step + 1) % cfg.log_every == 0:
                recent = history[-cfg.log_every:]
                log.info("step %d/%d loss %.4f lr %.2e", step + 1, cfg.steps, sum(recent) / len(recent), lr_at(cfg, step))
            if folder is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(folder, model, opt, step + 1, history, cfg)
    finally:
        bar.close()
    if folder is not None:
        _save_checkpoint(folder, model, opt, cfg.steps, history, cfg)
    if cfg.grad_checkpointing:
        _checkpointing(model, False)
    model.eval()
    return {"losses": history, "steps": cfg.steps, "resumed_at": start if resume else None,
            "seconds": round(time.perf_counter() - t0, 2),
            "trainable_params": sum(p.numel() for p in params.values()),
            "optimizer": cfg.optimizer, "optimizer_state_bytes": state_bytes(opt),
            "peak_rss_bytes": rss_bytes(peak=True), "config": asdict(cfg)}
