"""Modules that hold quantized weights and run them through a kernel."""
from .quant_linear import QuantEmbedding, QuantLinear

__all__ = ["QuantLinear", "QuantEmbedding"]
