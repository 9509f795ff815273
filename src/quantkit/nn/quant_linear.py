"""`QuantLinear` and `QuantEmbedding`: modules that keep the packed weight in memory.

They only hold buffers (in the kernel's layout) and dispatch to a kernel; the storage
`QuantizedWeight` is rebuilt exactly on demand (`quantized_weight()`), for saving.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedWeight
from ..kernels import pick_kernel


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear (and transformers' Conv1D) with a quantized weight."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.scheme = qw.scheme
        self.kernel = pick_kernel(qw, kernel)
        self._names = []
        for name, t in self.kernel.pack(qw).items():
            self.register_buffer(name, t, persistent=False)
            self._names.append(name)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._bufs = self.buffers_dict()  # looked up once, not per call (decode runs ~200 of these per token)
        self._shape = (self.out_features, self.in_features)
        self.run_stats = self.kernel.new_stats(self.scheme)  # kernel counters (LLM.int8() outliers, w8a8 clipping)

    def buffers_dict(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._names}

    def _apply(self, fn, *args, **kwargs):  # .to()/.cpu() replace buffers: refresh the cached dict
        out = super()._apply(fn, *args, **kwargs)
        self._bufs = self.buffers_dict()
        return out

    def quantized_weight(self) -> QuantizedWeight:
        return self.kernel.unpack(self.buffers_dict(), self.scheme, (self.out_features, self.in_features))

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.run_stats is not None:
            y = self.kernel.matmul(x, self._bufs, self.scheme, self._shape, stats=self.run_stats)
        else:
            y = self.kernel.matmul(x, self._bufs, self.scheme, self._shape)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, kernel={self.kernel.name}"


class QuantEmbedding(nn.Module):
    """Embedding table in a 16-bit float or int8-per-row layout; rows are dequantized on lookup.

    With tied weights the output head is a QuantLinear over the very same buffers (`tie_to`),
    so the table is held once.
    """

    SUPPORTED = ("float", "int8-per-row")

    def __init__(self, qw: QuantizedWeight, padding_idx: int | None = None, out_dtype=torch.float32,
                 embed_scale: "torch.Tensor | float | None" = None):
        super().__init__()
        s = qw.scheme
        if not (s.kind == "float" or (s.kind in ("int", "llm-int8") and s.bits == 8 and s.symmetric and s.group_size == -1)):
            raise ValueError(f"embeddings can be stored as bf16, fp16, fp32 or int8 (per row), not {s.name}")
        self.num_embeddings, self.embedding_dim = qw.shape
        self.padding_idx = padding_idx
        self.out_dtype = out_dtype
        self.linear = QuantLinear(qw)  # holds the buffers; also usable as the tied output head
        # families that scale their embeddings (Gemma: sqrt(hidden)) keep the scale: the stored
        # table stays unscaled, as the tied head and GGUF files need it
        self.register_buffer("embed_scale", None if embed_scale is None else torch.as_tensor(embed_scale).detach().clone(),
                             persistent=False)

    @property
    def scheme(self):
        return self.linear.scheme

    def quantized_weight(self) -> QuantizedWeight:
        return self.linear.quantized_weight()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        if lin.scheme.kind == "float":
            out = lin.weight[ids].to(self.out_dtype)
        else:
            rows = lin.q[ids].to(self.out_dtype)  # [..., D] int8 codes of the looked-up rows
            out = rows * lin.scale16[ids].to(self.out_dtype)  # scale16 [V, 1] -> [..., 1]
        return out if self.embed_scale is None else out * self.embed_scale.to(self.out_dtype)
