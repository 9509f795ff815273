"""Text generation for people: greedy decoding that streams its text and says how fast it went.

The decode steps run through torch.compile with a StaticCache where a C++ compiler exists
(quantkit's kernels are custom ops with fake kernels, so one graph holds a whole step); the
first compiled step is timed apart as the compile time, and the eager loop is the fallback.
"""
from __future__ import annotations

import logging
import shutil
import time
from typing import Callable

import torch
from torch import nn
from transformers import StaticCache

from quantkit.errors import DataError
from quantkit.evaluate.quality import device_of, eval_mode
from quantkit.evaluate.speed import compiled_step, new_cache, sync_device

log = logging.getLogger(__name__)


def can_compile(model: nn.Module) -> str | None:
    """Why decode steps cannot be compiled here (None when they can)."""
    if device_of(model).type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler on the PATH (torch.compile needs one on CPU)"
    return None


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, compile: bool = True,
             stop_at_eos: bool = True, on_text: Callable[[str], None] | None = None,
             on_status: Callable[[str], None] | None = None) -> dict:
    """Greedy continuation of `prompt`. `on_text` receives each new piece of text as it is
    decoded; `on_status` progress lines (compiling). Returns {"text", "new_tokens", "prompt_tokens",
    "prefill_seconds", "compile_seconds", "decode_seconds", "decode_tokens_per_s", "compiled"}.
    decode_tokens_per_s counts the steps after the first (which, compiled, includes the compile)."""
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] < 1:
        raise DataError("the prompt is empty after tokenization")
    why = can_compile(model) if compile else "turned off"
    if compile and why:
        log.warning("decoding eagerly: %s", why)
    compiled = why is None
    device = device_of(model)
    eos = getattr(tokenizer, "eos_token_id", None) if stop_at_eos else None
    p = ids.shape[1]
    out_ids: list[int] = []
    shown = ""

    def emit(final: bool = False):
        nonlocal shown
        text = tokenizer.decode(out_ids, skip_special_tokens=True)
        # whole characters only, until the end (a byte-level piece waits for the next token)
        if on_text is not None and len(text) > len(shown) and (final or not text.endswith("\ufffd")):
            on_text(text[len(shown):])
            shown = text

    with torch.inference_mode(), eval_mode(model):
        t0 = time.perf_counter()
        if compiled:
            cache = StaticCache(config=model.config, max_cache_len=p + max_new_tokens + 1)
            out = model(input_ids=ids.to(device), past_key_values=cache, use_cache=True,
                        cache_position=torch.arange(p, device=device))
        else:
            cache = new_cache(model)
            out = model(input_ids=ids.to(device), past_key_values=cache, use_cache=True)
            cache = out.past_key_values if out.past_key_values is not None else cache
        tok = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        sync_device(device)
        prefill = time.perf_counter() - t0
        step = compiled_step(model) if compiled else None
        first = 0.0
        t1 = time.perf_counter()
        for i in range(max_new_tokens):
            out_ids.append(int(tok))
            emit()
            if (eos is not None and int(tok) == eos) or i == max_new_tokens - 1:
                break
            if compiled and i == 0 and on_status is not None and not getattr(model, "_quantkit_step_compiled", False):
                on_status("compiling the decode step (once per architecture and shape; about half a minute on 2 cores)...")
            ts = time.perf_counter()
            if compiled:
                logits = step(tok, cache, torch.tensor([p + i], device=device))
            else:
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                cache = out.past_key_values if out.past_key_values is not None else cache
                logits = out.logits
            tok = logits[:, -1].argmax(dim=-1, keepdim=True)
            if i == 0:
                sync_device(device)
                first = time.perf_counter() - ts
                t1 = time.perf_counter()
                object.__setattr__(model, "_quantkit_step_compiled", compiled)
        sync_device(device)
        rest = time.perf_counter() - t1
        emit(final=True)
    if compiled and step is not None and step.eager_reason is not None:
        compiled = False  # the step did not trace as one graph: it ran eagerly (logged)
    steps_after_first = max(len(out_ids) - 2, 0)
    return {"text": tokenizer.decode(out_ids, skip_special_tokens=True), "new_tokens": len(out_ids),
            "prompt_tokens": p, "prefill_seconds": prefill, "compile_seconds": first if compiled else 0.0,
            "decode_seconds": rest, "decode_tokens_per_s": steps_after_first / rest if steps_after_first and rest > 0 else None,
            "compiled": compiled}
