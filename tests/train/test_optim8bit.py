"""8-bit AdamW: the dynamic code, the block-wise state round trip, the update against
torch's AdamW, and the memory it saves."""
from __future__ import annotations

import pytest
import torch

from quantkit.train.optim8bit import BLOCK, LEVELS, AdamW8bit, dequantize_state, quantize_state, state_bytes


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_code_has_256_sorted_levels_with_zero_and_one(signed):
    lv = LEVELS[signed]
    assert lv.numel() == 256 and bool((lv[1:] > lv[:-1]).all())
    assert 0.0 in lv.tolist() and lv.max().item() == 1.0
    assert (lv.min().item() < 0) == signed
    # the finest band sits next to 1: 64 (signed) or 128 (unsigned) even steps over [0.1, 1]
    top = lv[lv > 0.1]
    assert (top[1:] - top[:-1]).max() <= 0.9 / (64 if signed else 128) + 1e-6
    # small magnitudes stay representable: down to below 1e-6 of the block's absmax
    assert lv[lv != 0].abs().min().item() < 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_state_round_trip_error_is_bounded_relative_to_each_value(signed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * BLOCK + 123, generator=g) * torch.logspace(-4, 0, 3 * BLOCK + 123)
    if not signed:
        x = x.abs()
    codes, absmax = quantize_state(x, signed)
    assert codes.dtype == torch.uint8 and codes.numel() == x.numel() and absmax.numel() == 4
    y = dequantize_state(codes, absmax, x.shape, signed)
    big = x.abs() > 0.1 * absmax.repeat_interleave(BLOCK)[: x.numel()]
    rel = ((y - x).abs() / x.abs().clamp(min=1e-30))[big]
    assert rel.max() < 0.075  # >= 0.1 x absmax: half a step of 0.9/64 over the value, at most
    assert bool((torch.sign(y[y != 0]) == torch.sign(x[y != 0])).all())
    assert (y.abs().amax() - x.abs().amax()).abs() < 1e-6  # the absmax itself is exact (level 1)


def test_all_zero_block_and_tiny_tensor():
    codes, absmax = quantize_state(torch.zeros(10))
    assert torch.equal(dequantize_state(codes, absmax, (10,)), torch.zeros(10))


def _quadratic(opt_cls, steps=60, **kw):
    torch.manual_seed(0)
    target = torch.randn(4096)
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = opt_cls([p], lr=0.05, weight_decay=0.01, **kw)
    for _ in range(steps):
        loss = ((p - target) ** 2 * torch.linspace(0.1, 10, 4096)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return p.detach(), opt


def test_adamw8bit_follows_torch_adamw():
    p8, _ = _quadratic(AdamW8bit)
    p32, _ = _quadratic(torch.optim.AdamW)
    start = torch.zeros(4096)
    # same trajectory within a few percent of the distance travelled
    assert (p8 - p32).norm() < 0.03 * (p32 - start).norm()


def test_state_memory_is_under_30_percent_of_adamw():
    _, o8 = _quadratic(AdamW8bit, steps=1)
    _, o32 = _quadratic(torch.optim.AdamW, steps=1)
    assert state_bytes(o8) <= 0.30 * state_bytes(o32)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    w = torch.randn(3000)

    def run(n, opt=None, p=None):
        p = p if p is not None else torch.nn.Parameter(torch.zeros(3000))
        opt = opt or AdamW8bit([p], lr=0.1)
        for _ in range(n):
            ((p - w) ** 2).sum().backward()
            opt.step()
            opt.zero_grad()
        return p, opt

    p_all, _ = run(6)
    p_half, o_half = run(3)
    p2 = torch.nn.Parameter(p_half.detach().clone())
    o2 = AdamW8bit([p2], lr=0.1)
    o2.load_state_dict(o_half.state_dict())
    p_res, _ = run(3, o2, p2)
    assert torch.equal(p_res, p_all)


def test_bad_hyperparameters_are_refused():
    with pytest.raises(ValueError, match="betas"):
        AdamW8bit([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.5))
