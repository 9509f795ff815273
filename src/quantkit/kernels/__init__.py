"""Kernels: the fastest correct matmul for a packed layout on the device at hand."""
from .cpu import ACT_DTYPE, ACTIVATIONS, Kernel
from .registry import KERNELS, KERNELS_BY_NAME, pick_kernel

__all__ = ["ACT_DTYPE", "ACTIVATIONS", "KERNELS", "KERNELS_BY_NAME", "Kernel", "pick_kernel"]
