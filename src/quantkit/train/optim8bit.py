"""`AdamW8bit`: AdamW whose two moment states live in 8 bits, block-wise.

After Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (arXiv:2110.02861):
each state tensor is cut into blocks of 2048 consecutive values; a block keeps its absmax in
float32 and every value as an 8-bit index into a *dynamic* code (most levels near zero, a few
up to 1), so small and large moments keep their relative precision. Each step dequantizes a
state, applies the ordinary AdamW update in float32, and quantizes the state again.

Codes (built here, 256 sorted levels in [-1, 1] or [0, 1]): besides 0 and 1, exponent band i
(i = 0 .. 6) holds evenly spaced magnitudes within [0.1, 1] * 10^(i - 6), so the band next to
1 is the finest and the smallest band reaches 10^-7 of the block's absmax. Signed (first
moment): 2^i magnitudes per band, mirrored around 0 (254 levels) + 0 + 1 + -1 - the smallest
positive magnitude (so a block's absmax is exact whatever its sign). Unsigned (second
moment, never negative): 2^(i+1) magnitudes per band (254 levels) + 0 + 1.

Memory: 1 byte per value per state + 4 bytes per block, against 4 bytes for fp32 AdamW, so
the states take ~25% of fp32 AdamW's (`state_bytes` reports it).
"""
from __future__ import annotations

import torch

BLOCK = 2048


def _dynamic_levels(signed: bool) -> torch.Tensor:
    bands, extra = 7, 0 if signed else 1  # unsigned: twice the magnitudes per band (no sign to store)
    mags = []
    for i in range(bands):
        edges = torch.linspace(0.1, 1.0, 2 ** (i + extra) + 1, dtype=torch.float64)
        mags.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - bands + 1))
    m = torch.cat(mags)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    if signed:  # +-1 both exact (a block's absmax may be negative); the smallest positive level makes room
        levels = torch.cat([-m, m[1:], ends, -ends[1:]])
    else:
        levels = torch.cat([m, ends])
    levels = torch.sort(levels.float()).values
    assert levels.numel() == 256
    return levels


LEVELS = {True: _dynamic_levels(True), False: _dynamic_levels(False)}
_MIDS = {k: (v[1:] + v[:-1]) / 2 for k, v in LEVELS.items()}


def quantize_state(x: torch.Tensor, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [numel], absmax float32 [n_blocks]) of a float tensor, block-wise."""
    flat = x.detach().float().reshape(-1)
    n = flat.numel()
    pad = (-n) % BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, BLOCK)  # [n_blocks, BLOCK]
    absmax = blocks.abs().amax(dim=1)
    d = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    y = (blocks / d[:, None]).clamp(-1.0 if signed else 0.0, 1.0)
    codes = torch.bucketize(y.contiguous(), _MIDS[signed]).to(torch.uint8).reshape(-1)[:n]
    return codes, absmax


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, shape, signed: bool = True) -> torch.Tensor:
    """Float32 tensor of `shape` from `quantize_state`'s output."""
    n = codes.numel()
    vals = LEVELS[signed][codes.long()]
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return (vals * scale).reshape(shape)


class AdamW8bit(torch.optim.Optimizer):
    """Drop-in for torch.optim.AdamW (same arguments and update) with 8-bit moment states."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW8bit hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["m_q"], st["m_max"] = quantize_state(torch.zeros_like(g), True)
                    st["v_q"], st["v_max"] = quantize_state(torch.zeros_like(g), False)
                st["step"] += 1
                t = float(st["step"])
                m = dequantize_state(st["m_q"], st["m_max"], g.shape, True).mul_(b1).add_(g, alpha=1 - b1)
                v = dequantize_state(st["v_q"], st["v_max"], g.shape, False).mul_(b2).addcmul_(g, g, value=1 - b2)
                st["m_q"], st["m_max"] = quantize_state(m, True)
                st["v_q"], st["v_max"] = quantize_state(v, False)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v / (1 - b2**t)).sqrt_().add_(group["eps"])
                p.addcdiv_((m / (1 - b1**t)).to(p.dtype), denom.to(p.dtype), value=-group["lr"])
        return loss


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors."""
    return sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))
