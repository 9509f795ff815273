"""Reading the weight of a float layer, whatever class holds it."""
from __future__ import annotations

import torch
from torch import nn


def linear_weight(mod: nn.Module) -> torch.Tensor | None:
    """The [out, in] weight of an nn.Linear or transformers' Conv1D ([in, out]); else None."""
    if isinstance(mod, nn.Linear):
        return mod.weight
    if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
        return mod.weight.t()
    return None
