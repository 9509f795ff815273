"""Mixture-of-experts weights as one Linear per expert.

transformers 5 stores a family's experts fused, as 3-D parameters (`mlp.experts.gate_up_proj`
[E, out, in], or [E, in, out] where the family multiplies `x @ W[e]`, as gpt-oss does), and its
forward indexes them expert by expert: `F.linear(x, self.gate_up_proj[e])`. `ExpertLinears`
takes the place of such a parameter: its children "0" … "E-1" are one layer per expert (an
nn.Linear on a view of the fused tensor, then the QuantLinear quantkit swaps in), so every
expert is quantized, calibrated (a forward hook sees exactly the tokens routed to it), counted
and saved as a layer like any other. Indexing it gives an `ExpertWeight`, which the family's
own forward uses as it used the tensor: a linear or matmul with it runs that expert's layer,
and anything else sees the expert's (dequantized) weight, so the family's routing, gating and
biases are its own code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


def _dense(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight of one expert: the float Linear's own, or a QuantLinear's dequantized."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    return layer.dequantized_weight(dtype)


class ExpertWeight:
    """One expert's weight as the family's forward sees it (`experts.gate_up_proj[e]`)."""

    __slots__ = ("layer", "transposed", "dtype")

    def __init__(self, layer: nn.Module, transposed: bool, dtype: torch.dtype):
        self.layer, self.transposed, self.dtype = layer, transposed, dtype

    def dense(self) -> torch.Tensor:
        """The weight in the fused tensor's orientation ([out, in], or [in, out] if transposed)."""
        w = _dense(self.layer, self.dtype)
        return w.t() if self.transposed else w

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if len(args) >= 2 and isinstance(args[1], ExpertWeight) and isinstance(args[0], torch.Tensor):
            w = args[1]
            if func is F.linear and not w.transposed:  # F.linear(x, W[e]) = the expert's layer
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                y = w.layer(args[0])
                return y if bias is None else y + bias
            if func in _MATMULS and w.transposed and len(args) == 2 and not kwargs:  # x @ W[e], W stored [in, out]
                return w.layer(args[0])
        swap = lambda a: a.dense() if isinstance(a, ExpertWeight) else a  # noqa: E731
        return func(*[swap(a) for a in args], **{k: swap(v) for k, v in kwargs.items()})

    def __getattr__(self, name):  # .shape, .t(), .to(...): the dense weight's
        return getattr(self.dense(), name)


class ExpertLinears(nn.Module):
    """A fused expert parameter as E layers named "0" … "E-1" (see the module docstring).

    `transposed`: the fused tensor was [E, in, out] (each layer's weight is its transpose)."""

    def __init__(self, layers: list[nn.Module], transposed: bool, dtype: torch.dtype):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)
        self.transposed = transposed
        self.dtype = dtype

    @classmethod
    def split(cls, w: torch.Tensor, transposed: bool) -> "ExpertLinears":
        """Layers on views of the fused tensor `w` ([E, out, in], or [E, in, out] if transposed):
        no copy is made."""
        layers = []
        for e in range(w.shape[0]):
            we = w[e].t() if transposed else w[e]  # [out, in]
            lin = nn.Linear(we.shape[1], we.shape[0], bias=False, device="meta")
            lin.weight = nn.Parameter(we, requires_grad=False)
            layers.append(lin)
        return cls(layers, transposed, w.dtype)

    def __len__(self) -> int:
        return len(self._modules)

    def layer(self, e: int) -> nn.Module:
        return self._modules[str(e)]

    @property
    def shape(self) -> torch.Size:
        out, inp = self.layer(0).out_features, self.layer(0).in_features
        return torch.Size((len(self), inp, out) if self.transposed else (len(self), out, inp))

    def __getitem__(self, idx):
        if isinstance(idx, torch.Tensor) and idx.numel() == 1 and not idx.is_floating_point():
            idx = int(idx)
        if isinstance(idx, int):
            return ExpertWeight(self.layer(idx % len(self)), self.transposed, self.dtype)
        # several experts at once (transformers' batched implementation): their dense weights
        stacked = torch.stack([ExpertWeight(self.layer(e), self.transposed, self.dtype).dense()
                               for e in range(len(self))])
        return stacked[idx]

    def extra_repr(self) -> str:
        return f"experts={len(self)}, transposed={self.transposed}"
