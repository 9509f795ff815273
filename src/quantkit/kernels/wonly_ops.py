"""Fake (meta) kernels of the weight-only custom ops, so torch.compile traces through them.

The ops themselves are C++ (wonly.cpp), registered when `native.wonly()` loads the library;
this module is imported right after that, never on its own.
"""
from __future__ import annotations

import torch


@torch.library.register_fake("quantkit::wonly_linear")
def _linear_fake(x, codes, scale, zero, scale2, offset, lut, bias, N, K, group, decode, zconst, smul, isa, max_rows):
    torch._check(x.dim() == 2 and x.shape[1] == K)
    return x.new_empty((x.shape[0], N))


@torch.library.register_fake("quantkit::wonly_dequant")
def _dequant_fake(codes, scale, zero, scale2, offset, lut, bias, N, K, group, decode, zconst, smul, isa, r0, r1):
    return codes.new_empty((r1 - r0, K), dtype=torch.float32)


@torch.library.register_fake("quantkit::wonly_linear_a8")
def _linear_a8_fake(x, codes, scale, zero, scale2, offset, lut, bias, N, K, group, decode, zconst, smul, isa):
    torch._check(x.dim() == 2 and x.shape[1] == K)
    return x.new_empty((x.shape[0], N))


@torch.library.register_fake("quantkit::wonly_run")
def _run_fake(x, handle, N):
    return x.new_empty((x.shape[0], N))
