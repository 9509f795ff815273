"""Output quality of a (quantized) causal language model on evaluation windows.

Perplexity is ``exp`` of the mean next-token negative log-likelihood (natural log) over every
scored prediction: a window of ``ctx`` tokens gives ``ctx - 1`` predictions (position ``t``
predicts token ``t + 1``). Against a reference model we also report the mean KL divergence
``KL(P_ref || P_model)`` over the full vocabulary and the top-1 agreement (fraction of positions
where both models rank the same token first) — the measures that tell a quantized model apart
from its source far more sharply than perplexity alone.

A :class:`ReferenceCache` runs the reference once and keeps its log-probabilities in float16, so
many quantized variants can be compared without re-running (or even keeping) the reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quantkit.errors import DataError

__all__ = ["ReferenceCache", "score"]

log = logging.getLogger(__name__)


def _check_windows(windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise DataError("evaluation windows must be a 2-D tensor of token ids [n_windows, ctx]")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise DataError(f"evaluation windows must hold integer token ids, got {windows.dtype}")
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise DataError(
            f"need at least one window of at least 2 tokens to score, got shape {tuple(windows.shape)}"
        )


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Switch dropout & co. off while measuring; restore the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the model's next-token predictions for one window.

    window: [ctx] token ids. Returns [ctx - 1, vocab] in at least float32 (bf16/fp16 logits are
    upcast before the softmax); row ``t`` is the distribution over token ``t + 1``.
    """
    logits = model(input_ids=window.to(device_of(model))[None]).logits[0, :-1]  # [ctx-1, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.log_softmax(logits, dim=-1)


def _kl_per_position(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) for each row of two log-probability matrices [T, V] -> [T]."""
    p_ref = ref_lp.exp()
    # Where p_ref is exactly 0 the term is 0 even if ref_lp is -inf (avoids 0 * inf = nan).
    terms = torch.where(p_ref > 0, p_ref * (ref_lp - lp), torch.zeros_like(p_ref))
    return terms.sum(dim=-1)


def _ppl(nll_sum: float, tokens: int) -> float:
    mean = nll_sum / tokens
    return math.exp(mean) if mean < 700 else math.inf


def _progress(total: int, progress: bool, desc: str) -> tqdm:
    # disable=None lets tqdm hide itself when stderr is not a terminal.
    return tqdm(total=total, desc=desc, unit="win", disable=None if progress else True, leave=False)


class ReferenceCache:
    """A reference model's log-probabilities on fixed windows, computed once, stored as float16.

    ``ReferenceCache(model, windows)`` runs ``model`` over every window and keeps
    ``logprobs`` ([n, ctx - 1, vocab] float16, on the CPU) together with the reference's own
    ``perplexity`` and ``tokens``. Pass it as ``reference=`` to :func:`score` to get the same KL
    divergence and top-1 agreement as passing the model itself (to float16 rounding). Memory is
    ``2 * n * (ctx - 1) * vocab`` bytes — e.g. 40 windows of 512 tokens at a 49k vocabulary is 2 GB.

    The windows are kept (a copy) and :func:`score` refuses different ones with ``ValueError``.
    The model is only weakly referenced (``cache.model`` is None once it has been freed).
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, progress: bool = True) -> None:
        _check_windows(windows)
        self.windows = windows.detach().to("cpu", copy=True)
        self._model = weakref.ref(model)
        n, ctx = self.windows.shape
        nll_sum = 0.0
        self.logprobs: torch.Tensor | None = None  # [n, ctx-1, V] float16, allocated on first window
        with torch.inference_mode(), eval_mode(model), _progress(n, progress, "reference") as bar:
            for i in range(n):
                lp = _log_probs(model, self.windows[i])  # [ctx-1, V]
                if self.logprobs is None:
                    self.logprobs = torch.empty((n, ctx - 1, lp.shape[-1]), dtype=torch.float16)
                targets = self.windows[i, 1:].to(lp.device)
                nll_sum += -lp.gather(-1, targets[:, None]).double().sum().item()
                self.logprobs[i] = lp.to("cpu", torch.float16)
                bar.update(1)
        self.tokens = n * (ctx - 1)
        self.perplexity = _ppl(nll_sum, self.tokens)

    @property
    def model(self) -> nn.Module | None:
        """The reference model, if it is still alive (the cache does not keep it)."""
        return self._model()

    @property
    def vocab_size(self) -> int:
        return int(self.logprobs.shape[-1])

    def check(self, windows: torch.Tensor) -> None:
        """Raise ValueError unless ``windows`` are exactly the windows this cache was built on."""
        if tuple(windows.shape) != tuple(self.windows.shape) or not torch.equal(
            windows.detach().to("cpu", torch.long), self.windows.to(torch.long)
        ):
            raise ValueError(
                "ReferenceCache was computed on different evaluation windows; "
                "build it from the same token windows that are scored"
            )

    def log_probs(self, i: int) -> torch.Tensor:
        """Float32 log-probabilities of window ``i`` [ctx - 1, vocab], renormalized after fp16 rounding."""
        return F.log_softmax(self.logprobs[i].float(), dim=-1)


def score(
    model: nn.Module,
    windows: torch.Tensor,
    reference: nn.Module | ReferenceCache | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` on ``windows`` [n, ctx], and its agreement with ``reference``.

    Returns ``{"perplexity", "tokens"}`` and, when a reference (a model or a
    :class:`ReferenceCache`) is given, also ``"kl_divergence"`` (mean over scored positions of
    ``KL(P_ref || P_model)`` in nats) and ``"top1_agreement"`` (fraction in [0, 1]).
    Every window is scored whole (no padding, no attention mask); ``tokens = n * (ctx - 1)``.
    Raises DataError for malformed windows and ValueError for a reference that does not match.
    """
    _check_windows(windows)
    n, ctx = windows.shape
    cache = reference if isinstance(reference, ReferenceCache) else None
    ref_model = reference if isinstance(reference, nn.Module) else None
    if reference is not None and cache is None and ref_model is None:
        raise TypeError(f"reference must be an nn.Module or a ReferenceCache, got {type(reference).__name__}")
    if cache is not None:
        cache.check(windows)

    nll_sum = kl_sum = 0.0
    agree = 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.enter_context(eval_mode(model))
        if ref_model is not None and ref_model is not model:
            stack.enter_context(eval_mode(ref_model))
        bar = stack.enter_context(_progress(n, progress, "score"))
        for i in range(n):
            window = windows[i]
            lp = _log_probs(model, window)  # [ctx-1, V]
            targets = window[1:].to(lp.device)
            nll_sum += -lp.gather(-1, targets[:, None]).double().sum().item()
            if reference is not None:
                ref_lp = cache.log_probs(i) if cache is not None else _log_probs(ref_model, window)
                ref_lp = ref_lp.to(lp.device, lp.dtype)
                if ref_lp.shape != lp.shape:
                    raise ValueError(
                        f"reference predicts over {ref_lp.shape[-1]} tokens but the model over "
                        f"{lp.shape[-1]}: they must share a vocabulary"
                    )
                kl_sum += _kl_per_position(ref_lp, lp).double().sum().item()
                agree += int((ref_lp.argmax(-1) == lp.argmax(-1)).sum().item())
            bar.update(1)

    tokens = n * (ctx - 1)
    result = {"perplexity": _ppl(nll_sum, tokens), "tokens": tokens}
    if reference is not None:
        result["kl_divergence"] = kl_sum / tokens
        result["top1_agreement"] = agree / tokens
    return result
