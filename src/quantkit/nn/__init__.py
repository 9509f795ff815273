"""Modules that hold quantized weights and run them through a kernel, fused experts as one
layer per expert, and the trainable ones built on them: fake-quantized Linears for QAT and LoRA
adapters over a frozen base."""
from .experts import ExpertLinears, ExpertWeight
from .fake_quant import FakeQuantLinear
from .lora import LoRALinear
from .quant_linear import QuantEmbedding, QuantLinear
from .weights import linear_weight

__all__ = ["ExpertLinears", "ExpertWeight", "QuantLinear", "QuantEmbedding", "FakeQuantLinear", "LoRALinear", "linear_weight"]
