"""Generation speed and greedy generations, through the model's own forward with a KV cache.

One loop (:func:`_greedy`) serves both the speed measurement and the side-by-side generations:
prefill the prompt into a ``transformers.DynamicCache``, take the argmax of the last logits, feed
it back, repeat. It never stops at EOS, so every model does exactly the same amount of work.
Only the decode steps after the prefill are timed (with a device synchronize at both ends).
"""

from __future__ import annotations

import inspect
import logging
import time

import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from quantkit.errors import DataError, QuantkitError
from quantkit.evaluate.quality import device_of, eval_mode

__all__ = ["decode_speed", "greedy_generate", "greedy_tokens", "prefill_speed"]

log = logging.getLogger(__name__)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def new_cache(model: nn.Module) -> DynamicCache:
    return DynamicCache(config=getattr(model, "config", None))


def _check_ids(ids: torch.Tensor, batch_one: bool) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 1:
        raise DataError("token ids must be a 2-D tensor [batch, length] with at least one token")
    if batch_one and ids.shape[0] != 1:
        raise DataError(f"greedy decoding takes one prompt [1, length], got shape {tuple(ids.shape)}")


def _greedy(model: nn.Module, prompt_ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Prefill ``prompt_ids`` [1, p], then run ``steps`` decode steps (argmax fed back).

    Returns (tokens [steps + 1]: the prefill's prediction then one per decode step,
    seconds spent in the decode steps only). Call under inference_mode and eval mode.
    """
    device = device_of(model)
    cache = new_cache(model)
    out = model(input_ids=prompt_ids.to(device), past_key_values=cache, use_cache=True)
    if out.past_key_values is not None:
        cache = out.past_key_values
    tok = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # [1, 1]
    generated = [tok]
    sync_device(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        if out.past_key_values is not None:
            cache = out.past_key_values
        tok = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(tok)
    sync_device(device)
    seconds = time.perf_counter() - start
    return torch.cat(generated, dim=1)[0].cpu(), seconds


class _CompiledStep:
    """One decode step of a model through torch.compile as a single graph (fullgraph=True), or
    eagerly when the model cannot be traced as one (`eager_reason` says why; logged once).

    Every model's step is the same Python function to dynamo, so a graph is shared by models of
    one architecture and layer kinds (quantkit's layers reach it as tensors). Partial graphs
    would be shared too and mislead later models into graph-broken runs: hence one graph or none."""

    def __init__(self, model: nn.Module):
        def eager(tok, cache, pos):
            return model(input_ids=tok, past_key_values=cache, use_cache=True, cache_position=pos,
                         position_ids=pos[None]).logits

        # each model's graph counts against the step function's recompile limit (8 by default),
        # past which dynamo would silently run later models eagerly
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        self._eager = eager
        self.owner = id(model)  # a deep copy of the model (qk.quantize makes one) must not run this one
        self._step = torch.compile(eager, dynamic=False, fullgraph=True)
        self.eager_reason: str | None = None
        self._traced = False

    def __call__(self, tok, cache, pos):
        if self.eager_reason is not None:
            return self._eager(tok, cache, pos)
        if self._traced:
            return self._step(tok, cache, pos)
        try:  # the first call traces and compiles
            out = self._step(tok, cache, pos)
        except Exception as e:  # a graph break, data-dependent control flow: this model decodes eagerly
            # (a genuine error in the model raises again from the eager call below)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            self.eager_reason = f"the decode step does not compile as one graph ({type(e).__name__}: {first})"
            log.warning("decoding eagerly: %s", self.eager_reason)
            return self._eager(tok, cache, pos)
        self._traced = True
        return out


def compiled_step(model: nn.Module) -> _CompiledStep:
    """The model's decode step through torch.compile (see _CompiledStep), cached on the model:
    with a StaticCache every step has the same shapes, so one graph serves them all."""
    step = getattr(model, "_quantkit_compiled_step", None)
    if step is None or step.owner != id(model):  # none yet, or copied along with the model it was built for
        step = _CompiledStep(model)
        object.__setattr__(model, "_quantkit_compiled_step", step)  # not a submodule
    return step


def _greedy_compiled(model: nn.Module, prompt_ids: torch.Tensor, steps: int, cache_len: int) -> tuple[torch.Tensor, float]:
    """`_greedy` with a StaticCache of `cache_len` positions and compiled decode steps (the
    prefill runs eagerly). Same return values."""
    device = device_of(model)
    p = prompt_ids.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    out = model(input_ids=prompt_ids.to(device), past_key_values=cache, use_cache=True,
                cache_position=torch.arange(p, device=device))
    tok = out.logits[:, -1].argmax(dim=-1, keepdim=True)
    generated = [tok]
    step = compiled_step(model)
    sync_device(device)
    start = time.perf_counter()
    for i in range(steps):
        logits = step(tok, cache, torch.tensor([p + i], device=device))
        tok = logits[:, -1].argmax(dim=-1, keepdim=True)
        generated.append(tok)
    sync_device(device)
    seconds = time.perf_counter() - start
    return torch.cat(generated, dim=1)[0].cpu(), seconds


def greedy_tokens(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32) -> torch.Tensor:
    """The ``new_tokens`` greedy continuation token ids [new_tokens] of ``prompt_ids`` [1, p] (no EOS stop)."""
    _check_ids(prompt_ids, batch_one=True)
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    with torch.inference_mode(), eval_mode(model):
        tokens, _ = _greedy(model, prompt_ids, new_tokens - 1)
    return tokens


def decode_speed(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    new_tokens: int = 64,
    warmup: int = 8,
    repeats: int = 1,
    compile: bool = False,
) -> dict:
    """Greedy decode throughput with a KV cache, batch 1.

    After an untimed warm-up run of ``warmup`` decode steps, each of ``repeats`` runs prefills
    ``prompt_ids`` [1, p] (untimed) and times exactly ``new_tokens`` decode steps; the fastest run
    is reported as ``{"decode_tokens_per_s", "new_tokens", "seconds"}``.

    ``compile=True``: a transformers StaticCache and decode steps through ``torch.compile``
    (inductor; needs a C++ compiler on CPU). The warm-up (at least one step) compiles, untimed,
    reported as ``"compile_seconds"`` (warm-up steps included): about half a minute on 2 cores
    the first time, well under a second for a later model of the same architecture and layer
    kinds (quantkit's layers reach the graph as tensors, so it is reused). ``"compiled"`` is
    False where the step does not trace as one graph and ran eagerly (logged once).
    """
    _check_ids(prompt_ids, batch_one=True)
    if new_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("need new_tokens >= 1, repeats >= 1 and warmup >= 0")
    if compile and device_of(model).type == "cpu":
        import shutil

        if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            raise QuantkitError("compile=True needs a C++ compiler on the PATH for torch.compile on CPU "
                                "(install g++, e.g. apt install g++), or measure with compile=False")
    with torch.inference_mode(), eval_mode(model):
        if compile:
            cache_len = prompt_ids.shape[1] + max(new_tokens, warmup) + 1  # one shape: one graph
            run = lambda steps: _greedy_compiled(model, prompt_ids, steps, cache_len)  # noqa: E731
            warmup = max(warmup, 1)
        else:
            run = lambda steps: _greedy(model, prompt_ids, steps)  # noqa: E731
        t0 = time.perf_counter()
        if warmup:
            run(warmup)
        first = time.perf_counter() - t0
        best = min(run(new_tokens)[1] for _ in range(repeats))
    best = max(best, 1e-9)
    out = {"decode_tokens_per_s": new_tokens / best, "new_tokens": new_tokens, "seconds": best}
    if compile:  # the untimed warm-up compiles (a graph already built for this architecture is reused)
        out["compile_seconds"] = first
        out["compiled"] = compiled_step(model).eager_reason is None
    return out


def prefill_speed(model: nn.Module, ids: torch.Tensor, warmup: int = 1, repeats: int = 3,
                  last_logits: bool = False) -> float:
    """Prompt-processing throughput in tokens/s: one forward of ``ids`` [b, L] into a fresh
    KV cache, best of ``repeats`` after ``warmup`` untimed forwards.

    By default the forward computes logits for every position (as evaluation does);
    ``last_logits=True`` computes only the last position's, as ``generate`` does before its
    first new token (transformers' ``logits_to_keep=1``), so the number is the prompt's
    time to first token without the vocabulary projection of positions nobody reads."""
    _check_ids(ids, batch_one=False)
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    extra = {}
    if last_logits:
        if "logits_to_keep" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"{type(model).__name__}.forward has no logits_to_keep: measure with last_logits=False")
        extra["logits_to_keep"] = 1
    device = device_of(model)
    ids = ids.to(device)
    best = float("inf")
    with torch.inference_mode(), eval_mode(model):
        for i in range(warmup + repeats):
            cache = new_cache(model)
            sync_device(device)
            start = time.perf_counter()
            model(input_ids=ids, past_key_values=cache, use_cache=True, **extra)
            sync_device(device)
            if i >= warmup:
                best = min(best, time.perf_counter() - start)
    return ids.numel() / max(best, 1e-9)


def _eos_ids(tokenizer) -> set[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple, set)) else {int(eos)}


def greedy_generate(model: nn.Module, tokenizer, prompt: str, new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` as text (the continuation only, not the prompt).

    Uses the same loop as :func:`decode_speed`; the text is cut at the first EOS token, if any.
    """
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise DataError("the prompt is empty and the tokenizer has no BOS token to start from")
        ids = torch.tensor([[bos]])
    tokens = greedy_tokens(model, ids, new_tokens).tolist()
    eos = _eos_ids(tokenizer)
    for i, t in enumerate(tokens):
        if t in eos:
            tokens = tokens[:i]
            break
    return tokenizer.decode(tokens, skip_special_tokens=True)
