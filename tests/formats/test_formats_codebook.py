"""NF4 / FP4 blockwise codecs: level tables, nearest-level choice, double quant, sizes."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from quantkit.formats import quantize, storage_bytes
from quantkit.formats.codebook import (
    FP4_LEVELS,
    NF4_LEVELS,
    block_absmax,
    block_codes,
    double_dequant,
    double_quant,
    nearest_code,
)
from quantkit.scheme import parse_scheme

QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}


def half_max_gap(levels):
    v = levels.sort().values
    return float((v[1:] - v[:-1]).max()) / 2


def test_nf4_table():
    assert NF4_LEVELS.dtype == torch.float32
    assert torch.equal(NF4_LEVELS, torch.tensor(QLORA_NF4, dtype=torch.float32))
    assert torch.all(NF4_LEVELS[1:] > NF4_LEVELS[:-1])  # strictly sorted
    assert NF4_LEVELS[0] == -1 and NF4_LEVELS[-1] == 1 and NF4_LEVELS[7] == 0
    assert int((NF4_LEVELS < 0).sum()) == 7 and int((NF4_LEVELS > 0).sum()) == 8  # asymmetric by one level


def test_fp4_table_layout():
    assert FP4_LEVELS.dtype == torch.float32 and FP4_LEVELS.numel() == 16
    mags = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    for code in range(16):  # code = sign << 3 | magnitude index
        sign = -1 if code >> 3 else 1
        assert FP4_LEVELS[code].item() == pytest.approx(sign * mags[code & 7] / 6)
    assert FP4_LEVELS.abs().max() == 1


def test_nearest_code_hand_examples():
    y = torch.tensor([0.0, 1.0, 0.9, 0.8, -1.0, -0.05, 0.05])
    # nf4: mid(0.7230, 1) = 0.8615 -> 0.9 -> 15, 0.8 -> 14; mid(-0.0911, 0) = -0.0455 -> -0.05 -> 6
    assert nearest_code(y, "nf4").tolist() == [7, 15, 15, 14, 0, 6, 8]
    # fp4: 0.4 lies below mid(2/6, 3/6) = 0.4167 -> magnitude index 4 (2/6); zero is code 0, never -0
    y = torch.tensor([0.0, -0.0, 0.4, -0.4, 1.0, -1.0, 0.45])
    assert nearest_code(y, "fp4").tolist() == [0, 0, 4, 12, 7, 15, 5]


def test_nf4_hand_block():
    w = torch.zeros(1, 64)
    w[0, :4] = torch.tensor([2.0, -1.0, 0.5, 1.9])
    qw = quantize(w, "nf4-b64")
    assert qw.tensors["scale"].tolist() == [2.0]
    # x/absmax = [1, -0.5, 0.25, 0.95] -> levels [1, -0.5251, 0.2461, 1]
    assert block_codes(qw)[0, :5].tolist() == [15, 2, 10, 15, 7]
    expect = torch.tensor([2.0, -2 * 0.5250730514526367, 2 * 0.24611230194568634, 2.0, 0.0])
    assert torch.allclose(qw.dequantize()[0, :5], expect)


@pytest.mark.parametrize("name", ["nf4-b32", "fp4-b64-dq", "nf4-b128-dq", "fp4-b32"])
def test_zero_blocks_are_exact(name):
    w = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    w[1] = 0.0
    w[2, 64:] = 0.0
    x = quantize(w, name).dequantize()
    assert torch.equal(x[1], torch.zeros(128)) and torch.equal(x[2, 64:], torch.zeros(64))
    assert not torch.equal(x[0], torch.zeros(128))


def test_bits_per_weight():
    n = 64 * 128
    assert storage_bytes("nf4-b64", (64, 128)) * 8 / n == 4 + 32 / 64  # 4.5
    out, inn = 256, 256
    n = out * inn
    nb = n // 64
    expect = 4 + 8 / 64 + 32 * math.ceil(nb / 256) / n + 32 / n
    qw = quantize(torch.randn(out, inn, generator=torch.Generator().manual_seed(3)), "nf4-b64-dq")
    assert qw.nbytes * 8 / n == pytest.approx(expect, rel=1e-12)
    assert abs(expect - 4.127) < 1e-3


def test_double_quant_chunks_and_accuracy():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(10, 64 * 30, generator=gen)  # 300 blocks -> 2 chunks of 256 (tail padded)
    qw = quantize(w, "nf4-b64-dq")
    t = qw.tensors
    assert t["scale_q"].dtype == torch.int8 and t["scale_q"].shape == (300,)
    assert t["scale_scale"].dtype == torch.float32 and t["scale_scale"].shape == (2,)
    assert t["scale_offset"].dtype == torch.float32 and t["scale_offset"].shape == (1,)
    a = w.reshape(-1, 64).abs().amax(1)
    a_dq = block_absmax(qw)
    assert torch.allclose(t["scale_offset"], a.mean().reshape(1))
    ss = t["scale_scale"].repeat_interleave(256)[:300]
    assert ((a_dq - a).abs() <= ss / 2 + 1e-6).all()
    assert float(((a_dq - a).abs() / a).max()) < 0.01
    dq = double_quant(a)
    assert torch.equal(double_dequant(dq["scale_q"], dq["scale_scale"], dq["scale_offset"]), a_dq)


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(["nf4", "fp4"]),
    dq=st.booleans(),
    block=st.sampled_from([32, 64, 128]),
    out=st.integers(1, 4),
    blocks_per_row=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    log_mag=st.integers(-6, 3),
)
def test_codebook_round_trip_property(kind, dq, block, out, blocks_per_row, seed, log_mag):
    sc = parse_scheme(f"{kind}-b{block}" + ("-dq" if dq else ""))
    w = torch.randn(out, block * blocks_per_row, generator=torch.Generator().manual_seed(seed)) * 10.0**log_mag
    qw = quantize(w, sc)
    x = qw.dequantize()
    assert x.shape == w.shape and qw.nbytes == storage_bytes(sc, tuple(w.shape))
    a = block_absmax(qw)[:, None].abs()  # [n_blocks, 1] dequantized absmax
    wb, xb = w.reshape(-1, block), x.reshape(-1, block)
    if not dq:
        assert torch.equal(a[:, 0], wb.abs().amax(1))
    err = (wb - xb).abs()
    clip = (wb.abs() - a).clamp(min=0)  # only non-zero when dq rounded the absmax down
    tol = 1e-6 * (wb.abs() + a)
    assert (err <= half_max_gap(LEVELS[kind]) * a + clip + tol).all()
    # the chosen level is the nearest one to w / absmax
    y = (wb / a).clamp(-1, 1)
    dist_all = (y[..., None] - LEVELS[kind]).abs().amin(-1)
    chosen = (y - LEVELS[kind][block_codes(qw).reshape(-1, block).long()]).abs()
    assert (chosen <= dist_all + 1e-6).all()
