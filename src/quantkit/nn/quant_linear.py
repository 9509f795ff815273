"""`QuantLinear` and `QuantEmbedding`: modules that keep a quantized weight in memory.

A QuantLinear holds the storage `QuantizedWeight` (the codec's tensors, as buffers `st_<part>`)
from the moment it is built: that is what `save` writes, as it is. The kernel's layout is
made from it once, the first time the layer runs (`quantize` followed by `save` never makes
it). Then a kernel whose layout gives the storage back exactly (`Kernel.unpack`) lets the
storage go; one that cannot without probing its layout (torch's int4 packing) keeps both.
"""
from __future__ import annotations

import torch
from torch import nn

from ..formats import QuantizedWeight
from ..kernels import ACTIVATIONS, pick_kernel

_ST = "st_"  # prefix of the storage buffers


class QuantLinear(nn.Module):
    """Drop-in for nn.Linear (and transformers' Conv1D) with a quantized weight."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None, kernel: str | None = None):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.scheme = qw.scheme
        self.kernel = pick_kernel(qw, kernel)
        self.kernel.check(qw)
        self._parts = list(qw.tensors)  # storage parts still held (st_<part>)
        for part, t in qw.tensors.items():
            self.register_buffer(_ST + part, t, persistent=False)
        self._names: list[str] = []  # the kernel's buffers, once packed
        self._bufs: "dict[str, torch.Tensor] | None" = None  # looked up once, not per call (decode runs ~200 per token)
        self._bound = None  # the kernel's per-layer call arguments (Kernel.bind), once packed
        self.activations = "exact"  # activation mode (kernels.ACTIVATIONS): set_activations
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._shape = (self.out_features, self.in_features)
        self.run_stats = self.kernel.new_stats(self.scheme)  # kernel counters (LLM.int8() outliers, w8a8 clipping)

    @property
    def is_packed(self) -> bool:
        """Whether the kernel's layout has been made (the layer has run)."""
        return self._bufs is not None

    @property
    def weight(self) -> torch.Tensor:
        """What model code that reads `layer.weight` (for its dtype, as T5's feed-forward does
        to cast its input) finds: the kernel's float weight where it has one, else the stored
        codes as int8 (as bitsandbytes' int8 layers show; model code leaves int8 weights'
        inputs alone, where a uint8 or float16 tensor, e.g. a scale, would make T5 cast its
        activations to that dtype). Not the float weight: use `dequantized_weight()` for that."""
        w = self._buffers.get("weight")
        if w is not None:
            return w
        for name in ("st_qweight", "codes", "q", "packed"):
            w = self._buffers.get(name)
            if w is not None:
                return w.view(torch.int8) if w.element_size() == 1 and w.dtype != torch.int8 else w
        return next(iter(self._buffers.values()))

    def _storage(self) -> dict[str, torch.Tensor]:
        return {part: getattr(self, _ST + part) for part in self._parts}

    def pack(self) -> None:
        """Make the kernel's layout from the storage (once; the first forward does it)."""
        if self._bufs is not None:
            return
        bufs = self.kernel.pack(QuantizedWeight(self.scheme, self._shape, self._storage()))
        for name, t in bufs.items():
            if name in self._parameters or name in self._modules:
                raise ValueError(f"kernel {self.kernel.name}: buffer name {name!r} clashes with the module's own")
            self._buffers[name] = t  # not register_buffer: its hasattr() check would come back here
            self._non_persistent_buffers_set.add(name)
        self._names = list(bufs)
        if not self.kernel.keeps_storage:
            for part in self._parts:
                if _ST + part not in bufs:
                    del self._buffers[_ST + part]
            self._parts = []
        self._bufs = {n: getattr(self, n) for n in self._names}
        self._bound = self.kernel.bind(self._bufs, self.scheme, self._shape, self.activations)

    def set_activations(self, mode: str) -> bool:
        """Run this layer with activation mode `mode` ("exact", "int8" or "int8-all", see
        kernels.ACTIVATIONS); True when its kernel has that path for this layout (else the layer
        stays exact and False comes back)."""
        if mode not in ACTIVATIONS:
            raise ValueError(f"activation mode {mode!r} is not one of {', '.join(ACTIVATIONS)}")
        self.activations = mode
        if self._bufs is None:
            self.pack()  # binds with the new mode
        else:
            self._bound = self.kernel.bind(self._bufs, self.scheme, self._shape, mode)
        return self.bound_activations == mode

    @property
    def bound_activations(self) -> str:
        """The activation mode the layer runs: its `activations` where its kernel has the path for
        this layout, else "exact"."""
        return "exact" if self._bound is None else self.kernel.bound_activations(self._bound)

    def buffers_dict(self) -> dict[str, torch.Tensor]:
        """The kernel's buffers (packing first if the layer has not run yet)."""
        if self._bufs is None:
            self.pack()
        return {n: getattr(self, n) for n in self._names}

    def _apply(self, fn, *args, **kwargs):  # .to()/.cpu() replace buffers: refresh the cached dict
        out = super()._apply(fn, *args, **kwargs)
        if self._bufs is not None:
            self._bufs = {n: getattr(self, n) for n in self._names}
            self._bound = self.kernel.bind(self._bufs, self.scheme, self._shape, self.activations)
        return out

    def quantized_weight(self) -> QuantizedWeight:
        """The storage QuantizedWeight: the tensors held since the layer was built, or (when the
        kernel let them go) rebuilt exactly from its layout."""
        if self._parts:
            return QuantizedWeight(self.scheme, self._shape, self._storage())
        return self.kernel.unpack(self.buffers_dict(), self.scheme, self._shape)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._bufs is None:
            self.pack()
        if self._bound is not None:
            y = self.kernel.run(x, self._bound)
        elif self.run_stats is not None:
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
        if not (s.kind in ("float", "ggml") or (s.kind in ("int", "llm-int8") and s.bits == 8 and s.symmetric
                                                 and s.group_size == -1)):
            raise ValueError(f"embeddings can be stored as bf16, fp16, fp32, int8 (per row) or a GGUF type, not {s.name}")
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
        lin.pack()
        if lin.scheme.kind == "float":
            out = lin.weight[ids].to(self.out_dtype)
        elif lin.scheme.kind == "ggml":  # a GGUF table kept as its blocks: the looked-up rows dequantized
            out = lin.kernel.embed_rows(lin._bufs, lin.scheme, lin._shape, ids).to(self.out_dtype)
        else:
            b = lin._bufs  # int8 codes and fp16 scale [V, 1], named by the kernel that holds them
            q, s16 = (b["q"], b["scale16"]) if "q" in b else (b["st_qweight"], b["st_scale"])
            rows = q[ids].to(self.out_dtype)  # [..., D] int8 codes of the looked-up rows
            out = rows * s16[ids].to(self.out_dtype)  # [..., 1]
        return out if self.embed_scale is None else out * self.embed_scale.to(self.out_dtype)
