"""Bit packing: exact layouts, sizes and round trips for 2/3/4/8-bit codes."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantkit.formats.packing import pack, packed_nbytes, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 9, 13, 101, 1001])
def test_round_trip_odd_lengths(bits, n):
    g = torch.Generator().manual_seed(1000 * bits + n)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack(packed, bits, n), codes)


def test_pack_flattens_row_major():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    assert torch.equal(unpack(pack(codes, 4), 4, 6), codes.reshape(-1))


def test_4bit_layout_first_value_in_low_nibble():
    assert pack(torch.tensor([1, 2, 15], dtype=torch.uint8), 4).tolist() == [0x21, 0x0F]


def test_2bit_layout_first_value_in_lowest_bits():
    # 1 | 2<<2 | 3<<4 | 0<<6 = 1 + 8 + 48 = 57 ; tail [2] -> 2
    assert pack(torch.tensor([1, 2, 3, 0, 2], dtype=torch.uint8), 2).tolist() == [57, 2]


def test_3bit_layout_little_endian_stream():
    # code i occupies bits 3i..3i+2: code 2 (value 7) spans bits 6..8 -> byte0 bits 6,7 and byte1 bit 0
    assert pack(torch.tensor([0, 0, 7], dtype=torch.uint8), 3).tolist() == [0b11000000, 0b1]
    # eight 7s fill exactly 24 bits
    assert pack(torch.full((8,), 7, dtype=torch.uint8), 3).tolist() == [255, 255, 255]
    # values 0..7: word = sum(i << 3i)
    word = sum(i << (3 * i) for i in range(8))
    assert pack(torch.arange(8, dtype=torch.uint8), 3).tolist() == [word & 255, (word >> 8) & 255, word >> 16]


def test_errors():
    with pytest.raises(ValueError):
        pack(torch.tensor([16], dtype=torch.uint8), 4)
    with pytest.raises(ValueError):
        pack(torch.tensor([1], dtype=torch.uint8), 5)
    with pytest.raises(ValueError):
        pack(torch.tensor([1], dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        unpack(torch.zeros(3, dtype=torch.uint8), 4, 8)  # 8 nibbles need 4 bytes


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), data=st.data())
def test_round_trip_property(bits, data):
    values = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=0, max_size=70))
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.numel() == (len(values) * bits + 7) // 8
    assert unpack(packed, bits, len(values)).tolist() == values
