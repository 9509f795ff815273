"""Encoders and encoder-decoders: what quantization costs them, measured on their hidden states.

Perplexity is a causal LM's measure. An encoder (BERT, RoBERTa, a sentence-embedding model) is
used for its hidden states, so a quantized encoder is compared with its float reference on the
same windows of text:
* embedding cosine: cos(mean-pooled last hidden state, the reference's), per window; its mean
  and its minimum over windows (what a sentence-embedding user sees);
* hidden NMSE: Σ‖h − h_ref‖² / Σ‖h_ref‖² over every token's last hidden state.
An encoder-decoder (T5) is measured on its encoder's last hidden state. `measure_of` says which
measure a model gets; `compare` and `evaluate_model` report it.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import eval_windows

MEASURE = "hidden-state similarity to the reference (mean-pooled embedding cosine, hidden NMSE)"


def measure_of(model: nn.Module) -> str:
    """"perplexity" for a causal LM (a model that generates and is not an encoder-decoder),
    "hidden" for encoders and encoder-decoders."""
    cfg = getattr(model, "config", None)
    gen = getattr(model, "can_generate", None)
    causal = callable(gen) and gen() and not getattr(cfg, "is_encoder_decoder", False)
    return "perplexity" if causal else "hidden"


def max_window(model: nn.Module, ctx: int) -> int:
    """The longest window the model's position table takes (RoBERTa's starts after a padding
    offset: two positions fewer), at most `ctx`."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return ctx if not n else min(ctx, int(n) - 2)


def encoder_windows(tokenizer, text: str, model: nn.Module, ctx: int = 512, max_tokens=None) -> torch.Tensor:
    return eval_windows(tokenizer, text, ctx=max_window(model, ctx), max_tokens=max_tokens)


@torch.no_grad()
def last_hidden(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """The last hidden state [L, D] (float32) of one window [L]: the encoder's, for an
    encoder-decoder."""
    ids = window[None]
    mask = torch.ones_like(ids)
    if getattr(model.config, "is_encoder_decoder", False):
        out = model.get_encoder()(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state[0].float()
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1][0].float()


class HiddenReference:
    """The reference model's last hidden states on the windows, computed once."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, progress: bool = False):
        self.model = model
        self.windows = windows
        self.hidden = [last_hidden(model, w) for w in tqdm(windows, desc="reference", unit="window",
                                                             disable=not progress)]


def score_hidden(model: nn.Module, reference: HiddenReference, progress: bool = True) -> dict:
    """Embedding cosine (mean and min over windows) and hidden NMSE of `model` against `reference`."""
    cos, err, norm = [], 0.0, 0.0
    for w, ref in tqdm(list(zip(reference.windows, reference.hidden)), desc="hidden states", unit="window",
                       disable=not progress):
        h = last_hidden(model, w)
        cos.append(float(torch.nn.functional.cosine_similarity(h.mean(0), ref.mean(0), dim=0)))
        err += float((h - ref).double().pow(2).sum())
        norm += float(ref.double().pow(2).sum())
    return {"measure": MEASURE, "embedding_cosine": sum(cos) / len(cos), "embedding_cosine_min": min(cos),
            "hidden_nmse": err / max(norm, 1e-30), "tokens": int(reference.windows.numel()),
            "windows": int(reference.windows.shape[0])}
