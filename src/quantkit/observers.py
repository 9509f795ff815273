"""Range estimation for activations (and weights): the observers of static quantization.

An observer sees tensors one batch at a time (`update`) and then proposes the range that
b-bit integers should cover (`range`) and the scale / zero-point of that range
(`qparams`). Ranges are per tensor (axis=None) or per channel (axis = the channel
dimension, e.g. 0 for the output rows of a weight, -1 for the features of an activation).

    minmax       the smallest and largest value seen (every outlier stretches the range)
    ema          moving average of each batch's min and max: r <- (1 - m)·r + m·r_batch
    percentile   the p-th percentile of |x| (symmetric) or the (100-p)-th / p-th (affine)
    mse          the clipping range with the least expected squared error:
                 values outside are clipped, values inside are rounded (error s²/12 each)
    entropy      the range whose quantized histogram has the least KL divergence from the
                 float histogram (TensorRT's calibration, Migacz 2017)

The histogram observers keep a signed histogram over [-R, R] (65,536 bins per tensor, 2,048 per
channel by default). When a batch exceeds R, R doubles and pairs of bins merge, which is exact,
so the histogram never has to be rebuilt and the order of batches does not matter beyond where
R ends up.

Quantization conventions (the same as formats/integer.py for weights):
symmetric: s = max(|lo|, |hi|) / (2^(b-1) - 1), z = 0, codes in [-(2^(b-1)-1), 2^(b-1)-1];
affine: the range is widened to include 0, s = (hi - lo) / (2^b - 1), z = round(-lo / s),
codes in [0, 2^b - 1].
"""
from __future__ import annotations

import math

import torch

from .errors import SchemeError

EPS = 1e-12


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int = 8, symmetric: bool = True):
    """(scale float32, zero int32 or None) for ranges [lo, hi] (tensors of any shape)."""
    lo, hi = lo.float(), hi.float()
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp(min=EPS), None
    qmax = 2**bits - 1
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    s = ((hi - lo) / qmax).clamp(min=EPS)
    z = torch.round(-lo / s).clamp(0, qmax).to(torch.int32)
    return s, z


def _channels_last(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x as [C, n] (C = 1 per tensor)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    """Base: sees batches, proposes a range. `axis=None` = per tensor."""

    name = "base"

    def __init__(self, bits: int = 8, symmetric: bool = True, axis: int | None = None):
        if not 2 <= bits <= 8:
            raise SchemeError(f"observers quantize to 2..8 bits, not {bits}")
        self.bits, self.symmetric, self.axis = bits, symmetric, axis
        self.batches = 0

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        self._update(_channels_last(x, self.axis))
        self.batches += 1

    def _update(self, x: torch.Tensor) -> None:  # x [C, n]
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi), each [C] (a scalar tensor per tensor)."""
        if self.batches == 0:
            raise SchemeError(f"the {self.name} observer has seen no data: run calibration batches first")
        lo, hi = self._range()
        return (lo[0], hi[0]) if self.axis is None else (lo, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self):
        lo, hi = self.range()
        return qparams_from_range(lo, hi, self.bits, self.symmetric)


class MinMaxObserver(Observer):
    name = "minmax"

    def __init__(self, bits=8, symmetric=True, axis=None):
        super().__init__(bits, symmetric, axis)
        self.lo = self.hi = None

    def _update(self, x):
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def _range(self):
        return self.lo, self.hi


class MovingAverageMinMaxObserver(Observer):
    """EMA of per-batch min/max; the first batch sets the range."""

    name = "ema"

    def __init__(self, bits=8, symmetric=True, axis=None, momentum: float = 0.01):
        super().__init__(bits, symmetric, axis)
        if not 0 < momentum <= 1:
            raise SchemeError(f"EMA momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.lo = self.hi = None

    def _update(self, x):
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = (1 - m) * self.lo + m * lo
            self.hi = (1 - m) * self.hi + m * hi

    def _range(self):
        return self.lo, self.hi


class HistogramObserver(Observer):
    """Signed histogram over [-R, R] per channel; subclasses choose the range from it.

    bins: 65536 per tensor (fine enough that a bulk of values 300x narrower than the largest
    outlier still spans hundreds of bins), 2048 per channel (memory: channels x bins x 8 B).
    """

    def __init__(self, bits=8, symmetric=True, axis=None, bins: int | None = None):
        super().__init__(bits, symmetric, axis)
        bins = (65536 if axis is None else 2048) if bins is None else bins
        if bins < 64 or bins % 4:
            raise SchemeError(f"histogram bins must be a multiple of 4 and at least 64, got {bins}")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # [C, bins] float64 counts
        self.R: torch.Tensor | None = None  # [C] half-width of the histogram
        self.lo = self.hi = None  # exact extremes seen (ranges never exceed them)

    def _grow(self, need: torch.Tensor) -> None:
        """Double R (merging bin pairs) per channel until R >= need."""
        B = self.bins
        while True:
            grow = need > self.R
            if not bool(grow.any()):
                return
            merged = self.hist[grow].reshape(-1, B // 2, 2).sum(-1)  # [g, B/2]
            new = torch.zeros_like(self.hist[grow])
            new[:, B // 4: B // 4 + B // 2] = merged
            self.hist[grow] = new
            self.R[grow] = self.R[grow] * 2

    def _update(self, x):
        C, B = x.shape[0], self.bins
        amax = x.abs().amax(dim=1)
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        if self.hist is None:
            self.hist = torch.zeros(C, B, dtype=torch.float64)
            self.R = torch.where(amax > 0, amax, torch.ones_like(amax))
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        fresh = self.hist.sum(1) == 0  # channels that have only seen zeros so far take this batch's range
        if bool(fresh.any()):
            self.R[fresh] = torch.where(amax[fresh] > 0, amax[fresh], self.R[fresh])
        self._grow(amax)
        width = 2 * self.R / B  # [C]
        idx = torch.floor((x + self.R[:, None]) / width[:, None]).clamp(0, B - 1).long()  # [C, n]
        flat = idx + torch.arange(C)[:, None] * B
        self.hist += torch.bincount(flat.reshape(-1), minlength=C * B).reshape(C, B).double()

    # geometry: signed bin j covers [-R + j·w, -R + (j+1)·w), w = 2R/B; the folded |x| histogram
    # has B/2 bins over [0, R] of the same width
    def _range(self):
        los, his = [], []
        for c in range(self.hist.shape[0]):
            lo, hi = self._choose(self.hist[c], float(self.R[c]))
            los.append(max(lo, float(self.lo[c])))  # never beyond what was seen
            his.append(min(hi, float(self.hi[c])))
        return torch.tensor(los), torch.tensor(his)

    def _choose(self, h: torch.Tensor, R: float) -> tuple[float, float]:
        raise NotImplementedError

    def _folded(self, h: torch.Tensor) -> torch.Tensor:
        """|x| histogram: B/2 bins over [0, R]."""
        B = self.bins
        return h[B // 2:] + h[: B // 2].flip(0)

    def _edge_candidates(self, h: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to n lower edge indices (<= centre) and n upper ones (>= centre) of the signed
        histogram, log-spaced in distance from the centre out to the outermost non-empty bin."""
        B = self.bins
        nz = torch.nonzero(h > 0).reshape(-1)
        reach_lo = max(1, B // 2 - int(nz[0])) if nz.numel() else 1
        reach_hi = max(1, int(nz[-1]) + 1 - B // 2) if nz.numel() else 1
        d_lo = torch.logspace(0, math.log10(reach_lo), n).round().long().unique()
        d_hi = torch.logspace(0, math.log10(reach_hi), n).round().long().unique()
        return B // 2 - d_lo, B // 2 + d_hi


class PercentileObserver(HistogramObserver):
    name = "percentile"

    def __init__(self, bits=8, symmetric=True, axis=None, bins=None, percentile: float = 99.99):
        super().__init__(bits, symmetric, axis, bins)
        if not 50 < percentile <= 100:
            raise SchemeError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _choose(self, h, R):
        B, p = self.bins, self.percentile / 100
        if self.symmetric:
            a = self._folded(h)
            cdf = a.cumsum(0) / a.sum().clamp(min=EPS)
            k = int(torch.searchsorted(cdf, torch.tensor(p, dtype=cdf.dtype)).clamp(max=B // 2 - 1))
            t = (k + 1) * (R / (B // 2))  # upper edge of the bin where the mass reaches p
            return -t, t
        cdf = h.cumsum(0) / h.sum().clamp(min=EPS)
        w = 2 * R / B
        klo = int(torch.searchsorted(cdf, torch.tensor(1 - p, dtype=cdf.dtype)).clamp(max=B - 1))
        khi = int(torch.searchsorted(cdf, torch.tensor(p, dtype=cdf.dtype)).clamp(max=B - 1))
        return -R + klo * w, -R + (khi + 1) * w


class MSEObserver(HistogramObserver):
    """The range with the least expected squared error: values outside are clipped to the
    nearest end ((x - t)² each, taken at the bin centres), values inside are rounded (s²/12
    each, the uniform-rounding model). Prefix sums make each candidate O(1): every bin edge is
    tried (symmetric), or a log-spaced grid of lower x upper edges (affine)."""

    name = "mse"

    def __init__(self, bits=8, symmetric=True, axis=None, bins=None, candidates: int = 512):
        super().__init__(bits, symmetric, axis, bins)
        self.candidates = candidates

    def _choose(self, h, R):
        B = self.bins
        w = 2 * R / B
        if self.symmetric:
            a = self._folded(h)  # [B/2] over [0, R]
            c = (torch.arange(B // 2, dtype=torch.float64) + 0.5) * w  # bin centres
            t = torch.arange(1, B // 2 + 1, dtype=torch.float64) * w  # [B/2] threshold at edge k+1
            # suffix sums over bins j > k (clipped when t = t_k): S0, S1 = Σ a c, S2 = Σ a c²
            def suffix(v):
                return torch.cat([v.flip(0).cumsum(0).flip(0)[1:], v.new_zeros(1)])
            S0, S1, S2 = suffix(a), suffix(a * c), suffix(a * c * c)
            inside = a.sum() - S0
            s = t / (2 ** (self.bits - 1) - 1)
            err = S2 - 2 * t * S1 + t * t * S0 + inside * s * s / 12
            k = int(err.argmin())
            return -float(t[k]), float(t[k])
        c = -R + (torch.arange(B, dtype=torch.float64) + 0.5) * w
        e = -R + torch.arange(B + 1, dtype=torch.float64) * w  # edges
        P0 = torch.cat([h.new_zeros(1), h.cumsum(0)])  # P0[k] = mass of bins < k
        P1 = torch.cat([h.new_zeros(1), (h * c).cumsum(0)])
        P2 = torch.cat([h.new_zeros(1), (h * c * c).cumsum(0)])
        ia, ib = self._edge_candidates(h, int(math.sqrt(self.candidates * 64)))
        ea, eb = e[ia], e[ib]
        below = ea * ea * P0[ia] - 2 * ea * P1[ia] + P2[ia]  # Σ_{j<a} h (e_a - c)²
        tot0, tot1, tot2 = P0[-1], P1[-1], P2[-1]
        above = (tot2 - P2[ib]) - 2 * eb * (tot1 - P1[ib]) + eb * eb * (tot0 - P0[ib])
        inside = P0[ib][None, :] - P0[ia][:, None]  # [A, Bc]
        s = (eb[None, :] - ea[:, None]) / (2**self.bits - 1)
        err = below[:, None] + above[None, :] + inside * s * s / 12
        k = int(err.argmin())
        i, j = divmod(k, err.shape[1])
        return float(ea[i]), float(eb[j])


def _kl_after_quantization(p: torch.Tensor, base: torch.Tensor, levels: int) -> float:
    """KL(P || Q) as TensorRT computes it: P the histogram inside the range with the mass
    outside folded into its edge bins; Q the inside histogram *without* that mass (`base`),
    quantized to `levels` equal chunks, each chunk's mass spread evenly over the bins where P
    is non-empty. Clipping shows up as P's heavy edge bins that Q does not have."""
    n = p.numel()
    edges = torch.linspace(0, n, levels + 1, dtype=torch.float64).round().long()
    chunk = torch.bucketize(torch.arange(n), edges[1:], right=True).clamp(max=levels - 1)  # [n] chunk of each bin
    nz = (p > 0).to(p.dtype)
    mass = torch.zeros(levels, dtype=p.dtype).index_add_(0, chunk, base)
    count = torch.zeros(levels, dtype=p.dtype).index_add_(0, chunk, nz)
    q = nz * mass[chunk] / count[chunk].clamp(min=1)
    ps, qs = p.sum(), q.sum()
    if ps <= 0 or qs <= 0:
        return float("inf")
    p, q = p / ps, q / qs
    m = p > 0
    return float((p[m] * torch.log(p[m] / q[m].clamp(min=1e-12))).sum())


class EntropyObserver(HistogramObserver):
    """KL-divergence calibration (TensorRT's entropy calibrator, Migacz 2017): the clipping
    range whose quantization of the histogram to 2^b levels loses the least information,
    the mass beyond the range folded into its edge bins. Candidates are log-spaced, from
    one bin per level (the finest range the histogram can judge) out to the largest value."""

    name = "entropy"

    def __init__(self, bits=8, symmetric=True, axis=None, bins=None, candidates: int = 192):
        super().__init__(bits, symmetric, axis, bins)
        self.candidates = candidates

    def _choose(self, h, R):
        B = self.bins
        if self.symmetric:
            a = self._folded(h)  # [B/2]
            levels = 2 ** (self.bits - 1)  # levels on one side (0 .. qmax)
            half = B // 2
            nz = torch.nonzero(a > 0).reshape(-1)
            top = int(nz[-1]) + 1 if nz.numel() else half
            lo_i = min(levels, top)
            cands = torch.logspace(math.log10(lo_i), math.log10(max(top, lo_i)), self.candidates).round().long().unique()
            best, best_i = float("inf"), top
            for i in cands.tolist():
                p = a[:i].clone()
                p[-1] += a[i:].sum()
                kl = _kl_after_quantization(p, a[:i], levels)
                if kl < best:
                    best, best_i = kl, i
            t = best_i * (R / half)
            return -t, t
        levels = 2**self.bits
        w = 2 * R / B
        ia, ib = self._edge_candidates(h, int(math.sqrt(self.candidates)) + 1)
        best, pick = float("inf"), (int(ia[-1]), int(ib[-1]))
        for a_ in ia.tolist():
            for b_ in ib.tolist():
                if b_ - a_ < levels:
                    continue
                p = h[a_:b_].clone()
                p[0] += h[:a_].sum()
                p[-1] += h[b_:].sum()
                kl = _kl_after_quantization(p, h[a_:b_], levels)
                if kl < best:
                    best, pick = kl, (a_, b_)
        return -R + pick[0] * w, -R + pick[1] * w


OBSERVERS: dict[str, type[Observer]] = {
    o.name: o for o in (MinMaxObserver, MovingAverageMinMaxObserver, PercentileObserver, MSEObserver, EntropyObserver)
}


def make_observer(name: str, bits: int = 8, symmetric: bool = True, axis: int | None = None, **options) -> Observer:
    """An observer by name (see OBSERVERS), e.g. make_observer("percentile", percentile=99.9)."""
    if name not in OBSERVERS:
        raise SchemeError(f"unknown observer {name!r}; valid: {', '.join(OBSERVERS)}")
    return OBSERVERS[name](bits=bits, symmetric=symmetric, axis=axis, **options)
