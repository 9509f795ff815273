"""The kernels in preference order, and the choice of one for a stored weight."""
from __future__ import annotations

from ..formats import QuantizedWeight
from .cpu import DequantKernel, FloatKernel, Int4Kernel, Int8Kernel, Kernel, LLMInt8Kernel, W8A8Kernel
from .weight_only import NativeKernel

# Preference order: the first kernel that supports a weight runs it. NativeKernel (quantkit's
# C++ ops) supports nothing where they cannot be built: torch's packed kernels run instead.
KERNELS: list[type[Kernel]] = [FloatKernel, W8A8Kernel, LLMInt8Kernel, NativeKernel, Int4Kernel, Int8Kernel,
                               DequantKernel]
KERNELS_BY_NAME = {k.name: k for k in KERNELS}


def pick_kernel(qw: QuantizedWeight, name: str | None = None) -> type[Kernel]:
    if name is not None:
        k = KERNELS_BY_NAME[name]
        if not k.supports(qw):
            raise ValueError(f"kernel {name} cannot run scheme {qw.scheme.name} with shape {qw.shape}")
        return k
    return next(k for k in KERNELS if k.supports(qw))
