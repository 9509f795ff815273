"""llama.cpp's K-quants (super-blocks of 256 values) and IQ4_NL, as vectorised torch codecs.

    type   sub-blocks   codes       value                          sub-block params      bytes/256
    Q2_K   16 x 16      0..3        d·sc·q - dmin·m                4-bit sc, 4-bit m      84
    Q3_K   16 x 16      -4..3       d·sc·q                         6-bit signed sc        110
    Q4_K    8 x 32      0..15       d·sc·q - dmin·m                6-bit sc, 6-bit m      144
    Q5_K    8 x 32      0..31       d·sc·q - dmin·m                6-bit sc, 6-bit m      176
    Q6_K   16 x 16      -32..31     d·sc·q                         8-bit signed sc        210
    IQ4_NL blocks of 32 (18 bytes): d·k[q], k = 16 fixed non-uniform levels

d and dmin are float16, one per super-block. The byte layouts are those llama.cpp reads
(ggml-common.h); the `gguf` package's dequantizers check them in the tests.

Choosing the values (our own search, not llama.cpp's): each sub-block gets the scale (and
min) that minimise its weighted squared error (`importance`: large values weigh more, as in
llama.cpp) over a small set of candidate ranges, refined by weighted least squares on the
chosen codes; then the sub-block scales are quantized to their few bits
against the super-block's d (and dmin), and the codes are recomputed against the stored,
quantized scales, so what is written dequantizes exactly to what was optimised last.
"""
from __future__ import annotations

import torch

from .ggml_types import GGMLType, f16_bytes, f16_from, register, register_grid

QK = 256
_SHIFT2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_BITS8 = torch.arange(8, dtype=torch.uint8)
IQ4_LEVELS = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                          dtype=torch.float32)


# ------------------------------------------------------------------ bit layouts


def _pack_2bit(u: torch.Tensor) -> torch.Tensor:
    """codes 0..3 [n, 256] -> [n, 64]: value 128h + 32k + l at bits 2k of byte 32h + l."""
    u = u.to(torch.uint8).reshape(-1, 2, 4, 32)
    return (u << _SHIFT2.view(1, 1, 4, 1)).sum(dim=2, dtype=torch.int32).to(torch.uint8).reshape(-1, 64)


def _unpack_2bit(b: torch.Tensor) -> torch.Tensor:
    return ((b.reshape(-1, 2, 1, 32) >> _SHIFT2.view(1, 1, 4, 1)) & 3).reshape(-1, QK).to(torch.int32)


def _pack_bits(u: torch.Tensor) -> torch.Tensor:
    """bits [n, 256] -> [n, 32]: value 32k + l at bit k of byte l."""
    u = u.to(torch.uint8).reshape(-1, 8, 32)
    return (u << _BITS8.view(1, 8, 1)).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_bits(b: torch.Tensor) -> torch.Tensor:
    return ((b.reshape(-1, 1, 32) >> _BITS8.view(1, 8, 1)) & 1).reshape(-1, QK).to(torch.int32)


def _pack_nib32(u: torch.Tensor) -> torch.Tensor:
    """codes 0..15 [n, 256] -> [n, 128]: chunk c of 32 bytes holds sub-block 2c low, 2c+1 high."""
    u = u.to(torch.uint8).reshape(-1, 4, 2, 32) & 0x0F
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(-1, 128)


def _unpack_nib32(b: torch.Tensor) -> torch.Tensor:
    b = b.reshape(-1, 4, 1, 32)
    return torch.cat([b & 0x0F, b >> 4], dim=2).reshape(-1, QK).to(torch.int32)


def _pack_scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins [n, 8] -> 12 bytes (llama.cpp's get_scale_min_k4 layout)."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=1).to(torch.uint8)


def _unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    d_, m_, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d_ & 0x3F, (md & 0x0F) | ((d_ >> 2) & 0x30)], dim=1)
    mn = torch.cat([m_ & 0x3F, (md >> 4) | ((m_ >> 2) & 0x30)], dim=1)
    return sc, mn


def _pack_scales_q3(s: torch.Tensor) -> torch.Tensor:
    """16 six-bit scales (stored +32, 0..63) [n, 16] -> 12 bytes."""
    s = s.to(torch.int32)
    lo = (s[:, :8] & 0x0F) | ((s[:, 8:] & 0x0F) << 4)
    hi = ((s >> 4) & 3).reshape(-1, 4, 4)  # [n, k, i]: scale 4k + i
    hi = (hi << torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 4, 1)).sum(dim=1)
    return torch.cat([lo, hi], dim=1).to(torch.uint8)


def _unpack_scales_q3(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32)
    lo = torch.cat([b[:, :8] & 0x0F, b[:, :8] >> 4], dim=1)
    hi = ((b[:, 8:12].reshape(-1, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.int32).view(1, 4, 1)) & 3)
    return lo | (hi.reshape(-1, 16) << 4)


# ------------------------------------------------------------------ value search


def importance(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-value weights of the fitting error, x [m, L] (one row per sub-block).

    Without an importance matrix, what matters in a weight row is the large values, so the
    fits below weight each value's squared error by a function of its magnitude (the same
    heuristics llama.cpp's quantizer uses per type): "sq" x², "abs" |x|, "rms+abs" rms(x) + |x|,
    "flat" 1.
    """
    if kind == "sq":
        return x * x
    if kind == "abs":
        return x.abs()
    if kind == "rms+abs":
        return (x * x).mean(dim=1, keepdim=True).sqrt() + x.abs()
    return torch.ones_like(x)


def _fit_affine(x: torch.Tensor, nmax: int, wt: torch.Tensor, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [m, L]: scale s >= 0 and offset b <= 0 with x ≈ s·q + b, q in 0..nmax,
    minimising Σ wt·(s·q + b - x)².

    Candidate ranges [lo, lo + (hi - lo)·t] with lo = min(x, 0) and t within one step of 1
    (t in [1 - 1/nmax, 1 + 1/nmax]: wider searches clip the largest weights, which lowers the
    squared error but measurably raises the model's KL divergence); for each, codes by
    rounding, then the weighted least-squares (s, b) for those codes (b clamped to <= 0).
    """
    lo = x.amin(dim=1).clamp(max=0)  # [m]
    hi = x.amax(dim=1)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_b = torch.zeros_like(lo), lo.clone()
    n = wt.sum(1).clamp(min=1e-30)  # [m] total weight
    sx = (wt * x).sum(1)
    for t in torch.linspace(1 - 1 / nmax, 1 + 1 / nmax, steps + 1).tolist():
        for lo_t in (1.0, t):
            l, h = lo * lo_t, lo + (hi - lo) * t
            s0 = ((h - l) / nmax).clamp(min=1e-30)
            q = ((x - l[:, None]) / s0[:, None]).round().clamp(0, nmax)
            sq = (wt * q).sum(1)
            sqq, sqx = (wt * q * q).sum(1), (wt * q * x).sum(1)
            den = n * sqq - sq * sq
            s = torch.where(den > 0, (n * sqx - sq * sx) / den.clamp(min=1e-30), s0)
            b = (sx - s * sq) / n
            pos = b > 0  # the offset must be <= 0 (stored as a non-negative min)
            s = torch.where(pos, sqx / sqq.clamp(min=1e-30), s).clamp(min=0)
            b = torch.where(pos, torch.zeros_like(b), b)
            q = ((x - b[:, None]) / s.clamp(min=1e-30)[:, None]).round().clamp(0, nmax)
            err = (wt * (s[:, None] * q + b[:, None] - x) ** 2).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_b = torch.where(better, b, best_b)
    return best_s, best_b


def _fit_symmetric(x: torch.Tensor, nmin: int, nmax: int, wt: torch.Tensor, steps: int = 16) -> torch.Tensor:
    """Per row of x [m, L]: signed scale s with x ≈ s·q, q in nmin..nmax (nmin = -nmax-1),
    minimising Σ wt·(s·q - x)².

    The value of largest magnitude maps near nmin (as llama.cpp's types do); candidates move
    that range by up to one step either way, each refined by least squares on its codes.
    """
    i = x.abs().argmax(dim=1, keepdim=True)
    xm = x.gather(1, i).squeeze(1)  # [m] signed value of largest magnitude
    best_err = torch.full_like(xm, float("inf"))
    best = torch.zeros_like(xm)
    for t in torch.linspace(1 - 1 / abs(nmin), 1 + 1 / abs(nmin), steps + 1).tolist():
        s0 = xm / (nmin * t)
        safe = torch.where(s0 == 0, torch.ones_like(s0), s0)
        q = (x / safe[:, None]).round().clamp(nmin, nmax)
        qq = (wt * q * q).sum(1)
        s = torch.where(qq > 0, (wt * q * x).sum(1) / qq.clamp(min=1e-30), s0)
        safe = torch.where(s == 0, torch.ones_like(s), s)
        q = (x / safe[:, None]).round().clamp(nmin, nmax)
        err = (wt * (s[:, None] * q - x) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def _codes(x: torch.Tensor, s: torch.Tensor, b: torch.Tensor, nmin: int, nmax: int) -> torch.Tensor:
    """round((x - b) / s) clamped, with s == 0 giving code round(-b/…)=nmin-safe zeros."""
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = ((x - b) / safe).round().clamp(nmin, nmax)
    return torch.where(s == 0, torch.full_like(q, max(nmin, 0)), q).to(torch.int32)


def _quant_unsigned(v: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values v [n, S] -> (super scale fp16-exact [n], ints 0..top [n, S])."""
    d = (v.amax(dim=1) / top).to(torch.float16).float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    i = (v / safe[:, None]).round().clamp(0, top)
    return d, torch.where(d[:, None] == 0, torch.zeros_like(i), i).to(torch.int32)


def _quant_signed(v: torch.Tensor, nmin: int, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales v [n, S] -> (super scale [n], ints nmin..nmax [n, S]); largest |v| -> nmin."""
    i = v.abs().argmax(dim=1, keepdim=True)
    vm = v.gather(1, i).squeeze(1)
    d = (vm / nmin).to(torch.float16).float()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = (v / safe[:, None]).round().clamp(nmin, nmax)
    return d, torch.where(d[:, None] == 0, torch.zeros_like(q), q).to(torch.int32)


# ------------------------------------------------------------------ grids


class KGrid:
    """A K-quant as a grid: value = s·q + b with one (s, b) per sub-block, chosen per super-block.

    `params(x [n, 256])` chooses and quantizes the sub-block scales (and mins);
    `code(x [n, c], P, j0)` rounds columns j0..j0+c-1 of the super-block against them;
    `pack(q [n, 256], P)` writes the bytes. RTN is pack(code(x, params(x), 0), params(x));
    GPTQ calls `params` when a super-block starts and `code` column by column.
    """

    group = QK

    def __init__(self, name, sub, nmin, nmax, affine, snmin, snmax, packer, nbytes, weighting):
        self.name, self.sub, self.nmin, self.nmax, self.affine = name, sub, nmin, nmax, affine
        self.snmin, self.snmax, self._pack, self.nbytes = snmin, snmax, packer, nbytes
        self.weighting = weighting  # how `importance` weights the fitting error

    def params(self, x: torch.Tensor) -> dict:
        x = x.float()
        n, S = x.shape[0], QK // self.sub
        xs = x.reshape(-1, self.sub)
        wt = importance(xs, self.weighting)
        if self.affine:
            s, b = _fit_affine(xs, self.nmax, wt)
            d, sc = _quant_unsigned(s.reshape(n, S), self.snmax)
            dmin, mn = _quant_unsigned((-b).reshape(n, S), self.snmax)
            return {"s": d[:, None] * sc, "b": -(dmin[:, None] * mn), "d": d, "dmin": dmin, "sc": sc, "mn": mn}
        s = _fit_symmetric(xs, self.nmin, self.nmax, wt)
        d, sc = _quant_signed(s.reshape(n, S), self.snmin, self.snmax)
        eff = d[:, None] * sc
        return {"s": eff, "b": torch.zeros_like(eff), "d": d, "sc": sc}

    def _cols(self, P, j0, c):
        idx = torch.arange(j0, j0 + c) // self.sub
        return P["s"][:, idx], P["b"][:, idx]

    def code(self, x: torch.Tensor, P: dict, j0: int = 0) -> torch.Tensor:
        s, b = self._cols(P, j0, x.shape[1])
        return _codes(x.float(), s, b, self.nmin, self.nmax)

    def value(self, q: torch.Tensor, P: dict, j0: int = 0) -> torch.Tensor:
        s, b = self._cols(P, j0, q.shape[1])
        return s * q.float() + b

    def pack(self, q: torch.Tensor, P: dict) -> torch.Tensor:
        return self._pack(q, P)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        P = self.params(x)
        return self.pack(self.code(x, P), P)


def _q2k_pack(q, P):
    scales = (P["sc"] | (P["mn"] << 4)).to(torch.uint8)
    return torch.cat([scales, _pack_2bit(q), f16_bytes(P["d"]), f16_bytes(P["dmin"])], dim=1)


def _q2k_dequantize(b):
    scales = b[:, :16].to(torch.int32)
    q = _unpack_2bit(b[:, 16:80]).float().reshape(-1, 16, 16)
    d, dmin = f16_from(b[:, 80:82]), f16_from(b[:, 82:84])
    dl = (d[:, None] * (scales & 0x0F).float())[:, :, None]
    ml = (dmin[:, None] * (scales >> 4).float())[:, :, None]
    return (dl * q - ml).reshape(-1, QK)


def _q4k_pack(q, P):
    return torch.cat([f16_bytes(P["d"]), f16_bytes(P["dmin"]), _pack_scales_k4(P["sc"], P["mn"]),
                      _pack_nib32(q)], dim=1)


def _q5k_pack(q, P):
    return torch.cat([f16_bytes(P["d"]), f16_bytes(P["dmin"]), _pack_scales_k4(P["sc"], P["mn"]),
                      _pack_bits(q >> 4), _pack_nib32(q & 0x0F)], dim=1)


def _k4_dequant(b, q):
    d, dmin = f16_from(b[:, 0:2]), f16_from(b[:, 2:4])
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    dl = (d[:, None] * sc.float())[:, :, None]
    ml = (dmin[:, None] * mn.float())[:, :, None]
    return (dl * q.float().reshape(-1, 8, 32) - ml).reshape(-1, QK)


def _q4k_dequantize(b):
    return _k4_dequant(b, _unpack_nib32(b[:, 16:144]))


def _q5k_dequantize(b):
    return _k4_dequant(b, _unpack_nib32(b[:, 48:176]) | (_unpack_bits(b[:, 16:48]) << 4))


def _q3k_pack(q, P):
    u = q + 4  # 0..7: low 2 bits in qs, bit 2 in hmask
    return torch.cat([_pack_bits(u >> 2), _pack_2bit(u & 3), _pack_scales_q3(P["sc"] + 32), f16_bytes(P["d"])], dim=1)


def _q3k_dequantize(b):
    hm = _unpack_bits(b[:, 0:32])
    ql = _unpack_2bit(b[:, 32:96])
    sc = (_unpack_scales_q3(b[:, 96:108]) - 32).float()
    d = f16_from(b[:, 108:110])
    q = (ql - ((hm ^ 1) << 2)).float().reshape(-1, 16, 16)
    return ((d[:, None] * sc)[:, :, None] * q).reshape(-1, QK)


def _q6k_pack(q, P):
    u = (q + 32).to(torch.uint8).reshape(-1, 2, 128)  # [n, half, r]
    low = u & 0x0F
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)  # byte 64h + l: r = l (low), 64 + l (high)
    hi = (u >> 4).reshape(-1, 2, 4, 32)  # r = 32k + l -> byte 32h + l, bits 2k
    qh = (hi << _SHIFT2.view(1, 1, 4, 1)).sum(dim=2, dtype=torch.int32).to(torch.uint8).reshape(-1, 64)
    return torch.cat([ql, qh, P["sc"].to(torch.int8).view(torch.uint8), f16_bytes(P["d"])], dim=1)


def _q6k_dequantize(b):
    ql = b[:, 0:128].reshape(-1, 2, 1, 64)
    ql = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 128)
    qh = ((b[:, 128:192].reshape(-1, 2, 1, 32) >> _SHIFT2.view(1, 1, 4, 1)) & 3).reshape(-1, 2, 128)
    q = ((ql | (qh << 4)).to(torch.int32) - 32).float().reshape(-1, 16, 16)
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = f16_from(b[:, 208:210])
    return ((d[:, None] * sc)[:, :, None] * q).reshape(-1, QK)


# ------------------------------------------------------------------ IQ4_NL


def _nearest_level(y: torch.Tensor) -> torch.Tensor:
    mid = (IQ4_LEVELS[1:] + IQ4_LEVELS[:-1]) / 2
    return torch.bucketize(y, mid).to(torch.int32)


class IQ4NLGrid:
    """IQ4_NL: blocks of 32, value = d·k[q] with llama.cpp's 16 fixed levels k."""

    name, group, nbytes = "IQ4_NL", 32, 18

    def params(self, x: torch.Tensor) -> dict:
        x = x.float()
        i = x.abs().argmax(dim=1, keepdim=True)
        xm = x.gather(1, i).squeeze(1)
        best_err = torch.full_like(xm, float("inf"))
        best_d = torch.zeros_like(xm)
        for t in torch.linspace(0.8, 1.1, 16).tolist():
            d = xm / (-127.0 * t)  # the largest magnitude near the extreme level -127
            k = IQ4_LEVELS[self.code(x, {"d": d})]
            kk = (k * k).sum(1)
            d = torch.where(kk > 0, (k * x).sum(1) / kk, d).to(torch.float16).float()
            err = ((d[:, None] * IQ4_LEVELS[self.code(x, {"d": d})] - x) ** 2).sum(1)
            better = err < best_err
            best_err, best_d = torch.where(better, err, best_err), torch.where(better, d, best_d)
        return {"d": best_d}

    def code(self, x: torch.Tensor, P: dict, j0: int = 0) -> torch.Tensor:
        d = P["d"]
        safe = torch.where(d == 0, torch.ones_like(d), d)
        return _nearest_level(x.float() / safe[:, None])

    def value(self, q: torch.Tensor, P: dict, j0: int = 0) -> torch.Tensor:
        return P["d"][:, None] * IQ4_LEVELS[q.long()]

    def pack(self, q: torch.Tensor, P: dict) -> torch.Tensor:
        q = q.to(torch.uint8)
        return torch.cat([f16_bytes(P["d"]), q[:, :16] | (q[:, 16:] << 4)], dim=1)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        P = self.params(x)
        return self.pack(self.code(x, P), P)


def _iq4nl_dequantize(b):
    d = f16_from(b[:, 0:2])
    q = torch.cat([b[:, 2:18] & 0x0F, b[:, 2:18] >> 4], dim=1).long()
    return d[:, None] * IQ4_LEVELS[q]


K_GRIDS = {
    "Q2_K": KGrid("Q2_K", 16, 0, 3, True, 0, 15, _q2k_pack, 84, "abs"),
    "Q3_K": KGrid("Q3_K", 16, -4, 3, False, -32, 31, _q3k_pack, 110, "sq"),
    "Q4_K": KGrid("Q4_K", 32, 0, 15, True, 0, 63, _q4k_pack, 144, "rms+abs"),
    "Q5_K": KGrid("Q5_K", 32, 0, 31, True, 0, 63, _q5k_pack, 176, "rms+abs"),
    "Q6_K": KGrid("Q6_K", 16, -32, 31, False, -128, 127, _q6k_pack, 210, "sq"),
    "IQ4_NL": IQ4NLGrid(),
}
_DEQUANT = {"Q2_K": _q2k_dequantize, "Q3_K": _q3k_dequantize, "Q4_K": _q4k_dequantize, "Q5_K": _q5k_dequantize,
            "Q6_K": _q6k_dequantize, "IQ4_NL": _iq4nl_dequantize}
for _name, _g in K_GRIDS.items():
    register(GGMLType(_name, _g.group, _g.nbytes, _g.quantize, _DEQUANT[_name]))
    register_grid(_name, _g)


# ------------------------------------------------------------------ kernel layout of Q4_K / Q5_K

K4_TYPES = ("Q4_K", "Q5_K")  # sub-blocks of 32 values, each w = (d·sc)·q - dmin·m


def k4_parts(b: torch.Tensor, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K blocks [n, nbytes] as codes q int32 [n, 256] (0..15 / 0..31) and, per sub-block
    of 32, scale s = d·sc and bias b = -(dmin·m) float32 [n, 8]: w = s·q + b is exactly what
    dequantize computes (the same fp32 products, then an exact negation)."""
    if type_name == "Q4_K":
        q = _unpack_nib32(b[:, 16:144])
    elif type_name == "Q5_K":
        q = _unpack_nib32(b[:, 48:176]) | (_unpack_bits(b[:, 16:48]) << 4)
    else:
        raise ValueError(f"k4_parts takes {' or '.join(K4_TYPES)}, not {type_name}")
    d, dmin = f16_from(b[:, 0:2]), f16_from(b[:, 2:4])
    sc, mn = _unpack_scales_k4(b[:, 4:16])
    return q, d[:, None] * sc.float(), -(dmin[:, None] * mn.float())


def k4_blocks(header: torch.Tensor, q: torch.Tensor, type_name: str) -> torch.Tensor:
    """The blocks back from their 16-byte headers (d, dmin, scales) [n, 16] and codes [n, 256]."""
    if type_name == "Q4_K":
        return torch.cat([header, _pack_nib32(q)], dim=1)
    return torch.cat([header, _pack_bits(q >> 4), _pack_nib32(q & 0x0F)], dim=1)
