"""`LoRALinear`: a trainable low-rank update over a frozen (quantized) base layer.

LoRA (Hu et al. 2021, arXiv:2106.09685): y = base(x) + (alpha / r) * B A dropout(x), with
A [r, in] initialised like nn.Linear (Kaiming uniform) and B [out, r] zero, so training starts
from the base model exactly. The names `lora_A` / `lora_B` and their shapes are PEFT's, so a
saved adapter loads with `peft.PeftModel.from_pretrained`.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int = 8, alpha: float = 32,
                 dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """The update this adapter adds to the base weight: (alpha/r) * B @ A, [out, in] float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        xa = self.dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(xa)) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"
