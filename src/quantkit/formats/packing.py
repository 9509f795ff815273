"""Bit packing of small unsigned integer codes into bytes (row-major, flattened).

Layouts (the on-disk format of every packed quantkit tensor):

* 4 bits: two codes per byte, the first code in the low nibble.
* 2 bits: four codes per byte, the first code in the lowest two bits.
* 3 bits: a little-endian bit stream; every 8 codes fill 3 bytes (code i occupies bits
  3i..3i+2 of the 24-bit little-endian word). The tail is padded with zero bits.
* 8 bits: pass-through (a copy of the flattened codes).

The packed length is always exactly ceil(numel * bits / 8) bytes.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack` produces for `numel` codes of `bits` bits."""
    _check_bits(bits)
    return (numel * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"cannot pack {bits}-bit codes; supported widths: {SUPPORTED_BITS}")


def _pad_to(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = (-x.numel()) % multiple
    if extra:
        x = torch.cat([x, x.new_zeros(extra)])
    return x


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes (any shape, uint8 values < 2**bits) into a 1-D uint8 tensor."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.dtype != torch.uint8:
        raise ValueError(f"pack expects uint8 codes, got {flat.dtype}")
    n = flat.numel()
    if bits == 8:
        return flat.clone()
    if n and int(flat.max()) >= (1 << bits):
        raise ValueError(f"code {int(flat.max())} does not fit in {bits} bits")
    if bits in (2, 4):
        per = 8 // bits
        v = _pad_to(flat, per).view(-1, per).to(torch.int32)  # [bytes, per]
        shifts = torch.arange(per, dtype=torch.int32) * bits
        out = (v << shifts).sum(dim=1)
    else:  # 3 bits: 8 codes -> one 24-bit word -> 3 bytes
        v = _pad_to(flat, 8).view(-1, 8).to(torch.int32)  # [words, 8]
        word = (v << (torch.arange(8, dtype=torch.int32) * 3)).sum(dim=1, keepdim=True)
        out = (word >> torch.tensor([0, 8, 16], dtype=torch.int32)) & 0xFF  # [words, 3]
    return out.reshape(-1)[: packed_nbytes(n, bits)].to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack`: the first `numel` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    packed = packed.reshape(-1)
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack expects uint8 bytes, got {packed.dtype}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{packed.numel()} packed bytes do not hold {numel} {bits}-bit codes (need {expected})")
    if bits == 8:
        return packed.clone()
    mask = (1 << bits) - 1
    if bits in (2, 4):
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        v = (packed.to(torch.int32).unsqueeze(1) >> shifts) & mask  # [bytes, per]
    else:
        b = _pad_to(packed, 3).view(-1, 3).to(torch.int32)  # [words, 3]
        word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = (word.unsqueeze(1) >> (torch.arange(8, dtype=torch.int32) * 3)) & mask  # [words, 8]
    return v.reshape(-1)[:numel].to(torch.uint8)
