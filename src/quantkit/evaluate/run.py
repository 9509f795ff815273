"""`evaluate_model`: one model's quality, size and speed, as the JSON keys the CLI prints."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..data import eval_windows, generate_reference_text, windows_from_ids
from ..errors import DataError
from .guard import GUARDED_HEADS, check_reference
from .hidden import HiddenReference, encoder_windows, measure_of, score_hidden
from .quality import ReferenceCache, score
from .size import memory_bytes
from .speed import decode_speed

log = logging.getLogger(__name__)

SPEED_PROMPT = "The history of the city begins"


def weights_bytes(model) -> int:
    """Exact size of the weights file quantkit writes for `model` as it is now (no write)."""
    from ..io.checkpoint import METADATA, checkpoint_tensors, safetensors_bytes

    if hasattr(model, "quantkit"):
        tensors = checkpoint_tensors(model)
    else:
        seen, tensors = set(), {}
        for k, t in model.state_dict().items():
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if ptr not in seen:
                seen.add(ptr)
                tensors[k] = t
    return safetensors_bytes({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, METADATA)


def make_windows(tokenizer, text=None, ctx=512, max_tokens=None, generator_model=None):
    """Evaluation windows from `text`, or (offline) from text `generator_model` writes itself."""
    if text is not None:
        return eval_windows(tokenizer, text, ctx=ctx, max_tokens=max_tokens)
    if generator_model is None:
        raise DataError("no text to evaluate on: pass --text PATH, or a reference model to generate text from")
    ids = generate_reference_text(generator_model, tokenizer)
    return windows_from_ids(ids, min(ctx, len(ids)))


def guard_reference(model, reference, tokenizer=None) -> None:
    """When a quantized `model` is measured against a float `reference` model (one transformers
    built, not a quantkit checkpoint), check first that quantkit holds that float model right with
    the embeddings/head storage `model` uses (evaluate/guard.py); SourceError if not."""
    if not isinstance(reference, nn.Module) or hasattr(reference, "quantkit") or not hasattr(model, "quantkit"):
        return
    head = (model.quantkit.head or {}).get("scheme") or "keep"
    if head not in GUARDED_HEADS:
        log.warning("guard: embeddings/head stored as %s; checking the float model with a bf16 head instead", head)
        head = "bf16"
    check_reference(reference, head=head, tokenizer=tokenizer)


def _evaluate_encoder(model, tokenizer, text, reference, ctx, max_tokens, windows, size_bytes, progress) -> dict:
    """An encoder's (or encoder-decoder's) measure: hidden-state similarity to `reference` (a
    model or a HiddenReference) on windows of `text` (evaluate/hidden.py); no decode speed."""
    if not isinstance(reference, HiddenReference):
        if reference is None:
            raise DataError("an encoder is measured against its float model (hidden-state similarity; perplexity is "
                            "for causal LMs): pass --reference FLOAT_MODEL")
        if windows is None:
            if text is None:
                raise DataError("an encoder is measured on a text: pass --text PATH")
            windows = encoder_windows(tokenizer, text, model, ctx, max_tokens)
        reference = HiddenReference(reference, windows)
    res = score_hidden(model, reference, progress=progress)
    res["size_bytes"] = weights_bytes(model) if size_bytes is None else size_bytes
    res["memory_bytes"] = memory_bytes(model)
    return res


def evaluate_model(model, tokenizer, text=None, reference=None, ctx=512, max_tokens=None, speed=False,
                   windows=None, size_bytes=None, progress=True, guard=True, compile_speed=False,
                   on_status=None) -> dict:
    """Perplexity, KLD/top-1 vs `reference` (a model or a ReferenceCache), sizes, speed; for an
    encoder or encoder-decoder, hidden-state similarity to `reference` instead (evaluate/hidden.py).
    `compile_speed`: time decode through a compiled step (decode_speed(compile=True)) where a
    C++ compiler exists, else eagerly with a warning; the untimed compile is reported as
    `decode_compile_seconds` (about half a minute the first time on 2 cores, well under a second
    for a later model of the same architecture). `on_status` gets a line before it compiles.
    `guard`: with a reference model, first check that quantkit holds it right (`guard_reference`)."""
    if guard:
        guard_reference(model, reference, tokenizer)
    if measure_of(model) == "hidden":
        return _evaluate_encoder(model, tokenizer, text, reference, ctx, max_tokens, windows, size_bytes, progress)
    if windows is None:
        gen = reference.model if isinstance(reference, ReferenceCache) else reference
        windows = make_windows(tokenizer, text, ctx, max_tokens, generator_model=gen if text is None else None)
    clip = [m.run_stats for m in model.modules() if "clipped" in (getattr(m, "run_stats", None) or {})]
    for c in clip:
        c["clipped"] = c["values"] = 0
    res = score(model, windows, reference=reference, progress=progress)
    if clip:  # static activation ranges meet the evaluation text: how often they saturated
        n, total = sum(c["clipped"] for c in clip), sum(c["values"] for c in clip)
        res["act_clipped_values"], res["act_clipped_fraction"] = n, n / max(1, total)
        if n:
            log.warning("static activation ranges: %d of %d input values (%.4f%%) clipped at the range's bound",
                        n, total, 100 * n / max(1, total))
    if text is None:
        res["text"] = "generated by the reference model"
    res["size_bytes"] = weights_bytes(model) if size_bytes is None else size_bytes
    res["memory_bytes"] = memory_bytes(model)
    if speed:
        ids = tokenizer(SPEED_PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
        compiled = bool(compile_speed)
        if compiled:
            from .generate import can_compile

            why = can_compile(model)
            if why:
                log.warning("timing decode eagerly: %s", why)
                compiled = False
            elif on_status is not None:
                on_status("compiling the decode step (torch.compile; once per architecture, about half a minute)")
        sp = decode_speed(model, ids, new_tokens=64, compile=compiled)
        res["decode_tokens_per_s"] = sp["decode_tokens_per_s"]
        res["decode_compiled"] = compiled and sp["compiled"]
        if compiled:
            res["decode_compile_seconds"] = sp["compile_seconds"]
    return res
