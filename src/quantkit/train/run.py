"""End-to-end training jobs behind `quantkit qat` and `quantkit finetune`.

Text: training spans come from the text's calibration part (for the WikiText file, the
articles of its last quarter) and held-out perplexity from the first `eval_tokens` tokens of
its evaluation part, so the two never overlap (data.py).

Output folder:
* qat: `model/` (the converted quantkit checkpoint), `checkpoint/` (resume), `results.json`;
* finetune: `adapter/` (PEFT layout), `merged/` with --merge (quantkit checkpoint),
  `checkpoint/`, `results.json`.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..data import eval_windows, text, tokenize
from ..evaluate.quality import score
from ..io.atomic import MARKER, atomic_file, check_output
from .loop import TrainConfig, train

log = logging.getLogger(__name__)


def _texts(path, tokenizer, eval_tokens: int, ctx: int):
    train_ids = tokenize(tokenizer, text(path, "calib"))
    windows = eval_windows(tokenizer, text(path, "eval"), ctx=ctx, max_tokens=eval_tokens) if eval_tokens else None
    return train_ids, windows


def _ppl(model, windows, progress):
    return None if windows is None else score(model, windows, progress=progress)["perplexity"]


def _make_out(out: Path) -> None:
    """The training output folder (OUT/model, OUT/checkpoint, ... go inside), marked as quantkit's
    when this run creates it (an existing one is marked when its results are written)."""
    if not out.exists():
        out.mkdir(parents=True)
        _mark(out)


def _mark(out: Path) -> None:
    if not (out / MARKER).exists():
        (out / MARKER).write_text(json.dumps({"kind": "training"}) + "\n", encoding="utf-8")


def _write_results(out: Path, res: dict) -> None:
    _mark(out)
    with atomic_file(out / "results.json", "w") as f:
        f.write(json.dumps(res, indent=2, default=str))


def run_qat(model, tokenizer, scheme: str, text_path, out_dir, cfg: TrainConfig, lsq: bool = False,
            head: str | None = None, resume: bool = False, eval_tokens: int = 4096, ctx: int = 512,
            progress: bool = True, overwrite: bool = False, protect=()) -> dict:
    """prepare_qat -> train -> convert -> save `out/model`; held-out perplexity of the result
    and how closely the converted model reproduces the fake-quantized one."""
    from ..io.checkpoint import save
    from .qat import convert, prepare_qat

    out = check_output(out_dir, "training", overwrite=overwrite, protect=protect)
    train_ids, windows = _texts(text_path, tokenizer, eval_tokens, ctx)
    qmodel = prepare_qat(model, scheme, lsq=lsq)
    _make_out(out)  # only once every argument was accepted: a refused run leaves no folder
    summary = train(qmodel, train_ids, cfg, out_dir=out, resume=resume, progress=progress)
    probe = (windows[0] if windows is not None else train_ids[:ctx])[None]
    with torch.no_grad():
        fake = qmodel(probe).logits
        ref = convert(copy.deepcopy(qmodel), head="keep", kernel="dequant")(probe).logits
    qmodel = convert(qmodel, head=head)
    with torch.no_grad():
        fast = qmodel(probe).logits
    save(qmodel, out / "model", tokenizer, overwrite=overwrite)
    res = {"out": str(out / "model"), "scheme": scheme, "lsq": lsq, **summary,
           "convert_max_logit_diff": {"reference_kernel": float((fake - ref).abs().max()),
                                      "fast_kernels": float((fake - fast).abs().max())},
           "held_out_perplexity": _ppl(qmodel, windows, progress), "eval_tokens": eval_tokens}
    _write_results(out, res)
    return res


def run_finetune(model, tokenizer, text_path, out_dir, cfg: TrainConfig, scheme: str = "nf4-b64-dq", r: int = 8,
                 alpha: float = 32, dropout: float = 0.05, targets=("q_proj", "v_proj"), compute_dtype: str = "fp32",
                 merge_adapters: bool = False, merge_scheme: str | None = None, resume: bool = False, eval_tokens: int = 4096, ctx: int = 512,
                 base_name: str = "", progress: bool = True, overwrite: bool = False, protect=()) -> dict:
    """QLoRA on `text_path`: held-out perplexity of the 4-bit model before and after, the
    adapter in PEFT's layout, optionally merged and re-quantized."""
    from ..io.checkpoint import save
    from .qlora import merge, prepare_qlora, save_adapter

    out = check_output(out_dir, "training", overwrite=overwrite, protect=protect)
    train_ids, windows = _texts(text_path, tokenizer, eval_tokens, ctx)
    qmodel = prepare_qlora(model, scheme, r, alpha, dropout, targets, compute_dtype)
    _make_out(out)
    del model
    before = _ppl(qmodel, windows, progress)
    summary = train(qmodel, train_ids, cfg, out_dir=out, resume=resume, progress=progress)
    after = _ppl(qmodel, windows, progress)
    save_adapter(qmodel, out / "adapter", base_name, overwrite=overwrite)
    res = {"adapter": str(out / "adapter"), "base_scheme": qmodel.quantkit.config.scheme.name, "r": r, "alpha": alpha,
           "dropout": dropout, "targets": list(targets), "compute_dtype": compute_dtype, **summary,
           "held_out_perplexity_before": before, "held_out_perplexity_after": after, "eval_tokens": eval_tokens}
    if merge_adapters:
        merged = merge(qmodel, merge_scheme)
        save(merged, out / "merged", tokenizer, overwrite=overwrite)
        res["merged"] = str(out / "merged")
        res["merge_scheme"] = merge_scheme or res["base_scheme"]
        res["held_out_perplexity_merged"] = _ppl(merged, windows, progress)
    _write_results(out, res)
    return res
